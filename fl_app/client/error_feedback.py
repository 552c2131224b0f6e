"""top-k's residual, kept at the site across rounds and restarts (docs/compression.md).

Error feedback (:mod:`fl_app.compression_topk`) needs each site's residual ``e`` from
one round to the next. It never leaves the site: it lives in the site's state folder
(node-config ``dp-state-dir``, else the spec's ``share_state_dir``; the folder of the
kept layers and DP-SGD's accountant), one safetensors file per run and site (never
pickle), written atomically by :func:`fl_app.weights.save_safetensors` when the round's
update is compressed, so a restarted SuperNode resumes with the same residual, bit for bit.

The residual is ``(Δ + e) − topk(Δ + e)`` *before* clipping: the clip stage that follows
bounds what is sent, and what the clip removes is not fed back (feeding it back would
let the residual grow without bound under a small clip norm). A reply that is lost after
the residual was written loses those coordinates' values, like any dropped update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.client.identity import DP_STATE_DIR_KEY, SAFE_RUN_KEY, site_identity
from fl_app.client.refusal import ClientRefusal
from fl_app.client_spec import ClientSpec
from fl_app.compression_topk import INDICES_KEY, TopK

__all__ = ["RESIDUAL_KEY", "TopKStage", "residual_path", "topk_stage"]

Arrays = dict[str, np.ndarray]
RESIDUAL_KEY = "residual"


def residual_path(state_dir: str | Path, run_key: str, site: str) -> Path:
    """The file of one site's top-k residual in one run."""
    if not SAFE_RUN_KEY.fullmatch(run_key or ""):
        raise ClientRefusal(f"run key {run_key!r} is not a safe file-name component")
    return Path(state_dir) / f"topk-residual-{run_key}-{site}.safetensors"


def load_residual(path: Path, dimension: int) -> np.ndarray | None:
    """The residual kept in ``path`` (None: no file yet, a site's first round)."""
    if not path.exists():
        return None
    from fl_app.weights import load_safetensors

    try:
        arrays, _meta = load_safetensors(path)
    except ValueError as err:
        raise ClientRefusal(f"top-k residual: {err}") from err
    residual = arrays.get(RESIDUAL_KEY)
    if list(arrays) != [RESIDUAL_KEY] or residual is None or residual.shape != (dimension,):
        raise ClientRefusal(
            f"top-k residual in {path} is not one vector of the shared layers' {dimension} "
            "coordinates; move the file away to start from a zero residual"
        )
    return np.asarray(residual, dtype=np.float64)


@dataclass
class TopKStage:
    """The compress stage of one top-k round: sends ``values`` through clip and noise and
    holds back ``indices`` (clipping must not scale them) for the reply (:meth:`reply`)."""

    topk: TopK
    path: Path
    indices: list[np.ndarray] = field(default_factory=list)

    def __call__(self, update: Arrays) -> Arrays:
        from fl_app.weights import save_safetensors

        dimension = int(sum(int(np.asarray(a).size) for a in update.values()))
        wire, left = self.topk.compress(update, load_residual(self.path, dimension))
        save_safetensors(self.path, {RESIDUAL_KEY: left}, {"fl-app": "topk-residual"})
        self.indices.append(wire.pop(INDICES_KEY))
        return wire

    def reply(self, sent: Arrays) -> Arrays:
        """What leaves the site: the (clipped) values with their indices."""
        return {INDICES_KEY: self.indices[-1], **sent}


def topk_stage(spec: ClientSpec, node_config: Any, secure: bool) -> TopKStage:
    """This site's top-k stage, its residual file in the site's state folder.

    Refused here too, not only by the server's config check, where the support would
    leave the site outside what the server sees anyway: under secure aggregation
    (``secure``) or with local DP noise (a server could send such a spec)."""
    local = spec.client_dp is not None and bool(spec.client_dp.local_noise_multiplier)
    if secure or local:
        raise ClientRefusal(
            "share.compression=topk sends a data-dependent support: refused under "
            f"{'secure aggregation' if secure else 'local DP'}; use share.compression=randk"
        )
    state_dir = node_config.get(DP_STATE_DIR_KEY) or spec.share_state_dir
    if not state_dir:
        raise ClientRefusal(
            "share.compression=topk keeps a residual at the site, which needs a state "
            'folder: run the SuperNode with --node-config "dp-state-dir=/path"'
        )
    path = residual_path(str(state_dir), spec.run_key, site_identity(node_config))
    return TopKStage(TopK(float(spec.share.ratio)), path)
