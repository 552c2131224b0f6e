"""The client's train pipeline: the one place that fixes the order of privacy stages.

Order (docs/architecture.md, The privacy stage order), never decided by configuration:

1. load the global weights;
2. local training (plain, or Opacus DP-SGD once record-level DP lands);
3. update Δ = w_local − w_global;
   then compress Δ (``share.compression``: random-k's public coordinates; the stages
   below see the short vector, docs/compression.md);
4. clip Δ (client-level DP);
5. noise: local-DP noise;
6. encode: fixed-point stochastic rounding, or, under distributed DP, rotation +
   conditional rounding to integers + this client's discrete Gaussian noise share
   (the share is integer-valued, so it is added after rounding, as in Kairouz et al.
   2021; both happen inside the encode stage, in that fixed order);
7. mask (secure aggregation);
8. reply.

Configuration chooses *which* of compress and stages 4-7 run (``None`` = off); it cannot reorder
them. Each stage that runs is recorded in :attr:`PipelineResult.stages_run`, which the
client reports and tests assert with a recording double. The stages are plain
callables on ``dict[str, np.ndarray]`` so each privacy layer is a small, separately
tested function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

__all__ = ["STAGE_ORDER", "PipelineResult", "PipelineStages", "run_train_pipeline"]

Arrays = dict[str, np.ndarray]
ArrayStage = Callable[[Arrays], Arrays]
S = TypeVar("S")

STAGE_ORDER = ("load", "train", "delta", "compress", "clip", "noise", "encode", "mask")


@dataclass(frozen=True)
class PipelineStages(Generic[S]):
    """The stages one client runs this round.

    ``load`` puts the global weights into the local model; ``train`` trains it and
    returns ``(local_weights, stats)``. ``compress``/``clip``/``noise``/``encode``/``mask``
    are optional transforms of the update.
    """

    load: Callable[[Mapping[str, np.ndarray]], None]
    train: Callable[[], tuple[Arrays, S]]
    compress: ArrayStage | None = None
    clip: ArrayStage | None = None
    noise: ArrayStage | None = None
    encode: ArrayStage | None = None
    mask: ArrayStage | None = None


@dataclass
class PipelineResult(Generic[S]):
    update: Arrays
    stats: S
    stages_run: list[str] = field(default_factory=list)


def _delta(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> Arrays:
    if list(local) != list(global_):
        raise ValueError("local and global weights have different array names")
    return {
        k: (local[k].astype(np.float64) - global_[k].astype(np.float64)).astype(global_[k].dtype)
        for k in global_
    }


def run_train_pipeline(
    global_arrays: Mapping[str, np.ndarray], stages: PipelineStages[S]
) -> PipelineResult[S]:
    """Run stages 1-7 in the fixed order above and return the update to send."""
    ran: list[str] = []
    stages.load(global_arrays)
    ran.append("load")
    local, stats = stages.train()
    ran.append("train")
    update = _delta(local, global_arrays)
    ran.append("delta")
    for name in ("compress", "clip", "noise", "encode", "mask"):
        stage = getattr(stages, name)
        if stage is not None:
            update = stage(update)
            ran.append(name)
    return PipelineResult(update=update, stats=stats, stages_run=ran)
