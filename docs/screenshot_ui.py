"""Screenshots of the Prefect UI with the nightly deployment and a finished run's artifacts.

Starts a Prefect server on a free loopback port and `gradsift serve` on a small config (the same
live services the tests use), triggers the nightly deployment once, waits for it, and has headless
Chromium (Debian package ``chromium``) take screenshots:

    docs/prefect_ui_deployment.png     the nightly deployment: its cron schedule and entrypoint
    docs/prefect_ui_run.png            its finished run: stages as task runs, the report artifact
    docs/prefect_ui_artifacts.png      the artifacts: the run report, the stage-counts table, the curation report
    docs/prefect_ui_report.png         the run-report artifact: counts and the SQL that reproduces each figure

Run from the repository root: ``.venv/bin/python docs/screenshot_ui.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from live_services import nightly_toml, prefect_server, served_nightly_run  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,900",
    "--virtual-time-budget=60000",  # artifact pages render late
]


def screenshot(url: str, png: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs headless Chromium: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="gradsift-chromium-") as profile:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url]
        subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    print(f"wrote {png} ({url})")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="gradsift-screenshot-"))
    api = prefect_server()
    ui = api.removesuffix("/api")
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "GRADSIFT_STATE": str(work / "state"),
        "PREFECT_HOME": str(work / "prefect-home"),
    }
    with served_nightly_run(nightly_toml(work), env, work / "serve.log") as (deployment, run, artifacts):
        if not run.state.is_completed():
            raise SystemExit(f"the nightly run did not complete: see {work / 'serve.log'}")
        print(f"run {run.name}: {len(artifacts)} artifacts ({', '.join(a.type for a in artifacts)})")
        screenshot(f"{ui}/deployments/deployment/{deployment.id}", ROOT / "docs" / "prefect_ui_deployment.png")
        screenshot(f"{ui}/runs/flow-run/{run.id}", ROOT / "docs" / "prefect_ui_run.png")
        screenshot(f"{ui}/artifacts", ROOT / "docs" / "prefect_ui_artifacts.png")
        report = next(a for a in artifacts if a.key == "run-report")
        screenshot(f"{ui}/artifacts/artifact/{report.id}", ROOT / "docs" / "prefect_ui_report.png")


if __name__ == "__main__":
    main()
