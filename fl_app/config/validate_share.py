"""Checks on ``share`` (what leaves a site): the declared artifact and the shared layers.

A pattern that selects no parameter of the model is refused (a typo would keep a layer
at the sites that was meant to be averaged), and so is an empty list: every pattern
selecting something means something is shared. ``share.artifact=weights`` is refused
where the update must be bounded (client-level DP clips Δ, secure aggregation encodes
Δ within a bound): a weight vector's norm is not the update's sensitivity.
``compressed`` and ``share.compression`` go together (docs/compression.md). With
layers kept at the sites the server's own evaluation is refused: the global model lacks
them, and scoring it with their initial values would report a meaningless accuracy.
"""

from __future__ import annotations

from fl_app.config.errors import ConfigRangeError, require_fraction
from fl_app.config.errors import require as _check
from fl_app.config.schema import (
    AppConfig,
    PrivacyMode,
    SecAggMode,
    ShareArtifact,
    ShareCompression,
)
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
    _check_compression(cfg, artifact)
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
        f"the global model lacks the layers the sites keep ({kept}): the server would "
        "score it with their initial values; set server_eval=false (each site's federated "
        "evaluation scores its personalized model)",
    )


def _check_compression(cfg: AppConfig, artifact: ShareArtifact) -> None:
    """``share.compression`` and ``share.ratio`` (docs/compression.md).

    The declared artifact says what leaves a site, so ``compressed`` and a compression
    other than ``none`` go together. top-k sends a data-dependent support (which
    coordinates are largest): under secure aggregation the supports differ between
    clients and would have to be sent in the clear, and under local or distributed DP the
    support itself is an un-noised function of the data. So top-k is refused wherever the
    server must not see an individual update: it is allowed with ``privacy.mode`` ``none``
    or ``central`` (trusted server) without secure aggregation, where the server sees each
    update anyway and scatters it before aggregation, so clipping the sent values keeps
    central DP's sensitivity at ``C``. DP-SGD (``privacy.record_level``) does not change
    this: the sent vector is post-processing of the site's DP-SGD outputs (Δ and the
    residual of earlier Δs), so its support releases nothing about a record beyond the
    record-level ε; the checks above still decide who sees it. random-k, whose mask is
    public, works under every mode, and so does the count sketch, whose hashes are public
    (the same for every client of a round), so the sketches sum under secure aggregation
    and distributed DP (DP-FTRL refuses both in validate_privacy: per-round masks and
    hashes change the tree's vector space every round).
    """
    s = cfg.share
    comp = ShareCompression(s.compression)
    require_fraction(float(s.ratio), "share.ratio", allow_zero=False)
    _check(
        (artifact is ShareArtifact.compressed) == (comp is not ShareCompression.none),
        "share.artifact",
        artifact.value,
        "'compressed' goes with share.compression=randk, topk or sketch, and share.compression "
        f"{comp.value!r} with share.artifact=compressed; set both or neither",
    )
    if comp is ShareCompression.topk:
        _check(
            SecAggMode(cfg.secagg.mode) is SecAggMode.off
            and PrivacyMode(cfg.privacy.mode) in (PrivacyMode.none, PrivacyMode.central),
            "share.compression",
            comp.value,
            "top-k's support (which coordinates are largest) depends on the data and "
            "differs per client: it leaks under secure aggregation and local/distributed "
            "DP; use share.compression=randk (a public per-round mask)",
        )
    if comp is ShareCompression.sketch:
        _check_sketch(cfg)


def _check_sketch(cfg: AppConfig) -> None:
    """``share.sketch_rows``: an integer >= 1, and at most ``ceil(ratio · d)`` so that the
    ``r · c`` cells sent (``c >= 1`` columns) stay within the ratio
    (fl_app/compression_sketch.py)."""
    from fl_app.compression import compressed_length
    from fl_app.config.client_dp import shared_dimension

    rows = cfg.share.sketch_rows
    _check(
        not isinstance(rows, bool) and isinstance(rows, int) and rows >= 1,
        "share.sketch_rows",
        rows,
        "must be an integer >= 1 (rows of the count sketch; 5 is FetchSGD's choice)",
        ConfigRangeError,
    )
    cells = compressed_length(shared_dimension(cfg), float(cfg.share.ratio))
    _check(
        rows <= cells,
        "share.sketch_rows",
        rows,
        f"a sketch of {rows} rows needs at least {rows} cells, and share.ratio="
        f"{cfg.share.ratio} gives ceil(ratio * d) = {cells}; lower share.sketch_rows or "
        "raise share.ratio",
        ConfigRangeError,
    )
