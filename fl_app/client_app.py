"""fl-app's ClientApp (Flower Message API: ``@app.train``, ``@app.evaluate``).

The same object serves simulation (``run_simulation`` / the in-process Grid) and
deployment (``flwr run`` on SuperNodes): everything a client needs arrives in the
instruction (global weights + JSON client spec, see :mod:`fl_app.client_spec`) or in
its SuperNode's ``--node-config`` (``partition-id``/``num-partitions`` for simulated
partitions, ``data-path`` for an institution's own file).

Torch is imported only inside the handlers that train or evaluate: deployment starts
a fresh ClientApp process per message, and the key-exchange stages of secure
aggregation must not pay for a torch import.

A client that cannot do what it is asked (malformed spec, no usable data) replies
with a structured error (code ``CLIENT_REFUSED``) naming the problem; anything else
that raises is turned into an error reply by Flower's runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.client_spec import ClientSpec, SpecError, decode_spec
from strategies.protocol import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    CLIENT_REFUSED,
    CLIP_NORM_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    PUBLIC_METRIC_PREFIX,
    SERVER_ROUND,
    SPEC_KEY,
    UNCLIPPED_KEY,
    UPDATE_KEY,
)

__all__ = ["BudgetExhausted", "ClientRefusal", "app", "handle_evaluate", "handle_train"]

log = logging.getLogger("fl_app.client")


class ClientRefusal(Exception):
    """This client will not run the instruction; the reason goes back to the server."""

    code = CLIENT_REFUSED


class BudgetExhausted(ClientRefusal):
    """Training this round would take the client past its privacy budget."""

    code = BUDGET_EXHAUSTED


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    try:
        return int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))
    except (TypeError, ValueError) as err:
        raise ClientRefusal(
            f"node-config partition-id/num-partitions must be integers, got {dict(cfg)!r}"
        ) from err


def _read_instruction(msg: Message) -> tuple[ClientSpec, int, dict[str, np.ndarray], Any]:
    from fl_app.weights import from_array_record

    content = msg.content
    if CONFIG_KEY not in content.config_records or ARRAYS_KEY not in content.array_records:
        raise ClientRefusal(f"instruction lacks '{CONFIG_KEY}' or '{ARRAYS_KEY}' record")
    config = content.config_records[CONFIG_KEY]
    try:
        spec = decode_spec(config.get(SPEC_KEY))
    except SpecError as err:
        raise ClientRefusal(str(err)) from err
    rnd = config.get(SERVER_ROUND)
    if not isinstance(rnd, int) or isinstance(rnd, bool):
        raise ClientRefusal(f"'{SERVER_ROUND}' missing or not an integer: {rnd!r}")
    arrays = from_array_record(content.array_records[ARRAYS_KEY])
    return spec, rnd, arrays, config


def _training_seed(seed: int, rnd: int, partition_id: int) -> int:
    """A per-(run seed, round, client) seed for shuffling; independent streams."""
    ss = np.random.SeedSequence([seed, rnd, partition_id, 0x7EA1])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _prepare(msg: Message, context: Context) -> tuple[Any, ...]:
    """Shared set-up of both handlers: spec, data, model loaded with global weights."""
    import torch

    from fl_app.data import DataError, check_data_shape, load_client_data
    from fl_app.models import build_model

    spec, rnd, arrays, config = _read_instruction(msg)
    torch.set_num_threads(max(1, spec.torch_threads))
    pid, nparts = _partition(context)
    try:
        data = load_client_data(spec.dataset, pid, nparts, spec.seed, dict(context.node_config))
        check_data_shape(data.train, spec.dataset)
    except DataError as err:
        raise ClientRefusal(f"data: {err}") from err
    # Seeded only so initialisation never touches the global RNG: the global weights
    # overwrite these parameters before any use.
    model = build_model(spec.model, spec.dataset.input_shape, spec.dataset.num_classes, seed=0)
    return spec, rnd, arrays, config, pid, data, model


def handle_train(msg: Message, context: Context) -> Message:
    """Train on local data and reply with the update Δ (see :mod:`fl_app.pipeline`).

    Under secure aggregation the instruction carries a stage marker: stages 1, 2 and 4
    (key exchange, unmasking) are handled without torch by :mod:`fl_app.secagg_stages`;
    stage 3 trains as below, then encodes and masks, and replies with the masked vector.
    """
    from fl_app.secagg_stages import (
        MaskedInputStage,
        SecAggStageError,
        handle_key_stage,
        secagg_stage,
        wipe_state,
    )

    try:
        stage = secagg_stage(msg)
        if stage is not None and stage != 3:
            return handle_key_stage(msg, context, stage)
        secure = MaskedInputStage.from_instruction(msg, context) if stage == 3 else None
    except SecAggStageError as err:
        raise ClientRefusal(f"secure aggregation: {err}") from err
    if secure is None:
        return _train(msg, context, None)
    try:
        return _train(msg, context, secure)
    except SecAggStageError as err:
        wipe_state(context)
        raise ClientRefusal(f"secure aggregation: {err}") from err
    except BaseException:
        wipe_state(context)  # the round is over for this client: no secret outlives it
        raise


def _train(msg: Message, context: Context, secure: Any) -> Message:
    import torch

    from fl_app.pipeline import PipelineStages, run_train_pipeline
    from fl_app.training import train_local
    from fl_app.weights import load_ndarrays, model_to_ndarrays, to_array_record

    spec, rnd, arrays, config, pid, data, model = _prepare(msg, context)
    if len(data.train) == 0:
        raise ClientRefusal("no local training examples in this partition")
    mu = config.get(PROXIMAL_MU, 0.0)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0:
        raise ClientRefusal(f"'{PROXIMAL_MU}' must be a number >= 0, got {mu!r}")
    generator = torch.Generator().manual_seed(_training_seed(spec.seed, rnd, pid))
    dp_metrics: dict[str, float] = {}

    if spec.dpsgd is None:

        def train() -> tuple[dict[str, np.ndarray], Any]:
            stats = train_local(
                model,
                data.train.x,
                data.train.y,
                spec.train,
                generator=generator,
                proximal_mu=float(mu),
            )
            return model_to_ndarrays(model), stats

    else:
        dp_train, dp_metrics = _prepare_dpsgd(
            spec, rnd, config, context, pid, data, model, generator
        )

        def train() -> tuple[dict[str, np.ndarray], Any]:
            stats = dp_train()  # trains `model` in place; read its weights afterwards
            return model_to_ndarrays(model), stats

    clip_stage, noise_stage, client_dp_metrics = _client_dp_stages(spec, rnd, config, context, pid)
    if secure is not None:
        return _secure_train(
            msg,
            context,
            secure,
            spec,
            config,
            arrays,
            model,
            train,
            clip_stage,
            noise_stage,
            client_dp_metrics,
            dp_metrics,
        )
    result = run_train_pipeline(
        arrays,
        PipelineStages(
            load=lambda a: load_ndarrays(model, a),
            train=train,
            clip=clip_stage,
            noise=noise_stage,
        ),
    )
    dp_metrics.update(client_dp_metrics)
    stats = result.stats
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: int(stats.num_examples),
            SERVER_ROUND: rnd,
            "train-loss": float(stats.loss),
            "train-accuracy": float(stats.accuracy),
            **dp_metrics,
        }
    )
    content = RecordDict({UPDATE_KEY: to_array_record(result.update), METRICS_KEY: metrics})
    return Message(content, reply_to=msg)


def _secure_train(
    msg: Message,
    context: Context,
    secure: Any,
    spec: ClientSpec,
    config: Any,
    arrays: dict[str, np.ndarray],
    model: Any,
    train: Callable[[], tuple[dict[str, np.ndarray], Any]],
    clip_stage: Any,
    noise_stage: Any,
    client_dp_metrics: dict[str, float],
    dp_metrics: dict[str, float],
) -> Message:
    """Stage 3 of secure aggregation: train, clip, encode, mask; reply with the masked vector.

    The update must be bounded to be encoded: the client-level DP clip norm when
    clients clip (it must equal the round's encoding bound), else the bound itself.
    Weight, the unclipped bit and the training metrics ride inside the masked vector;
    the plaintext reply carries only the round and the stage.
    """
    from fl_app.pipeline import PipelineStages, run_train_pipeline
    from fl_app.privacy.clipping import clip_l2
    from fl_app.weights import load_ndarrays

    if noise_stage is not None:
        raise ClientRefusal(
            "secure aggregation: local DP noise is unbounded and cannot be encoded; the "
            "server must not combine privacy.mode=local with secagg"
        )
    bound = secure.bound
    if clip_stage is None:

        def clip_stage(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return clip_l2(update, bound).arrays

    elif config.get(CLIP_NORM_KEY) != bound:
        raise ClientRefusal(
            f"secure aggregation: encoding bound {bound!r} differs from the clip norm "
            f"'{CLIP_NORM_KEY}'={config.get(CLIP_NORM_KEY)!r}"
        )
    seen: list[Any] = []

    def train_and_keep_stats() -> tuple[dict[str, np.ndarray], Any]:
        local, stats = train()
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
            load=lambda a: load_ndarrays(model, a),
            train=train_and_keep_stats,
            clip=clip_stage,
            encode=encode,
            mask=mask,
        ),
    )
    # Record-level DP-SGD's public metrics (ε spent, steps, q, z) stay in plaintext.
    public = {k: v for k, v in dp_metrics.items() if k.startswith(PUBLIC_METRIC_PREFIX)}
    return cast(Message, secure.reply(msg, result.update["masked"], public))


LOCAL_DP_STATE = "fl-app.local-dp"


def _client_dp_stages(
    spec: ClientSpec, rnd: int, config: Any, context: Context, pid: int
) -> tuple[Any, Any, dict[str, float]]:
    """The clip and local-noise stages this round asks for, and their metrics.

    The returned metrics dict is filled in when the stages run. Local DP checks this
    client's own budget and counts the release in ``Context.state`` *before* training,
    so a crash can only over-count.
    """
    dp = spec.client_dp
    if dp is None:
        return None, None, {}
    from fl_app.privacy.clipping import check_clip_norm, clip_l2

    try:
        clip_norm = check_clip_norm(config.get(CLIP_NORM_KEY), f"'{CLIP_NORM_KEY}'")
    except ValueError as err:
        raise ClientRefusal(f"client-level DP: {err}") from err
    metrics: dict[str, float] = {}

    def clip(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clipped = clip_l2(update, clip_norm)
        if dp.report_unclipped:
            metrics[UNCLIPPED_KEY] = 1.0 if clipped.unclipped else 0.0
        return clipped.arrays

    if dp.local_noise_multiplier is None:
        return clip, None, metrics

    from fl_app.config.schema import Accountant
    from fl_app.privacy.ledger import local_epsilon
    from fl_app.privacy.noise import SecureNoise

    z = float(dp.local_noise_multiplier)
    record = context.state.get(LOCAL_DP_STATE, MetricRecord({"releases": 0}))
    releases = int(cast(int, record["releases"])) + 1
    try:
        eps_after = local_epsilon(z, releases, dp.delta, Accountant(dp.accountant).value)
    except (ValueError, RuntimeError) as err:
        raise ClientRefusal(f"local DP accounting: {err}") from err
    if dp.max_epsilon is not None and eps_after > dp.max_epsilon:
        raise BudgetExhausted(
            f"local DP budget exhausted: epsilon would reach {eps_after:.4g} after this "
            f"round (budget {dp.max_epsilon:g}, delta {dp.delta:g}, {releases - 1} releases)"
        )
    context.state[LOCAL_DP_STATE] = MetricRecord({"releases": releases})
    metrics.update(
        {"dp-local-epsilon": eps_after, "dp-local-releases": releases, "dp-partition-id": pid}
    )
    # Always a CSPRNG: noise from a seed the server knows would protect nothing from it.
    source = SecureNoise()

    def noise(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        std = z * clip_norm
        return {
            k: (v.astype(np.float64) + source.normal(std, v.size).reshape(v.shape)).astype(v.dtype)
            for k, v in update.items()
        }

    return clip, noise, metrics


def _prepare_dpsgd(
    spec: ClientSpec,
    rnd: int,
    config: Any,
    context: Context,
    pid: int,
    data: Any,
    model: Any,
    generator: Any,
) -> tuple[Callable[[], Any], dict[str, float]]:
    """Account, check the budget and persist state *before* DP-SGD training.

    Returns the training thunk and the public metrics of this round (epsilon spent
    so far including this round, steps, sample rate, z).
    """
    from fl_app.privacy.accounting import (
        AccountantName,
        AccountingError,
        DpSgdEvent,
        calibrate_noise_multiplier,
        project_epsilon,
    )
    from fl_app.privacy.dpsgd import DpSgdSettings, GradSampleMode, planned_steps, train_dpsgd
    from fl_app.privacy.state import (
        STEPS_SEEN_KEY,
        ClientPrivacyState,
        DpSgdState,
        PrivacyStateError,
    )

    dp = spec.dpsgd
    assert dp is not None
    state_dir = context.node_config.get("dp-state-dir") or dp.state_dir
    if not state_dir:
        raise ClientRefusal(
            "DP-SGD needs a state directory: start the SuperNode with --node-config "
            '"dp-state-dir=/path" (or set privacy.dpsgd.state_dir)'
        )
    seen = config.get(STEPS_SEEN_KEY, 0)
    try:
        store = ClientPrivacyState(context, str(state_dir), spec.run_key, pid)
        state = store.load(steps_seen_by_server=int(seen))
    except PrivacyStateError as err:
        raise ClientRefusal(f"privacy state: {err}") from err
    accountant = AccountantName(dp.accountant.value)
    steps, q = planned_steps(len(data.train), spec.train.batch_size, spec.train.local_epochs)
    z = state.noise_multiplier
    try:
        if z is None:
            if dp.noise_multiplier is not None:
                z = float(dp.noise_multiplier)
            else:
                assert dp.target_epsilon is not None
                # Calibrated once for every planned round, then kept fixed (stored in state).
                z = calibrate_noise_multiplier(
                    dp.target_epsilon, dp.delta, q, steps * spec.num_rounds, accountant
                )
        planned = DpSgdEvent(noise_multiplier=z, sample_rate=q, steps=steps)
        eps_after = project_epsilon(state.history, planned, dp.delta, accountant)
    except (AccountingError, ValueError) as err:
        # No trustworthy epsilon means no training: never run unaccounted steps.
        raise ClientRefusal(f"privacy accounting: {err}") from err
    if dp.max_epsilon is not None and eps_after > dp.max_epsilon:
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon would reach {eps_after:.4g} after this round "
            f"(budget {dp.max_epsilon:g}, delta {dp.delta:g}, "
            f"{state.history.total_steps} steps spent)"
        )
    new_state = DpSgdState(history=state.history.add(planned), noise_multiplier=z)
    store.save(new_state)  # before training: a crash mid-round never under-counts
    settings = DpSgdSettings(
        noise_multiplier=z,
        max_grad_norm=dp.max_grad_norm,
        grad_sample_mode=GradSampleMode(dp.grad_sample_mode.value),
        secure_mode=spec.secure_mode,
    )

    def run() -> Any:
        _, result = train_dpsgd(
            model, data.train.x, data.train.y, spec.train, settings, generator=generator
        )
        if result.steps != steps:
            raise RuntimeError(f"DP-SGD took {result.steps} steps, accounted {steps}")
        return result.stats

    metrics = {
        "dp-epsilon": float(eps_after),
        "dp-delta": float(dp.delta),
        "dp-steps": int(new_state.history.total_steps),
        "dp-sample-rate": float(q),
        "dp-noise-multiplier": float(z),
        "dp-partition-id": int(pid),
    }
    return run, metrics


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split."""
    from fl_app.training import evaluate
    from fl_app.weights import load_ndarrays

    spec, rnd, arrays, _config, _pid, data, model = _prepare(msg, context)
    if len(data.val) == 0:
        raise ClientRefusal("no local validation examples (dataset.val_fraction or partition size)")
    load_ndarrays(model, arrays)
    stats = evaluate(model, data.val.x, data.val.y, batch_size=max(256, spec.train.batch_size))
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: int(stats.num_examples),
            SERVER_ROUND: rnd,
            "eval-loss": float(stats.loss),
            "eval-accuracy": float(stats.accuracy),
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def _refusals_as_errors(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    def wrapped(msg: Message, context: Context) -> Message:
        # Flower's log lines once in client processes too (Ray workers also route the
        # root logger to the driver, which printed every Flower line twice).
        logging.getLogger("flwr").propagate = False
        try:
            return handler(msg, context)
        except ClientRefusal as err:
            log.warning("refusing %s: %s", msg.metadata.message_type, err)
            return Message(Error(code=err.code, reason=str(err)), reply_to=msg)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


app = ClientApp()
app.train()(_refusals_as_errors(handle_train))
app.evaluate()(_refusals_as_errors(handle_evaluate))
