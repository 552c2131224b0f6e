"""Checks on ``share`` (what leaves a site): the declared artifact and the shared layers.

A pattern that selects no parameter of the model is refused (a typo would keep a layer
at the sites that was meant to be averaged), and so is an empty list: every pattern
selecting something means something is shared. ``share.artifact=weights`` is refused
where the update must be bounded (client-level DP clips Δ, secure aggregation encodes
Δ within a bound): a weight vector's norm is not the update's sensitivity.
``compressed`` needs ``share.compression``, which this version does not have yet. With
layers kept at the sites the server's own evaluation is refused: the global model lacks
them, and scoring it with their initial values would report a meaningless accuracy.
"""

from __future__ import annotations

from fl_app.config.errors import ConfigRangeError
from fl_app.config.errors import require as _check
from fl_app.config.schema import AppConfig, PrivacyMode, SecAggMode, ShareArtifact
from fl_app.share_layers import shared_names, unmatched_patterns

__all__ = ["check_share", "model_state_names"]


_NAMES: dict[tuple[str, tuple[int, ...], int], tuple[str, ...]] = {}


def model_state_names(cfg: AppConfig) -> tuple[str, ...]:
    """The ``state_dict`` names of ``cfg.model`` (built once per model config)."""
    key = (repr(cfg.model), tuple(cfg.dataset.input_shape), int(cfg.dataset.num_classes))
    if key not in _NAMES:
        from fl_app.models import build_model

        model = build_model(cfg.model, list(key[1]), key[2], seed=0)
        _NAMES[key] = tuple(model.state_dict())
    return _NAMES[key]


def check_share(cfg: AppConfig) -> None:
    s = cfg.share
    artifact = ShareArtifact(s.artifact)
    _check(
        artifact is not ShareArtifact.compressed,
        "share.artifact",
        artifact.value,
        "'compressed' needs share.compression, which this version does not have; use "
        "share.artifact=delta",
    )
    if artifact is ShareArtifact.weights:
        _check(
            PrivacyMode(cfg.privacy.mode) is PrivacyMode.none
            and SecAggMode(cfg.secagg.mode) is SecAggMode.off,
            "share.artifact",
            artifact.value,
            "'weights' only with privacy.mode=none and secagg=off: client-level DP and "
            "secure aggregation bound the update Δ, not the weights; use share.artifact=delta",
        )
    _check(
        len(s.layers) > 0,
        "share.layers",
        list(s.layers),
        'must list at least one pattern (["*"] shares every layer)',
        ConfigRangeError,
    )
    names = model_state_names(cfg)
    unmatched = unmatched_patterns(names, list(s.layers))
    _check(
        not unmatched,
        "share.layers",
        list(s.layers),
        f"patterns {unmatched} match no parameter of model {cfg.model.name.value!r} "
        f"(its names: {list(names)})",
        ConfigRangeError,
    )
    kept = [n for n in names if n not in set(shared_names(names, list(s.layers)))]
    _check(
        not (kept and cfg.server_eval),
        "server_eval",
        cfg.server_eval,
        f"the global model lacks the layers the sites keep ({kept[:4]}): the server would "
        "score it with their initial values; set server_eval=false (each site's federated "
        "evaluation scores its personalized model)",
    )
