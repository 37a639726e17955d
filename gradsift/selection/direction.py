"""Which end of a score to drop, read from the proxy's training dynamics (pure numpy).

Sorscher et al. 2022 ("Beyond neural scaling laws: beating power law scaling via data pruning"): when data are
plentiful for the model, keep the hard samples (drop easy); when scarce, keep the easy ones (drop hard). What
"plentiful" means is read from the proxy itself, as in the data maps of Swayamdipta et al. 2020 ("Dataset
Cartography"): a proxy that reaches a high held-out accuracy, leaves few samples never learned and learns most
samples early has data to spare (the easy samples are redundant); one with a low held-out accuracy, many
never-learned or late-learned samples is still data-starved (the hard samples are noise or out of its reach).
Sorscher et al.'s regimes assume training to convergence; a retrain of a pruned subset for the same epochs takes
fewer steps, so a proxy whose training accuracy still rose over its last epoch counts as scarce too: the step budget
is what is short, and the hard samples would not be fit in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

PLENTIFUL_ACCURACY = 0.85
"""Held-out accuracy of the proxy from which the data count as plentiful."""
MAX_NEVER_LEARNED = 0.15
"""Never-learned fraction above which the data count as scarce, whatever the accuracy."""
MAX_LAST_EPOCH_GAIN = 0.01
"""Rise of the training accuracy over the last epoch above which the proxy counts as still learning (scarce)."""


@dataclass(frozen=True)
class Direction:
    """The rule's answer and the dynamics it read."""

    drop: Literal["easy", "hard"]
    accuracy: float
    never_learned: float
    median_first_learned: float  # as a fraction of the epochs; 1.0 when half or more are never learned
    last_epoch_gain: float  # training accuracy at the last epoch minus at the one before (0.0 with one epoch)
    reason: str


def first_learned(correct: np.ndarray) -> np.ndarray:
    """Epoch index from which each sample stays correct ([N, E] bool -> [N]; E when it never does)."""
    c = np.asarray(correct, dtype=bool)
    n, e = c.shape
    stays = np.flip(np.logical_and.accumulate(np.flip(c, axis=1), axis=1), axis=1)  # correct from here to the end
    return np.where(stays.any(axis=1), stays.argmax(axis=1), e)


def direction_rule(accuracy: float, correct: np.ndarray) -> Direction:
    """Drop easy when the proxy's held-out ``accuracy`` >= ``PLENTIFUL_ACCURACY``, at most ``MAX_NEVER_LEARNED`` of
    the samples are never learned, half are learned within the first half of the epochs and the training accuracy
    rose by at most ``MAX_LAST_EPOCH_GAIN`` over the last epoch; else drop hard.
    ``correct``: [N, E] whether each training sample was classified correctly at each epoch."""
    c = np.asarray(correct, dtype=bool)
    epochs = c.shape[1]
    never = float((~c.any(axis=1)).mean())
    median = min(float(np.median(first_learned(c))) + 1, epochs) / epochs  # epochs it takes, as a fraction
    gain = float(c[:, -1].mean() - c[:, -2].mean()) if epochs > 1 else 0.0
    plentiful = (
        accuracy >= PLENTIFUL_ACCURACY and never <= MAX_NEVER_LEARNED and median <= 0.5 and gain <= MAX_LAST_EPOCH_GAIN
    )
    drop: Literal["easy", "hard"] = "easy" if plentiful else "hard"
    reason = (
        f"proxy held-out accuracy {accuracy:.3f}, never learned {never:.1%}, half learned by {median:.0%} of the "
        f"epochs, training accuracy {gain:+.1%} over the last epoch: data {'plentiful' if plentiful else 'scarce'} "
        f"for the model, drop {drop} (Sorscher et al. 2022)"
    )
    return Direction(drop, float(accuracy), never, median, gain, reason)


def visits_direction(
    checkpoint: np.ndarray, sample_id: np.ndarray, epoch: np.ndarray, step: np.ndarray, correct: np.ndarray
) -> Direction:
    """The rule on a train run's visit log (one row per visit; ``checkpoint`` names the seed), for a run without a
    held-out split: the accuracy is that of the second half of each seed's first-epoch visits, each sample predicted
    before the model trained on it (progressive validation, Blum, Kalai & Langford 1999); ``correct`` [N, E] per
    seed from its visits in step order, the seeds' samples stacked."""
    heldout, rows = [], []
    for ck in np.unique(checkpoint):
        m = checkpoint == ck
        first = m & (epoch == epoch[m].min())
        heldout.append(correct[first & (step > np.median(step[first]))])
        order = np.lexsort((step[m], sample_id[m]))
        rows.append(correct[m][order].reshape(len(np.unique(sample_id[m])), -1))
    found = direction_rule(float(np.concatenate(heldout).mean()), np.concatenate(rows))
    reason = found.reason.replace("held-out accuracy", "progressive accuracy (first epoch, second half)")
    return Direction(
        found.drop, found.accuracy, found.never_learned, found.median_first_learned, found.last_epoch_gain, reason
    )
