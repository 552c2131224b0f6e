"""A train instruction end to end: local training, the privacy stages, the reply.

:func:`train` runs the fixed pipeline (:mod:`fl_app.client.pipeline`) with the stages
this round asks for (:mod:`fl_app.client.dp_stages`) and replies with the update and
the metrics the threat model lets the server see; under secure aggregation
:func:`secure_train` encodes and masks the update (stage 3) and everything but the
protocol's public numbers rides inside the masked vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from fl_app.client.dp_stages import client_dp_stages, prepare_dpsgd
from fl_app.client.error_feedback import TopKStage, topk_stage
from fl_app.client.instruction import prepare, training_seed
from fl_app.client.personal import SiteLayers, site_layers
from fl_app.client.policy import SitePolicy
from fl_app.client.refusal import ClientRefusal
from fl_app.client_spec import ClientSpec
from fl_app.config.schema import ShareArtifact, ShareCompression
from fl_app.protocol import (
    CLIP_NORM_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    UNCLIPPED_KEY,
    UPDATE_KEY,
)

__all__ = ["HIDDEN_MODE_PUBLIC_METRICS", "hidden_mode_public", "secure_train", "train"]

TrainThunk = Callable[[], tuple[dict[str, np.ndarray], Any]]


def train(msg: Message, context: Context, secure: Any, policy: SitePolicy | None) -> Message:
    """Train, clip, noise (plain reply) or hand over to :func:`secure_train` (stage 3)."""
    from fl_app.client.pipeline import PipelineStages, run_train_pipeline
    from fl_app.weights import to_array_record

    spec, rnd, arrays, config, pid, data, model = prepare(msg, context, policy, "train", secure)
    site = site_layers(spec, context, model, arrays, policy, "train")
    if len(data.train) == 0:
        raise ClientRefusal("no local training examples in this partition")
    mu = config.get(PROXIMAL_MU, 0.0)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0:
        raise ClientRefusal(f"'{PROXIMAL_MU}' must be a number >= 0, got {mu!r}")
    local_train, dp_metrics = _train_thunk(spec, rnd, config, context, pid, data, model, mu, policy)
    dp_metrics.update(_device_metrics(model))
    # Only the shared layers go on to Δ, clip, noise, encode and mask (docs/personalization.md).
    local_train = site.strip(local_train)
    weights: list[dict[str, np.ndarray]] = []  # share.artifact=weights: what is sent
    if ShareArtifact(spec.share.artifact) is ShareArtifact.weights:
        _refuse_unbounded_weights(spec)
        local_train = _keeping(local_train, weights)
    load = _loader(model, site)
    compress = _compress_stage(spec, rnd, context, secure is not None)
    clip_stage, noise_stage, client_dp_metrics = client_dp_stages(
        spec, rnd, config, context, pid, policy
    )
    if secure is not None:
        return secure_train(
            msg,
            context,
            secure,
            spec,
            config,
            arrays,
            load,
            local_train,
            clip_stage,
            noise_stage,
            client_dp_metrics,
            dp_metrics,
            compress,
        )
    result = run_train_pipeline(
        arrays,
        PipelineStages(
            load=load, train=local_train, compress=compress, clip=clip_stage, noise=noise_stage
        ),
    )
    dp_metrics.update(client_dp_metrics)
    plain, dp_metrics = _plain_metrics(spec, result.stats, noise_stage, dp_metrics)
    metrics = MetricRecord({**plain, SERVER_ROUND: rnd, **dp_metrics})
    # Weights instead of Δ only where nothing bounds Δ (validate_share): the server,
    # trusted with Δ and holding w_global, learns nothing more from w = w_global + Δ.
    update = weights[-1] if weights else result.update
    if isinstance(compress, TopKStage):  # the (clipped) values with their indices
        update = compress.reply(update)
    content = RecordDict({UPDATE_KEY: to_array_record(update), METRICS_KEY: metrics})
    return Message(content, reply_to=msg)


def _refuse_unbounded_weights(spec: ClientSpec) -> None:
    """``share.artifact=weights`` sends the trained weights in place of the stages' output,
    so it would skip compress, clip and noise: refused where the spec asks for any of them
    (the server's validator refuses the same, validate_share; the client does not take its
    word for it: a deviating server could otherwise get un-noised weights under local DP)."""
    if spec.client_dp is not None or (
        ShareCompression(spec.share.compression) is not ShareCompression.none
    ):
        raise ClientRefusal(
            "share.artifact=weights would send this client's trained weights unclipped, "
            "un-noised and uncompressed, but the spec asks for client-level DP or "
            "share.compression; refused (use share.artifact=delta)"
        )


def _keeping(train: TrainThunk, out: list[dict[str, np.ndarray]]) -> TrainThunk:
    """``train`` that also appends the trained (shared) weights to ``out``."""

    def kept() -> tuple[dict[str, np.ndarray], Any]:
        local, stats = train()
        out.append(local)
        return local, stats

    return kept


def _compress_stage(
    spec: ClientSpec, rnd: int, context: Context, secure: bool
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None:
    """random-k's, top-k's or the count sketch's compress stage (``share.compression``;
    docs/compression.md), or None. top-k's keeps this site's residual in its state folder
    (error feedback). The sketch's clip is the clip stage after this one: it bounds the
    sketch, which is what is sent (fl_app/compression_sketch.py)."""
    if ShareCompression(spec.share.compression) is ShareCompression.none:
        return None
    if ShareCompression(spec.share.compression) is ShareCompression.topk:
        return topk_stage(spec, context.node_config, secure)
    if ShareCompression(spec.share.compression) is ShareCompression.sketch:
        from fl_app.compression_sketch import CountSketch

        sketch = CountSketch(spec.run_key, float(spec.share.ratio), int(spec.share.sketch_rows))
        return lambda update: sketch.compress(rnd, update)
    from fl_app.compression import RandK

    randk = RandK(spec.run_key, float(spec.share.ratio))
    return lambda update: randk.compress(rnd, update)


def _loader(model: Any, site: SiteLayers) -> Callable[[Mapping[str, np.ndarray]], None]:
    """Stage 1: the global shared layers into the model, with this site's kept layers."""
    from fl_app.weights import load_ndarrays

    def load(arrays: Mapping[str, np.ndarray]) -> None:
        load_ndarrays(model, site.full_model(arrays))

    return load


