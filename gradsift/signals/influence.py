"""Target-aware influence: LESS, TracIn and gradient cosine, streamed over feature blocks.

Pure compute (no prefect or ray): ``executors.workers.InfluenceBlocks`` runs ``score_block`` (in the calling process
without a Ray cluster, on Ray actors with one) and the influence stage merges the blocks' small results (``merge_blocks``).

Formulas (c runs over checkpoints with learning rate eta_c; z a training sample, z' a target sample):

* LESS (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning", eq. 2-3):
  Gamma_c(z) = m' / (sqrt(v') + eps) with m' = beta1 m + (1 - beta1) g, v' = beta2 v + (1 - beta2) g^2,
  (m, v) the AdamW moments of checkpoint c and g the sample's LoRA gradient; Gamma_c(z) is projected
  (the engine's projection) and L2-normalised; the target side is the plain projected gradient,
  normalised. Inf(z, z') = sum_c eta_c cos(Gamma_c(z), g_c(z')).
* TracIn (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent", eq. 3 with
  checkpoints): Inf(z, z') = sum_c eta_c <g_c(z), g_c(z')> on projected gradients.
* cosine: Inf(z, z') = mean_c cos(g_c(z), g_c(z')).

Every method then scores a training sample by the mean of Inf over a subtask's target samples and
the maximum over subtasks (LESS, section 3.2). Blocks: features are float16 on disk and in memory (their raw
rows memory-mapped, ``storage.feature_rows``); each block is cast to float32 in chunks of ROW_CHUNK rows into one
reused buffer, straight into its products with all targets, so the memory of one call is
O(block_rows * (k * 2 bytes + M * (4 bytes per method + 8 bytes of top-k indices)) + ROW_CHUNK * k * 4 bytes)
whatever N.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from gradsift.schemas.influence import Method
from gradsift.signals.mixture import DomainSums
from gradsift.storage import feature_rows
from gradsift.storage.keys import FEATURE_KINDS, CheckpointFeature, FeaturePart

if TYPE_CHECKING:  # torch and the model code are imported where features are made, not where blocks are scored
    import torch

    from gradsift.models.checkpoints import CheckpointInfo

TRAIN_KIND = {"less": "adam", "tracin": "grad", "cosine": "grad"}
"""Which training-side features each method reads; the target side always reads plain gradients."""


def adam_direction(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """LESS's training-side gradient: the Adam update direction m' / (sqrt(v') + eps) after one more step
    with ``grad`` [B, P] from moments ``exp_avg``, ``exp_avg_sq`` [P] (Xia et al. 2024, eq. 2)."""
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * grad
    v = b2 * exp_avg_sq + (1 - b2) * grad.square()
    return m / (v.sqrt() + eps)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass
class Targets:
    """The target side, ready for block products.

    feats[c]: [M, k] float32 plain projected gradients at checkpoint c; subtask: [M] int ids;
    lrs: [C] learning rates. ``matrix(method)`` folds the checkpoint weights into one [M, C*k] matrix:
    its columns of checkpoint c times a training chunk's [k, B] transpose, summed over c, give
    sum_c w_c <x_c, t_c> for every target and row.
    """

    checkpoints: list[str]
    feats: list[np.ndarray]
    lrs: np.ndarray
    subtask: np.ndarray
    sample_ids: list[str]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_subtasks(self) -> int:
        return int(self.subtask.max()) + 1

    def weights(self, method: Method) -> np.ndarray:
        return np.full(len(self.lrs), 1.0 / len(self.lrs)) if method == "cosine" else self.lrs

    def matrix(self, method: Method) -> np.ndarray:
        """[M, C*k] float32: row j is target j's features at every checkpoint, each scaled by its weight w_c
        (and L2-normalised unless TracIn)."""
        if method not in self._cache:
            parts = [
                w * (f if method == "tracin" else l2_normalise(f))
                for w, f in zip(self.weights(method), self.feats, strict=True)
            ]
            self._cache[method] = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
        return self._cache[method]

    def averaging(self) -> np.ndarray:
        """[M, S]: column s averages the targets of subtask s."""
        a = np.zeros((len(self.subtask), self.n_subtasks), dtype=np.float32)
        a[np.arange(len(self.subtask)), self.subtask] = 1.0
        return a / a.sum(axis=0, keepdims=True)


@dataclass
class BlockResult:
    """Scores of one block of training rows: per method [B] scores and the block's top-k per target, and (when the
    block's domains were given) per source the domain sums of its plain gradients."""

    scores: dict[str, np.ndarray]
    top_rows: dict[str, np.ndarray]  # [k', M] row indices within the block
    top_vals: dict[str, np.ndarray]  # [k', M]
    sums: list[DomainSums] | None = None


ROW_CHUNK = 2048
"""Training rows cast from float16 to float32 at a time, into one buffer reused for the whole block: the float32 copy
stays ROW_CHUNK x k whatever the block."""

Rows = np.ndarray | list[np.ndarray]
"""One source's features of a block: a [B, k] array, or pieces whose rows, stacked, are the block (``read_block``)."""


def _cast_rows(pieces: list[np.ndarray], starts: np.ndarray, i: int, out: np.ndarray) -> np.ndarray:
    """Rows i .. i + len(out) of the stacked ``pieces`` (``starts``: each piece's first row) cast into ``out``."""
    j = i + len(out)
    for p, s in zip(pieces, starts, strict=True):
        a, b = max(i, s), min(j, s + len(p))
        if a < b:
            np.copyto(out[a - i : b - i], p[a - s : b - s])
    return out


def block_scores(
    train: dict[str, list[Rows]],
    targets: Targets,
    methods: list[Method],
    top_k: int,
    domains: np.ndarray | None = None,
) -> BlockResult:
    """Influence of one block. ``train[kind][c]``: [B, k] float16 (or float32) features at checkpoint c (``Rows``),
    kind "grad" or "adam". Accumulates in float32: sum_c w_c sim(x_c, t_c) for every target, then mean per subtask
    and max over subtasks (LESS, section 3.2).

    One pass over the block: each chunk of ROW_CHUNK rows is cast once into a reused float32 buffer, then gives its
    products with every method reading its kind (a cosine divides the product by the rows' norms: x / |x| @ t =
    (x @ t) / |x|, no normalised copy) and, for the "grad" kind when ``domains`` [B] labels are given, the per-source
    domain sums and norms (``DomainSums.add_rows``). The products are kept target-major ([M, B]), so that the top-k
    per target is a partition of contiguous rows."""
    avg = targets.averaging().T  # [S, M]
    k = targets.feats[0].shape[1]
    pieces = {kind: [f if isinstance(f, list) else [f] for f in per_src] for kind, per_src in train.items()}
    starts = {kind: [np.cumsum([0] + [len(p) for p in ps[:-1]]) for ps in per_src] for kind, per_src in pieces.items()}
    n = sum(len(p) for p in next(iter(pieces.values()))[0])
    m_targets = len(targets.subtask)
    inf = {m: np.empty((m_targets, n), dtype=np.float32) for m in methods}
    sums = [DomainSums() for _ in train["grad"]] if domains is not None else None
    chunk = max(1, min(ROW_CHUNK, n))
    buf = np.empty((chunk, k), dtype=np.float32)
    tmp = np.empty((m_targets, chunk), dtype=np.float32)
    kinds = [TRAIN_KIND[m] for m in methods] + (["grad"] if sums is not None else [])
    for kind in dict.fromkeys(kinds):
        readers = [m for m in methods if TRAIN_KIND[m] == kind]
        with_norms = (kind == "grad" and sums is not None) or any(m != "tracin" for m in readers)
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            for c, (ps, st) in enumerate(zip(pieces[kind], starts[kind], strict=True)):
                x = _cast_rows(ps, st, i, buf[: j - i])
                norm = np.sqrt(np.einsum("ij,ij->i", x, x)) if with_norms else None
                if kind == "grad" and sums is not None:
                    sums[c].add_rows(x, norm, domains[i:j])
                for m in readers:
                    out = inf[m][:, i:j] if c == 0 else tmp[:, : j - i]
                    np.matmul(targets.matrix(m)[:, c * k : (c + 1) * k], x.T, out=out)
                    if m != "tracin":
                        out /= np.where(norm > 0, norm, 1.0)[None, :]
                    if c:
                        inf[m][:, i:j] += out
    scores, top_rows, top_vals = {}, {}, {}
    for method in methods:
        scores[method] = (avg @ inf[method]).max(axis=0)
        if top_k:
            kk = min(top_k, n)
            rows = np.argpartition(inf[method], n - kk, axis=1)[:, n - kk :]  # [M, kk]
            top_rows[method] = rows.T
            top_vals[method] = np.take_along_axis(inf[method], rows, axis=1).T
    return BlockResult(scores, top_rows, top_vals, sums)


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-block top-k (global row ids [k_i, M], values [k_i, M]) into the overall top-k, sorted."""
    rows = np.concatenate([p[0] for p in parts], axis=0)
    vals = np.concatenate([p[1] for p in parts], axis=0)
    order = np.argsort(-vals, axis=0, kind="stable")[:k]
    return np.take_along_axis(rows, order, axis=0), np.take_along_axis(vals, order, axis=0)


# --------------------------------------------------------------------------------------------
# Features at a training checkpoint


def checkpoint_name(info: CheckpointInfo) -> str:
    """A checkpoint's name in the features table and in part names: "<train_run_id>.step-NNNNNN"."""
    return f"{info.train_run_id}.{info.path.name}"


def optimizer_moments(model: torch.nn.Module, state: dict, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat AdamW moments (exp_avg, exp_avg_sq) laid out as ``names``.

    The optimizer's parameter indices follow its param_groups, built (by the train flow) over the
    model's trainable parameters in ``named_parameters`` order."""
    import torch

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    index = [i for g in state["param_groups"] for i in g["params"]]
    if len(index) != len(trainable):
        raise ValueError(f"optimizer holds {len(index)} parameters, the model has {len(trainable)} trainable")
    by_name = {n: state["state"][i] for (n, _), i in zip(trainable, index, strict=True)}
    shapes = {n: p.shape for n, p in trainable}
    m, v = [], []
    for n in names:
        s = by_name[n]
        if s["exp_avg"].shape != shapes[n]:
            raise ValueError(f"optimizer state of {n} has shape {tuple(s['exp_avg'].shape)}, not {tuple(shapes[n])}")
        m.append(s["exp_avg"].reshape(-1).float())
        v.append(s["exp_avg_sq"].reshape(-1).float())
    return torch.cat(m), torch.cat(v)


class CheckpointFeaturizer:
    """Per-sample LoRA gradients at one checkpoint -> projected "grad" and LESS "adam" features."""

    def __init__(self, info: CheckpointInfo, feature_dim: int, seed: int = 0, micro_batch_size: int = 16):
        from gradsift.engine.gradients import PerSampleGradients
        from gradsift.models.checkpoints import load_checkpoint
        from gradsift.schemas.engine import EngineConfig
        from gradsift.signals.scoring import pick_device

        if not info.meta.get("lora"):
            raise ValueError(f"{info.path}: LESS features need a LoRA checkpoint (meta.json lora), not a full model")
        self.name = checkpoint_name(info)
        self.device = pick_device()
        self.model, self.tokenizer, state, meta = load_checkpoint(info)
        self.model.to(self.device)
        cfg = EngineConfig(
            parameters="lora",
            layer_stats=False,
            feature_dim=feature_dim,
            projection_seed=seed,
            micro_batch_size=micro_batch_size,
        )
        self.engine = PerSampleGradients(self.model, cfg)
        m, v = optimizer_moments(self.model, state, self.engine.param_names)
        self.exp_avg, self.exp_avg_sq = m.to(self.device), v.to(self.device)
        group = state["param_groups"][0]
        self.betas, self.eps = tuple(group["betas"]), float(group["eps"])
        self.label_index = meta.get("label_index")

    def featurize(self, samples: pa.Table) -> dict[str, pa.Table]:
        """Rows of ``features`` for one shard: checkpoint ``CheckpointFeature(name, "grad" / "adam").value``."""
        from gradsift.data.batching import collate, micro_batches
        from gradsift.models.adapter import adapter, task_of
        from gradsift.signals.scoring import features_table

        task = task_of(self.model.get_base_model())
        items = [adapter(task).encode(r, self.tokenizer, self.label_index) for r in samples.to_pylist()]
        rows: dict[str, list[dict]] = {"grad": [], "adam": []}
        proj, names, shapes = self.engine.projector, self.engine.param_names, self.engine.param_shapes
        for group in micro_batches(items, self.engine.config.micro_batch_size):
            flat = self.engine.flat_grads(collate(group, self.tokenizer.pad_token_id).to(self.device)).to(self.device)
            adam = adam_direction(flat, self.exp_avg, self.exp_avg_sq, self.betas, self.eps)
            for kind, g in (("grad", flat), ("adam", adam)):
                value = CheckpointFeature(self.name, kind).value
                feats = proj.project_flat(g, names, shapes).cpu().numpy()
                for it, f in zip(group, feats, strict=True):
                    rows[kind].append(
                        {"checkpoint": value, "dataset": it.dataset, "sample_id": it.sample_id} | {"feature": f}
                    )
        return {kind: features_table(r, proj.feature_dim) for kind, r in rows.items()}


# --------------------------------------------------------------------------------------------
# Reading feature shards


@dataclass(frozen=True)
class FeatureSource:
    """Where one checkpoint's features live in a run's staging folder.

    ``kinds`` maps "grad"/"adam" to the ``checkpoint`` value of their rows; ``checkpoint``: parts are
    ``features/<FeaturePart(shard, checkpoint).name>.parquet`` (None: the score stage's ``features/<shard>``);
    ``lr``: the checkpoint's learning rate."""

    name: str
    lr: float
    kinds: dict[str, str]
    checkpoint: str | None = None

    @classmethod
    def final(cls, checkpoint: str) -> FeatureSource:
        """The score stage's plain gradient features, stored with ``checkpoint`` as their checkpoint value."""
        return cls(checkpoint, 1.0, {"grad": checkpoint})

    @classmethod
    def at_checkpoint(cls, name: str, lr: float) -> FeatureSource:
        """Features computed at training checkpoint ``name`` (``checkpoint_name``): "grad" and LESS "adam"."""
        return cls(name, lr, {kind: CheckpointFeature(name, kind).value for kind in FEATURE_KINDS}, name)

    def part(self, shard: str) -> str:
        return FeaturePart(shard, self.checkpoint).name


def read_block(staging_dir: Path, shards: list[str], sources: list[FeatureSource]) -> tuple[dict, dict]:
    """Features of ``shards`` for every source and kind, rows aligned on the samples parts' order.

    Returns (keys: {"dataset", "sample_id", "domain"} lists, feats: {kind: [pieces per source]}): a source's pieces
    are float16 arrays whose rows, stacked, are the block's (``Rows``; ``np.concatenate`` makes one array). A piece
    is a memory-mapped view of a part's raw rows (``storage.feature_rows``) where the part holds the shard's rows in
    the samples' order, a copy of the rows otherwise; only the parts' key columns are decoded from Parquet."""
    import pyarrow.parquet as pq

    keys: dict[str, list] = {"dataset": [], "sample_id": [], "domain": []}
    feats: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in sources] for k in sources[0].kinds}
    for shard in shards:
        samples = pq.read_table(
            staging_dir / "samples" / f"{shard}.parquet", columns=["dataset", "sample_id", "domain"]
        )
        ids = samples.column("sample_id").to_pylist()
        keys["sample_id"] += ids
        keys["dataset"] += samples.column("dataset").to_pylist()
        keys["domain"] += [
            d or ds
            for d, ds in zip(samples.column("domain").to_pylist(), samples.column("dataset").to_pylist(), strict=True)
        ]
        for j, src in enumerate(sources):
            name = src.part(shard)
            meta = pq.ParquetFile(feature_rows.part_path(staging_dir, name))
            part = meta.read(columns=["checkpoint", "sample_id"])
            mat = feature_rows.read_rows(
                staging_dir, name, len(part), meta.schema_arrow.field("feature").type.list_size
            )
            ckpt = part.column("checkpoint").to_numpy(zero_copy_only=False)
            pid = part.column("sample_id").to_numpy(zero_copy_only=False)
            for kind, value in src.kinds.items():
                sel = ckpt == value
                pos = dict(zip(pid[sel].tolist(), np.flatnonzero(sel).tolist(), strict=True))
                rows = np.fromiter((pos[i] for i in ids), dtype=np.int64, count=len(ids))
                in_order = len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
                feats[kind][j].append(mat[rows[0] : rows[0] + len(rows)] if in_order else mat[rows])
    return keys, feats


# --------------------------------------------------------------------------------------------
# Streaming blocks


def group_shards(shards: list[str], rows: dict[str, int], block_rows: int) -> list[list[str]]:
    """Consecutive shards packed into blocks of at most ``block_rows`` rows (a bigger shard is its own block)."""
    blocks, cur, n = [], [], 0
    for s in shards:
        if cur and n + rows[s] > block_rows:
            blocks.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += rows[s]
    return blocks + ([cur] if cur else [])


def block_items(blocks: list[list[str]], n_actors: int) -> list[tuple[int, list[str], list[str]]]:
    """The pool's items: (index, shards, shards to read ahead). A pool of ``n_actors`` hands block i + n_actors out
    next after block i (to whichever actor is free: the page cache is shared), so that is the block read ahead."""
    return [(i, b, blocks[i + n_actors] if i + n_actors < len(blocks) else []) for i, b in enumerate(blocks)]


def read_targets(
    staging_dir: Path, shards: list[str], sources: list[FeatureSource], datasets: list[str]
) -> tuple[Targets, dict, dict]:
    """The target side read from the target shards' features, each of ``datasets`` a subtask: (Targets, keys,
    feats) with ``read_block``'s keys and feats."""
    keys, feats = read_block(Path(staging_dir), shards, sources)
    targets = Targets(
        [s.name for s in sources],
        [np.concatenate(f).astype(np.float32) for f in feats["grad"]],
        np.array([s.lr for s in sources]),
        np.array([datasets.index(d) for d in keys["dataset"]]),
        keys["sample_id"],
    )
    return targets, keys, feats


def score_block(
    staging_dir: Path,
    shards: list[str],
    sources: list[FeatureSource],
    targets: Targets,
    methods: list,
    top_k: int,
    ahead: list[str] = (),
) -> dict:
    """One block's small result: keys, per-method scores, top-k per target and per-source domain sums of the
    plain gradients, never its feature matrices. A reader thread has the kernel read this block's raw rows and then
    those of the shards ``ahead`` (the block dispatched after this one, ``block_items``) while this block is
    multiplied. Memory: the mapped rows (block_rows * k * 2 bytes * sources, page cache), block_rows * M * 4 bytes
    per method, one ROW_CHUNK x k float32 buffer."""
    parts = [src.part(s) for s in [*shards, *ahead] for src in sources]
    threading.Thread(target=feature_rows.prefetch, args=(Path(staging_dir), parts), daemon=True).start()
    keys, feats = read_block(Path(staging_dir), shards, sources)
    groups = np.asarray(keys["domain"], dtype=object).astype(str)
    res = block_scores(feats, targets, methods, top_k, domains=groups)
    return {"keys": keys, "scores": res.scores, "top_rows": res.top_rows, "top_vals": res.top_vals, "sums": res.sums}


@dataclass
class InfluenceResult:
    """Scores of every training sample and what the mixture and report need."""

    keys: dict[str, list]
    scores: dict[str, np.ndarray]
    top_k: dict[str, tuple[np.ndarray, np.ndarray]]  # method -> (global row ids [k, M], values [k, M])
    domain_sums: list[DomainSums]  # per source (checkpoint), plain gradients
    blocks: int = 0


def merge_blocks(ordered: list[dict], methods: list[Method], top_k: int, n_sources: int) -> InfluenceResult:
    """The blocks' results (``score_block``, in block order) as one result over all training rows."""
    keys = {k: [v for r in ordered for v in r["keys"][k]] for k in ("dataset", "sample_id", "domain")}
    scores = {m: np.concatenate([r["scores"][m] for r in ordered]) for m in methods}
    top = {}
    if top_k:
        offsets = np.cumsum([0] + [len(r["keys"]["sample_id"]) for r in ordered])
        for m in methods:
            top[m] = merge_top_k(
                [(r["top_rows"][m] + off, r["top_vals"][m]) for r, off in zip(ordered, offsets, strict=False)], top_k
            )
    sums = [DomainSums() for _ in range(n_sources)]
    for r in ordered:
        for acc, s in zip(sums, r["sums"], strict=True):
            acc.merge(s)
    return InfluenceResult(keys, scores, top, sums, len(ordered))
