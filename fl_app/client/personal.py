"""The layers that never leave this site (``share.layers``; docs/personalization.md).

A run that shares only some parameters (FedPer's body, FedBN's non-normalization layers)
sends each client the global model's *shared* layers; the client completes its model with
its own values of the others, trains the whole model, keeps the new values of its layers
and lets only the shared part into the privacy pipeline (:mod:`fl_app.client.pipeline`).
So Δ, its clip, its noise, its encoding and its mask cover the shared layers alone, and
the server never receives a kept parameter, whatever the privacy mode.

The kept layers persist in the site's state folder (node-config ``dp-state-dir``, else the
spec's ``share_state_dir``; the same folder as DP-SGD's accountant), one safetensors file
per run and site (never pickle), written atomically after each round's training: a
restarted SuperNode resumes with its own values. On first use they take the initial
model's values (``build_model`` seeded with the run's seed, as the server's initial model).

Before training the client checks what it was asked: the instruction's weights are exactly
the shared layers (a server sending a kept layer, or omitting a shared one, is refused),
and the site policy's ``allowed_share_artifacts`` and ``shareable_layers`` allow the run's
declaration (a structured :class:`~fl_app.client.refusal.PolicyRefusal` otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context

from fl_app.client.identity import DP_STATE_DIR_KEY, SAFE_RUN_KEY, site_identity
from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.client.refusal import ClientRefusal, PolicyRefusal
from fl_app.client_spec import ClientSpec
from fl_app.share_layers import shared_names

__all__ = ["SiteLayers", "kept_layers_path", "site_layers"]

Arrays = dict[str, np.ndarray]
TrainThunk = Callable[[], tuple[Arrays, Any]]


def kept_layers_path(state_dir: str | Path, run_key: str, site: str) -> Path:
    """The file of one site's kept layers in one run."""
    if not SAFE_RUN_KEY.fullmatch(run_key or ""):
        raise ClientRefusal(f"run key {run_key!r} is not a safe file-name component")
    return Path(state_dir) / f"personal-{run_key}-{site}.safetensors"


@dataclass
class SiteLayers:
    """This site's kept layers for one instruction (``path`` None: it keeps none)."""

    shared: list[str]
    kept: Arrays
    path: Path | None

    def full_model(self, global_arrays: Mapping[str, np.ndarray]) -> Arrays:
        """The model this site trains and evaluates: the global shared layers, its own rest."""
        return {**global_arrays, **self.kept}

    def strip(self, train: TrainThunk) -> TrainThunk:
        """``train`` returning only the shared layers; the kept ones saved first."""
        if self.path is None:
            return train

        def stripped() -> tuple[Arrays, Any]:
            local, stats = train()
            kept = {n: v for n, v in local.items() if n not in set(self.shared)}
            self.save(kept)
            return {n: local[n] for n in self.shared}, stats

        return stripped

    def save(self, kept: Arrays) -> None:
        from fl_app.weights import save_safetensors

        assert self.path is not None
        save_safetensors(self.path, kept, {"fl-app": "kept-layers"})


def site_layers(
    spec: ClientSpec,
    context: Context,
    model: Any,
    arrays: Mapping[str, np.ndarray],
    policy: SitePolicy | None,
    message_type: str,
) -> SiteLayers:
    """Check the instruction's weights and the site policy; load this site's kept layers."""
    names = list(model.state_dict())
    shared = shared_names(names, list(spec.share.layers))
    if list(arrays) != shared:
        raise ClientRefusal(
            f"the instruction's weights {list(arrays)} are not the run's shared layers "
            f"(share.layers={list(spec.share.layers)} selects {shared})"
        )
    if policy is not None and message_type == "train":
        try:
            policy.check_share(spec.share.artifact.value, shared)
        except PolicyViolation as err:
            raise PolicyRefusal(err) from err
    kept_names = [n for n in names if n not in set(shared)]
    if not kept_names:
        return SiteLayers(shared, {}, None)
    state_dir = context.node_config.get(DP_STATE_DIR_KEY) or spec.share_state_dir
    if not state_dir:
        raise ClientRefusal(
            "share.layers keeps layers at the site, which needs a state folder: run the "
            'SuperNode with --node-config "dp-state-dir=/path"'
        )
    path = kept_layers_path(str(state_dir), spec.run_key, site_identity(context.node_config))
    kept = _load(path, model, kept_names) if path.exists() else _initial(spec, kept_names)
    return SiteLayers(shared, kept, path)


def _load(path: Path, model: Any, kept_names: list[str]) -> Arrays:
    from fl_app.weights import load_safetensors

    try:
        arrays, _meta = load_safetensors(path)
    except ValueError as err:
        raise ClientRefusal(f"kept layers: {err}") from err
    state = model.state_dict()
    if sorted(arrays) != sorted(kept_names) or any(
        tuple(arrays[n].shape) != tuple(state[n].shape) for n in kept_names
    ):
        raise ClientRefusal(
            f"kept layers in {path} hold {sorted(arrays)}, not this run's {kept_names} with "
            "the model's shapes; move the file away to start from the initial values"
        )
    return {n: arrays[n] for n in kept_names}


def _initial(spec: ClientSpec, kept_names: list[str]) -> Arrays:
    """The initial model's values (the run's seed, as the server's initial model)."""
    from fl_app.models import build_model
    from fl_app.weights import model_to_ndarrays

    model = build_model(
        spec.model, spec.dataset.input_shape, spec.dataset.num_classes, seed=spec.seed
    )
    full = model_to_ndarrays(model)
    return {n: full[n] for n in kept_names}