def _train_thunk(
    spec: ClientSpec,
    rnd: int,
    config: Any,
    context: Context,
    pid: int,
    data: Any,
    model: Any,
    mu: float,
    policy: SitePolicy | None,
) -> tuple[TrainThunk, dict[str, float]]:
    """The local-training stage (plain, or DP-SGD after its budget checks) and DP-SGD's
    public metrics (``{}`` for plain training)."""
    import torch

    from fl_app.training import train_local
    from fl_app.weights import model_to_ndarrays

    generator = torch.Generator().manual_seed(training_seed(spec.seed, rnd, pid))
    if spec.dpsgd is None:

        def plain_train() -> tuple[dict[str, np.ndarray], Any]:
            stats = train_local(
                model,
                data.train.x,
                data.train.y,
                spec.train,
                generator=generator,
                proximal_mu=float(mu),
            )
            return model_to_ndarrays(model), stats

        return plain_train, {}

    dp_train, dp_metrics = prepare_dpsgd(
        spec, rnd, config, context, pid, data, model, generator, policy
    )

    def dpsgd_train() -> tuple[dict[str, np.ndarray], Any]:
        stats = dp_train()  # trains `model` in place; read its weights afterwards
        return model_to_ndarrays(model), stats

    return dpsgd_train, dp_metrics


def _device_metrics(model: Any) -> dict[str, float]:
    """The device this client trains on, as public metrics (none on the CPU: a reply
    from a CPU-only site is exactly what it was before devices existed)."""
    from fl_app.device import device_metrics

    return device_metrics(next(iter(model.parameters())).device)


