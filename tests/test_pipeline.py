"""The pipeline's stage contract: typed outputs that round-trip through resume markers, declared needs."""

from __future__ import annotations

import pytest

from gradsift.flows.influence import CURATION_STAGES
from gradsift.flows.pipeline import Stage, check_order
from gradsift.schemas.stages import InfluenceOutput, IngestOutput
from gradsift.storage.store import Store


def test_curation_stages_come_after_what_they_need():
    check_order(CURATION_STAGES, score=True)
    check_order(CURATION_STAGES, score=False)  # the influence flow: features from checkpoints, no scoring
    late = [Stage("mixture", CURATION_STAGES[2].run, needs=("influence",)), *CURATION_STAGES[:1]]
    with pytest.raises(ValueError, match="'mixture' needs \\['influence'\\]"):
        check_order(late, score=True)


def test_stage_outputs_round_trip_through_their_markers(tmp_path):
    staging = Store(tmp_path).ensure().staging("run-x")
    ingest = IngestOutput(samples=3, shards=["d-00000-abc"], task="classification", label_index={"a": 0, "b": 1})
    influence = InfluenceOutput(rows=6, alignment=[{"math": 0.5}], domain_counts={"math": 3})
    staging.mark_done("ingest", ingest.model_dump())
    staging.mark_done("influence", influence.model_dump())
    assert IngestOutput.model_validate(staging.stage_info("ingest")) == ingest
    assert InfluenceOutput.model_validate(staging.stage_info("influence")) == influence
