"""Score one shard: encode, micro-batch, run the per-sample gradient engine, build Arrow tables.

Pure compute (no prefect or ray): ``executors.workers.ScoringWorker`` runs it inside Ray actors, tests call it directly.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from gradsift.data.batching import collate, micro_batches
from gradsift.engine.gradients import PerSampleGradients, module_key
from gradsift.models.adapter import adapter, task_of
from gradsift.models.loading import load_model
from gradsift.schemas.config import ModelConfig
from gradsift.schemas.engine import EngineConfig
from gradsift.schemas.tables import LAYER_STATS, SCORES, features_schema

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ShardScorer:
    """Loads the model once; scores whole shards."""

    def __init__(
        self, model: ModelConfig, engine: EngineConfig, label_index: dict[str, int] | None = None, seed: int = 0
    ):
        self.device = pick_device()
        dtype = DTYPES[model.dtype] if self.device.type == "cuda" else torch.float32
        self.model, self.tokenizer = load_model(model.name_or_path, num_labels=model.num_labels, dtype=dtype, seed=seed)
        self.model.to(self.device)
        self.task = task_of(self.model)
        self.engine_config = engine
        self.engine = PerSampleGradients(self.model, engine)
        self.checkpoint = model.checkpoint
        self.label_index = label_index
        self.pad_id = self.tokenizer.pad_token_id

    def parameter_set(self) -> dict:
        """Which parameters the per-sample gradients cover (recorded in ``runs``)."""
        return {
            "mode": self.engine_config.parameters,
            "tensors": len(self.engine.param_names),
            "parameters": self.engine.num_params,
            "names": self.engine.param_names,
        }

    def score(self, samples: pa.Table) -> dict[str, pa.Table]:
        """Per-sample rows for ``scores``, ``layer_stats`` and ``features`` of one shard."""
        items = [adapter(self.task).encode(row, self.tokenizer, self.label_index) for row in samples.to_pylist()]
        scores, layers, features = [], [], []
        for group in micro_batches(items, self.engine_config.micro_batch_size):
            out = self.engine.compute(collate(group, self.pad_id).to(self.device))
            for i, it in enumerate(group):
                key = {"checkpoint": self.checkpoint, "dataset": it.dataset, "sample_id": it.sample_id}
                scores.append({**key, "loss": float(out.loss[i]), "grad_norm": float(out.grad_norm[i])})
                for name, norms in out.layer_norms.items():
                    layer, module = module_key(name)
                    nuc = out.nuclear.get(name)
                    layers.append(
                        {
                            **key,
                            "layer": layer,
                            "module": module,
                            "grad_norm": float(norms[i]),
                            "nuclear_norm": float(nuc[0][i]) if nuc else None,
                            "sigma1_ratio": float(nuc[1][i]) if nuc else None,
                        }
                    )
                if out.features is not None:
                    features.append({**key, "feature": out.features[i].to(torch.float16).numpy()})
        tables = {
            "scores": pa.Table.from_pylist(scores, schema=SCORES),
            "layer_stats": pa.Table.from_pylist(layers, schema=LAYER_STATS),
        }
        if features:
            dim = len(features[0]["feature"])
            tables["features"] = features_table(features, dim)
        return tables


def features_table(rows: list[dict], dim: int) -> pa.Table:
    """Rows of (checkpoint, dataset, sample_id, feature [dim]) as a ``features`` table (float16 fixed-size lists)."""
    import numpy as np

    flat = np.stack([r["feature"] for r in rows]).astype(np.float16).reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), dim)
    schema = features_schema(dim)
    return pa.Table.from_arrays(
        [pa.array([r[c] for r in rows], pa.string()) for c in ("checkpoint", "dataset", "sample_id")] + [column],
        schema=schema,
    )
