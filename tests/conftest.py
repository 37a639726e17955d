"""Shared fixtures: one local Ray (2 CPUs) and one Prefect test harness per session; ../shared data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADSIFT_STATE", tempfile.mkdtemp(prefix="gradsift-test-state-"))
from gradsift.env import configure_environment  # noqa: E402

configure_environment()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, started once per test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect flows run against a temporary local database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public sets); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared evaluation data at {SHARED_DATA} (absent in a fresh clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 1-layer BERT sequence classifier (2 classes) with MiniLM's real tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from gradsift.models.loading import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = BertTokenizerFast.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
