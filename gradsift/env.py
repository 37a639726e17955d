"""Process environment defaults, applied before prefect or ray is imported.

Prefect runs without a server unless PREFECT_API_URL is set (an ephemeral one, analytics off,
its state under the project's state folder); Ray starts locally unless RAY_ADDRESS is set;
nothing reaches a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def state_dir() -> Path:
    """The project's state folder (Prefect home, demo data): GRADSIFT_STATE or ./.state."""
    return Path(os.environ.get("GRADSIFT_STATE", ".state")).resolve()


def configure_environment() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # prefect does not create it