def _plain_metrics(
    spec: ClientSpec, stats: Any, noise_stage: Any, dp_metrics: dict[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """The training numbers a plain reply carries, and the DP metrics it may carry."""
    if noise_stage is not None:
        # Local DP: the server is not trusted with anything un-noised from this client,
        # and nothing can hide a number from it here (no secure aggregation). The loss,
        # accuracy and example count are left out; every client weighs the same (1).
        plain: dict[str, float] = {NUM_EXAMPLES: 1}
        return plain, hidden_mode_public(dp_metrics)
    if spec.dpsgd is not None:
        # Record-level DP: the loss and accuracy on this site's records are un-noised
        # functions of them, outside DP-SGD's epsilon. The example count stays: it is
        # FedAvg's weight and public here anyway (the sample rate and steps give it).
        return {NUM_EXAMPLES: int(stats.num_examples)}, dp_metrics
    plain = {
        NUM_EXAMPLES: int(stats.num_examples),
        "train-loss": float(stats.loss),
        "train-accuracy": float(stats.accuracy),
    }
    return plain, dp_metrics


def secure_train(
    msg: Message,
    context: Context,
    secure: Any,
    spec: ClientSpec,
    config: Any,
    arrays: dict[str, np.ndarray],
    load: Callable[[Mapping[str, np.ndarray]], None],
    local_train: TrainThunk,
    clip_stage: Any,
    noise_stage: Any,
    client_dp_metrics: dict[str, float],
    dp_metrics: dict[str, float],
    compress: Any = None,
) -> Message:
    """Stage 3 of secure aggregation: train, clip, encode, mask; reply with the masked vector.

    The update must be bounded to be encoded: the client-level DP clip norm when
    clients clip (it must equal the round's encoding bound), else the bound itself.
    Weight, the unclipped bit and the training metrics ride inside the masked vector;
    the plaintext reply carries only the round and the stage.
    """
    from fl_app.client.pipeline import PipelineStages, run_train_pipeline

    if noise_stage is not None:
        raise ClientRefusal(
            "secure aggregation: local DP noise is unbounded and cannot be encoded; the "
            "server must not combine privacy.mode=local with secagg"
        )
    clip_stage = _bounded_clip(clip_stage, secure.bound, config)
    seen: list[Any] = []

    def train_and_keep_stats() -> tuple[dict[str, np.ndarray], Any]:
        local, stats = local_train()
        seen.append(stats)
        return local, stats

    def encode(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = seen[-1]
        unclipped = client_dp_metrics.get(UNCLIPPED_KEY, 0.0) if spec.client_dp else 0.0
        encoded = secure.encode(
            update,
            num_examples=float(stats.num_examples),
            loss=float(stats.loss),
            accuracy=float(stats.accuracy),
            unclipped=float(unclipped),
        )
        return {"encoded": encoded}

    def mask(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"masked": secure.mask(encoded["encoded"], context)}

    result = run_train_pipeline(
        arrays,
        PipelineStages(
            load=load,
            train=train_and_keep_stats,
            compress=compress,
            clip=clip_stage,
            encode=encode,
            mask=mask,
        ),
    )
    # Only the public numbers the protocol needs stay in plaintext (record-level ε, rounds).
    public = hidden_mode_public(dp_metrics)
    return cast(Message, secure.reply(msg, result.update["masked"], public))


def _bounded_clip(clip_stage: Any, bound: Any, config: Any) -> Any:
    """The clip stage of a secure round: the update must be bounded to be encoded, by the
    client-level DP clip norm when clients clip (it must equal the encoding bound), else
    by the bound itself."""
    from fl_app.privacy.clipping import clip_l2

    if clip_stage is None:

        def clip_to_bound(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return clip_l2(update, bound).arrays

        return clip_to_bound
    if config.get(CLIP_NORM_KEY) != bound:
        raise ClientRefusal(
            f"secure aggregation: encoding bound {bound!r} differs from the clip norm "
            f"'{CLIP_NORM_KEY}'={config.get(CLIP_NORM_KEY)!r}"
        )
    return clip_stage


# What a client tells a server that the threat model keeps from its data (secure
# aggregation, local DP): numbers the protocol needs, listed as public in the README and
# the model card. DP-SGD's steps, sample rate and calibrated z are left out: each gives
# the site's record count to within a batch. ε is kept (the per-institution guarantee
# the run reports); it too is a function of the record count, which the README says.
HIDDEN_MODE_PUBLIC_METRICS = frozenset(
    {
        "dp-epsilon",
        "dp-delta",
        "dp-rounds",
        "dp-partition-id",
        "dp-site-hash",
        "dp-local-epsilon",
        "dp-local-releases",
        # The accelerator the site trains on (fl_app.device): hardware, not a function
        # of any record; sent only when it is not the CPU.
        "dp-device-type",
        "dp-device-index",
    }
)


def hidden_mode_public(metrics: dict[str, float]) -> dict[str, float]:
    """Only the metrics a hidden-mode reply may carry in plaintext."""
    return {k: v for k, v in metrics.items() if k in HIDDEN_MODE_PUBLIC_METRICS}
