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

Two node-config keys are the site's own controls:

``policy-path``  the site's data-use policy (:mod:`fl_app.client.policy`), checked for
                 every train (plain or secure-aggregation stage 3) and evaluate
                 instruction before data is loaded; projected ε is checked against it
                 before any privacy state is saved. A violation is a refusal naming the
                 policy field (``BUDGET_EXHAUSTED`` for ``max_epsilon``, so the server
                 stops asking, else ``CLIENT_REFUSED``).
``audit-dir``    the site's hash-chained audit log (:mod:`fl_app.audit`), one file per
                 run and site, ``audit-<run key>-<site identity>.jsonl`` (``site-<name>``
                 from node-config ``site-name``, see :func:`site_identity`). Opened,
                 verified, appended and closed per message (deployment starts a process
                 per message). Each train/evaluate instruction that carries a spec leaves
                 ``client.round`` (round, message type, the artifact released, ε,
                 policy) or ``client.refused`` (round, reason, policy field); the
                 key-exchange stages of secure aggregation release no data-derived
                 artifact and are not logged. Counts, ids and ε only: never data,
                 updates or metrics values. A log that fails verification stops the
                 client (every instruction is refused) until it is moved aside.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.client.policy import (
    PolicyError,
    PolicyViolation,
    SitePolicy,
    load_policy,
    released_artifact,
)
from fl_app.client_spec import ClientSpec, SpecError, decode_spec
from fl_app.protocol import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    CLIENT_REFUSED,
    CLIP_NORM_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SECAGG_STAGE_KEY,
    SERVER_ROUND,
    SPEC_KEY,
    UNCLIPPED_KEY,
    UPDATE_KEY,
)

__all__ = [
    "AUDIT_DIR_KEY",
    "POLICY_PATH_KEY",
    "SITE_NAME_KEY",
    "BudgetExhausted",
    "ClientRefusal",
    "PolicyRefusal",
    "app",
    "client_audit_path",
    "handle_evaluate",
    "handle_train",
    "site_identity",
]

log = logging.getLogger("fl_app.client")

AUDIT_DIR_KEY = "audit-dir"
POLICY_PATH_KEY = "policy-path"
# The site's stable name (the site YAML's ``name``): names its per-site files.
SITE_NAME_KEY = "site-name"
_SAFE_SITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
# A run key becomes part of a file name: anything else (a hostile server's "../x") is
# logged under "unknown".
_SAFE_RUN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ClientRefusal(Exception):
    """This client will not run the instruction; the reason goes back to the server."""

    code = CLIENT_REFUSED


class BudgetExhausted(ClientRefusal):
    """Training this round would take the client past its privacy budget."""

    code = BUDGET_EXHAUSTED


class PolicyRefusal(ClientRefusal):
    """The site's data-use policy forbids this instruction; ``field`` names the rule.

    ``max_epsilon`` refusals carry ``BUDGET_EXHAUSTED`` (the site's budget will not
    grow back this run, so the server should stop asking), the others ``CLIENT_REFUSED``.
    """

    def __init__(self, violation: PolicyViolation) -> None:
        super().__init__(str(violation))
        self.field = violation.field
        self.code = BUDGET_EXHAUSTED if violation.field == "max_epsilon" else CLIENT_REFUSED


def _site_policy(context: Context) -> SitePolicy | None:
    """The policy every handler applies: node-config ``policy-path`` with the floor of a
    site holding a signing key or roster (:func:`fl_app.secagg_stages.effective_policy`;
    None when there is neither)."""
    from fl_app.secagg_stages import effective_policy

    path = context.node_config.get(POLICY_PATH_KEY)
    if path is None or path == "":
        return effective_policy(context, None)
    try:
        return effective_policy(context, load_policy(str(path)))
    except PolicyError as err:
        raise ClientRefusal(f"site policy: {err}") from err


def _artifact(spec: ClientSpec, message_type: str, config: Any) -> str:
    """What a reply to this instruction releases (see :data:`fl_app.client.policy.ARTIFACTS`)."""
    dp = spec.client_dp
    return released_artifact(
        message_type,
        secure=config.get(SECAGG_STAGE_KEY) == 3,
        client_clips=dp is not None,
        local_noise=dp is not None and dp.local_noise_multiplier is not None,
    )


def _enforce_request(
    policy: SitePolicy | None, spec: ClientSpec, message_type: str, config: Any
) -> None:
    if policy is None:
        return
    local_dp = spec.client_dp is not None and spec.client_dp.local_noise_multiplier is not None
    try:
        policy.check_request(
            message_type,
            artifact=_artifact(spec, message_type, config),
            secure=config.get(SECAGG_STAGE_KEY) == 3,
            record_level_dp=spec.dpsgd is not None,
            accounts_epsilon=spec.dpsgd is not None or local_dp,
        )
    except PolicyViolation as err:
        raise PolicyRefusal(err) from err


def _enforce_epsilon(
    policy: SitePolicy | None, kind: str, epsilon: float, site_epsilon: float | None = None
) -> None:
    """The site policy's ``max_epsilon`` against this run's ``epsilon`` and against
    ``site_epsilon``, the site's total over every run on its data (its budget ledger):
    a server that renames the run starts a fresh per-run count, never a fresh site budget.
    The total refusal quotes no number: it would tell this server the site's spend in
    runs of other federations."""
    if policy is None:
        return
    try:
        policy.check_epsilon(kind, epsilon)
    except PolicyViolation as err:
        raise PolicyRefusal(err) from err
    if (
        site_epsilon is not None
        and policy.max_epsilon is not None
        and not site_epsilon <= policy.max_epsilon
    ):
        log.warning(
            "site budget: %s epsilon %.4g this run, %.4g over every run on this site's "
            "data, above max_epsilon %g",
            kind,
            epsilon,
            site_epsilon,
            policy.max_epsilon,
        )
        raise PolicyRefusal(
            PolicyViolation(
                "max_epsilon",
                f"this round would take the site's total epsilon over every run on its "
                f"data (its budget ledger) past its max_epsilon {policy.max_epsilon:g}",
            )
        )


def _site_accountant(
    policy: SitePolicy | None,
    context: Context,
    state_dir: str,
    run_key: str,
    kind: str,
    delta: float,
) -> Callable[[float, bool], None]:
    """The ``account_site(epsilon, spent_before)`` callback the privacy units call
    (:func:`fl_app.privacy.local.begin_release`, :func:`fl_app.privacy.dpsgd_plan.plan_round`)
    for one kind of release of this site in this run."""

    def account_site(epsilon: float, spent_before: bool) -> None:
        _account_site_release(
            policy, context, state_dir, run_key, kind, epsilon, delta, spent_before=spent_before
        )

    return account_site


def _account_site_release(
    policy: SitePolicy | None,
    context: Context,
    state_dir: str,
    run_key: str,
    kind: str,
    epsilon: float,
    delta: float,
    spent_before: bool,
) -> None:
    """Check this release against the site policy (this run and the site's total) and
    append it to the site's budget ledger (:class:`fl_app.privacy.state.SiteBudgetLedger`)
    *before* it is made. Called after the per-run budget checks, before the per-run
    state is saved."""
    from fl_app.privacy.state import PrivacyStateError, SiteBudgetLedger, SiteSpend

    site = site_identity(context.node_config)
    if (
        policy is not None
        and policy.max_epsilon is not None
        and not site.startswith("partition-")
        and not context.node_config.get("dp-state-dir")
    ):
        # Without it the ledger would live in a directory the server's spec names, and a
        # server that names a fresh one resets the site's budget.
        raise PolicyRefusal(
            PolicyViolation(
                "max_epsilon",
                "the site bounds its epsilon but keeps no state directory of its own: start "
                'the SuperNode with --node-config "dp-state-dir=/path" (the server\'s '
                "state_dir is not trusted with the site's budget ledger)",
            )
        )
    try:
        ledger = SiteBudgetLedger(state_dir, site)
        ledger.check_recorded(run_key, kind, spent_before)
        site_epsilon, site_delta = ledger.total(run_key, kind, epsilon, delta)
    except PrivacyStateError as err:
        raise ClientRefusal(f"site budget ledger: {err}") from err
    _enforce_epsilon(policy, kind, epsilon, site_epsilon)
    try:
        ledger.record(SiteSpend(run_key=run_key, kind=kind, epsilon=epsilon, delta=delta))
    except (OSError, PrivacyStateError) as err:
        raise ClientRefusal(f"site budget ledger: {err}") from err
    log.info(
        "site budget: %s epsilon %.4g this run; over every run on this site's data "
        "epsilon %.4g, delta %.3g (basic composition)",
        kind,
        epsilon,
        site_epsilon,
        site_delta,
    )


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


#: Context.state record: run key -> the protections this client has used in that run.
PROTECTED_RUNS_KEY = "fl-app.protected-runs"


def _refuse_downgrade(
    context: Context, spec: ClientSpec, message_type: str, secure: Any, local_dp: bool
) -> None:
    """Refuse an instruction weaker than what this client already used in the run.

    The spec does not carry the run's threat model, and a deviating server can simply
    send a plain train instruction (no secure-aggregation stage) to a distributed-DP
    client and get its raw update and plaintext loss/accuracy/example count, or drop
    local DP's noise, or ask for federated evaluation. So once a run key has trained
    under secure aggregation (``secagg``; with distributed DP, ``ddp``) or local DP
    (``local-dp``), the client remembers it in ``Context.state`` and refuses, for that
    run key, plain train instructions, a secure round without the distributed-DP noise,
    a train without local noise, and (where the protected instruction hid per-client
    metrics, ``hide-metrics``) federated evaluation. A server that renames the run
    starts unmarked: ``require_secure_aggregation: true`` in the site policy is the
    guard from the first message on. Where the node keeps ``dp-state-dir``, the marks
    are also kept there (``protected-runs-<site>.json``), so a restarted SuperNode
    (fresh ``Context.state``) remembers them.
    """
    record = context.state.config_records.get(PROTECTED_RUNS_KEY)
    key = f"run:{spec.run_key}"
    raw = record.get(key) if record is not None else None
    marks = set(str(raw).split(",")) if raw else set()
    stored = _stored_protections(context)
    marks |= set(stored.get(spec.run_key, []))
    if message_type == "train":
        if secure is None and not local_dp and spec.hide_client_metrics:
            # The spec itself says the server is not trusted with per-client numbers
            # (honest_but_curious, distributed_dp): a plain train contradicts it. (A server
            # that also clears the flag is caught from the run's second round on, or from
            # the first by require_secure_aggregation.)
            raise PolicyRefusal(
                PolicyViolation(
                    "require_secure_aggregation",
                    "this run's threat model hides per-client numbers from the server, but "
                    "this train instruction is a plain one (no secure aggregation, no local "
                    "noise: the server would see the update), refused",
                )
            )
        ddp = secure is not None and getattr(secure, "ddp", None) is not None
        if ("secagg" in marks and secure is None) or ("ddp" in marks and not ddp):
            raise PolicyRefusal(
                PolicyViolation(
                    "require_secure_aggregation",
                    "this run already trained under secure aggregation"
                    + (" with distributed DP" if "ddp" in marks else "")
                    + "; this train instruction "
                    + ("is a plain one" if secure is None else "has no distributed-DP noise")
                    + " (a downgrade: the server would see this client's update), refused",
                )
            )
        if "local-dp" in marks and not local_dp:
            raise ClientRefusal(
                "this run already trained under local DP; this train instruction has no "
                "local noise (a downgrade: the server would see the un-noised update), refused"
            )
        new = set(marks)
        if secure is not None:
            new |= {"secagg", "ddp"} if ddp else {"secagg"}
        if local_dp:
            new.add("local-dp")
        if new - marks and spec.hide_client_metrics:
            new.add("hide-metrics")
        if new != marks:
            from flwr.app import ConfigRecord

            values = dict(record) if record is not None else {}
            values[key] = ",".join(sorted(new))
            context.state[PROTECTED_RUNS_KEY] = ConfigRecord(values)
            _store_protections(context, {**stored, spec.run_key: sorted(new)})
    elif "hide-metrics" in marks or "local-dp" in marks:
        raise ClientRefusal(
            "federated evaluation: this run trained under a threat model that hides "
            "per-client numbers from the server; this client does not evaluate in it"
        )


def _protections_path(context: Context) -> Path | None:
    directory = context.node_config.get("dp-state-dir")
    if not directory:
        return None
    return Path(str(directory)) / f"protected-runs-{site_identity(context.node_config)}.json"


def _stored_protections(context: Context) -> dict[str, list[str]]:
    """The run keys' marks kept beside the site's DP state (``{}``: none or no directory)."""
    import json

    path = _protections_path(context)
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ClientRefusal(
            f"protected-runs file {path}: unreadable ({err}); restore or delete it"
        ) from err
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values()
    ):
        raise ClientRefusal(f"protected-runs file {path}: not a run-key -> marks mapping")
    return data


def _store_protections(context: Context, data: dict[str, list[str]]) -> None:
    import json
    import os

    path = _protections_path(context)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise ClientRefusal(f"protected-runs file {path}: cannot write it ({err})") from err


def _prepare(
    msg: Message,
    context: Context,
    policy: SitePolicy | None,
    message_type: str,
    secure: Any = None,
) -> tuple[Any, ...]:
    """Shared set-up of both handlers: spec, the site policy's verdict on the request
    (before any data is read), data, model loaded with global weights. ``secure``: the
    train instruction's secure-aggregation stage-3 state (``None``: a plain one)."""
    import torch

    from fl_app.data import DataError, check_data_shape, load_client_data
    from fl_app.models import build_model

    spec, rnd, arrays, config = _read_instruction(msg)
    local_dp = spec.client_dp is not None and spec.client_dp.local_noise_multiplier is not None
    if message_type == "evaluate" and (
        local_dp or spec.hide_client_metrics or spec.dpsgd is not None
    ):
        # The client's own check (the server turns federated evaluation off there too).
        raise ClientRefusal(
            "federated evaluation would send this client's un-noised loss, accuracy and "
            "example count to a server the run's threat model does not trust with them "
            "(honest_but_curious, distributed_dp, local DP, record-level DP-SGD, whose "
            "epsilon covers only the noised update); this client does not evaluate"
        )
    _refuse_downgrade(context, spec, message_type, secure, local_dp)
    _enforce_request(policy, spec, message_type, config)
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
    """Train on local data and reply with the update Δ (see :mod:`fl_app.client.pipeline`).

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
            # The site's policy also sets its secure-aggregation floor (safe defaults).
            return handle_key_stage(msg, context, stage, _site_policy(context))
    except SecAggStageError as err:
        raise _secagg_refusal(err) from err
    try:
        policy = _site_policy(context)
        secure = MaskedInputStage.from_instruction(msg, context, policy) if stage == 3 else None
    except SecAggStageError as err:
        raise _secagg_refusal(err) from err
    except ClientRefusal:
        if stage == 3:
            wipe_state(context)
        raise
    if secure is None:
        return _train(msg, context, None, policy)
    try:
        return _train(msg, context, secure, policy)
    except SecAggStageError as err:
        wipe_state(context)
        raise ClientRefusal(f"secure aggregation: {err}") from err
    except BaseException:
        wipe_state(context)  # the round is over for this client: no secret outlives it
        raise


def _secagg_refusal(err: Exception) -> ClientRefusal:
    """A secure-aggregation refusal; one resting on a site-policy field names it."""
    field = getattr(err, "field", None)
    if field is not None:
        detail = getattr(err, "detail", str(err))
        return PolicyRefusal(PolicyViolation(field, f"secure aggregation: {detail}"))
    return ClientRefusal(f"secure aggregation: {err}")


def _train(msg: Message, context: Context, secure: Any, policy: SitePolicy | None) -> Message:
    import torch

    from fl_app.client.pipeline import PipelineStages, run_train_pipeline
    from fl_app.training import train_local
    from fl_app.weights import load_ndarrays, model_to_ndarrays, to_array_record

    spec, rnd, arrays, config, pid, data, model = _prepare(msg, context, policy, "train", secure)
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
            spec, rnd, config, context, pid, data, model, generator, policy
        )

        def train() -> tuple[dict[str, np.ndarray], Any]:
            stats = dp_train()  # trains `model` in place; read its weights afterwards
            return model_to_ndarrays(model), stats

    clip_stage, noise_stage, client_dp_metrics = _client_dp_stages(
        spec, rnd, config, context, pid, policy
    )
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
    if noise_stage is not None:
        # Local DP: the server is not trusted with anything un-noised from this client,
        # and nothing can hide a number from it here (no secure aggregation). The loss,
        # accuracy and example count are left out; every client weighs the same (1).
        plain: dict[str, float] = {NUM_EXAMPLES: 1}
        dp_metrics = _hidden_mode_public(dp_metrics)
    elif spec.dpsgd is not None:
        # Record-level DP: the loss and accuracy on this site's records are un-noised
        # functions of them, outside DP-SGD's epsilon. The example count stays: it is
        # FedAvg's weight and public here anyway (the sample rate and steps give it).
        plain = {NUM_EXAMPLES: int(stats.num_examples)}
    else:
        plain = {
            NUM_EXAMPLES: int(stats.num_examples),
            "train-loss": float(stats.loss),
            "train-accuracy": float(stats.accuracy),
        }
    metrics = MetricRecord({**plain, SERVER_ROUND: rnd, **dp_metrics})
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
    from fl_app.client.pipeline import PipelineStages, run_train_pipeline
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
    # Only the public numbers the protocol needs stay in plaintext (record-level ε, rounds).
    public = _hidden_mode_public(dp_metrics)
    return cast(Message, secure.reply(msg, result.update["masked"], public))


def _client_dp_stages(
    spec: ClientSpec,
    rnd: int,
    config: Any,
    context: Context,
    pid: int,
    policy: SitePolicy | None = None,
) -> tuple[Any, Any, dict[str, float]]:
    """The clip and local-noise stages this round asks for, and their metrics.

    The returned metrics dict is filled in when the stages run. Local DP checks this
    client's own budget (the server's ``max_epsilon`` and the site policy's) and
    persists the release in its state file (:class:`fl_app.privacy.state.LocalDpStore`,
    in node-config ``dp-state-dir`` or the spec's state directory) *before* training,
    so neither a crash nor a restarted SuperNode, a resumed run or a rollback can
    rewind the count: a crash can only over-count.
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
    from fl_app.privacy.local import begin_release, releases_seen
    from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal
    from fl_app.privacy.state import LOCAL_RELEASES_SEEN_KEY, LocalDpStore

    z = float(dp.local_noise_multiplier)
    try:
        # The client adds the noise, so the client decides how little (claims audit:
        # z = 0.05 from the server was accepted, epsilon ~ 970 a release).
        (policy or SitePolicy()).check_local_noise(z)
    except PolicyViolation as err:
        raise PolicyRefusal(err) from err
    state_dir = context.node_config.get("dp-state-dir") or dp.state_dir
    if not state_dir:
        raise ClientRefusal(
            "local DP needs a state directory for its release count: start the SuperNode "
            'with --node-config "dp-state-dir=/path"'
        )
    try:
        seen = releases_seen(config.get(LOCAL_RELEASES_SEEN_KEY, 0), LOCAL_RELEASES_SEEN_KEY)
    except PrivacyRefusal as err:
        raise ClientRefusal(str(err)) from err
    site = site_identity(context.node_config)

    account_site = _site_accountant(
        policy, context, str(state_dir), spec.run_key, "local DP", dp.delta
    )

    try:
        release = begin_release(
            lambda: LocalDpStore(context, str(state_dir), spec.run_key, site),
            noise_multiplier=z,
            clip_norm=clip_norm,
            delta=dp.delta,
            accountant=Accountant(dp.accountant).value,
            max_epsilon=dp.max_epsilon,
            seen_by_server=seen,
            account_site=account_site,
        )
    except BudgetRefusal as err:
        raise BudgetExhausted(str(err)) from err
    except PrivacyRefusal as err:
        raise ClientRefusal(str(err)) from err
    metrics.update(release.public_metrics(pid))
    if not site.startswith("partition-"):
        # Deployed sites all have partition id 0 and a metric cannot carry a name: a
        # 48-bit digest of the site's identity keys the server's guard.
        metrics["dp-site-hash"] = site_hash(site)
    return clip, release.noise_stage(), metrics


def _prepare_dpsgd(
    spec: ClientSpec,
    rnd: int,
    config: Any,
    context: Context,
    pid: int,
    data: Any,
    model: Any,
    generator: Any,
    policy: SitePolicy | None = None,
) -> tuple[Callable[[], Any], dict[str, float]]:
    """Account, check the budget (the server's and the site policy's) and persist
    state *before* DP-SGD training.

    Returns the training thunk and the public metrics of this round (epsilon spent
    so far including this round, steps, sample rate, z).
    """
    from fl_app.privacy.dpsgd_plan import plan_round, train_round
    from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal
    from fl_app.privacy.state import ROUNDS_SEEN_KEY, STEPS_SEEN_KEY, ClientPrivacyState

    dp = spec.dpsgd
    assert dp is not None
    own_data = not site_identity(context.node_config).startswith("partition-")
    allowed = policy.allow_seeded_noise if policy is not None else not own_data
    if not spec.secure_mode and not allowed:
        # Seeded DP-SGD noise is noise the server can regenerate and subtract. Only the
        # site may opt in (its policy). A node without a policy that serves a simulated
        # partition (no site-name, no data-path: a rehearsal on shared data) keeps the
        # reproducible opt-in; a site training on its own data without a policy refuses.
        raise PolicyRefusal(
            PolicyViolation(
                "allow_seeded_noise",
                "the server asks for DP-SGD noise and batches seeded from the run's seed "
                "(privacy.secure_mode=false), which it could regenerate; this site draws "
                "them only from its own keys unless its policy sets allow_seeded_noise: true",
            )
        )
    state_dir = context.node_config.get("dp-state-dir") or dp.state_dir
    if not state_dir:
        raise ClientRefusal(
            "DP-SGD needs a state directory: start the SuperNode with --node-config "
            '"dp-state-dir=/path" (or set privacy.dpsgd.state_dir)'
        )
    site = site_identity(context.node_config)

    account_site = _site_accountant(
        policy, context, str(state_dir), spec.run_key, "record-level", dp.delta
    )

    try:
        plan = plan_round(
            dp,
            lambda: ClientPrivacyState(context, str(state_dir), spec.run_key, site),
            num_examples=len(data.train),
            batch_size=spec.train.batch_size,
            local_epochs=spec.train.local_epochs,
            num_rounds=spec.num_rounds,
            secure_mode=spec.secure_mode,
            steps_seen=config.get(STEPS_SEEN_KEY, 0),
            rounds_seen=config.get(ROUNDS_SEEN_KEY, 0),
            account_site=account_site,
        )
    except BudgetRefusal as err:
        raise BudgetExhausted(str(err)) from err
    except PrivacyRefusal as err:
        raise ClientRefusal(str(err)) from err

    def run() -> Any:
        return train_round(plan, model, data.train.x, data.train.y, spec.train, generator)

    metrics = plan.public_metrics(pid)
    if not site.startswith("partition-"):  # deployed sites all have partition id 0
        metrics["dp-site-hash"] = site_hash(site)
    return run, metrics


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
    }
)


def _hidden_mode_public(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in HIDDEN_MODE_PUBLIC_METRICS}


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the local validation split.

    Refused under local DP: the loss, accuracy and example count would reach a server
    that this client trusts only with noised updates (the server turns federated
    evaluation off there; this is the client's own check, before any data is read).
    """
    from fl_app.training import evaluate
    from fl_app.weights import load_ndarrays

    spec, rnd, arrays, _config, _pid, data, model = _prepare(
        msg, context, _site_policy(context), "evaluate"
    )
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


def _audit_names(run_key: str, partition_id: object) -> tuple[str, str]:
    key = run_key if _SAFE_RUN_KEY.fullmatch(run_key) else "unknown"
    try:
        pid = str(int(cast(Any, partition_id)))
    except (TypeError, ValueError):
        pid = "unknown"
    return key, pid


def site_hash(site: str) -> int:
    """48 bits of SHA-256 of a site identity: exact as a float64 metric value."""
    import hashlib

    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:6], "big")


def site_identity(node_config: Any) -> str:
    """The stable name of this site for its own files (audit log), from its node config.

    ``site-<name>`` from ``site-name`` (the site YAML's ``name``, set by ``fl-app deploy
    node-config``); else, for a site training on its own file (``data-path``),
    ``data-<hash of the file's absolute path>``; else the simulated partition,
    ``partition-<id>``. Deployed sites all have partition id 0, so naming their files by
    partition made sites that share a directory collide (issue 17).
    """
    import hashlib

    name = node_config.get(SITE_NAME_KEY)
    if name is not None and name != "":
        if not _SAFE_SITE_NAME.fullmatch(str(name)):
            raise ClientRefusal(
                f"node-config {SITE_NAME_KEY}={name!r} must be 1-64 letters, digits, '_', "
                "'-' or '.' (not starting with '.'): it names this site's files"
            )
        return f"site-{name}"
    data_path = node_config.get("data-path")
    if data_path:
        digest = hashlib.sha256(str(Path(str(data_path)).resolve()).encode()).hexdigest()
        return f"data-{digest[:16]}"
    try:
        pid = int(node_config.get("partition-id", 0))
    except (TypeError, ValueError) as err:
        raise ClientRefusal(
            f"node-config partition-id must be an integer, got {node_config.get('partition-id')!r}"
        ) from err
    return f"partition-{pid}"


def client_audit_path(directory: str | Path, run_key: str, site: object) -> Path:
    """``<directory>/audit-<run key>-<site identity>.jsonl``.

    ``site`` is a :func:`site_identity` string, or a simulated partition id (an int:
    ``partition-<id>``). Unsafe parts become "unknown".
    """
    if isinstance(site, str) and (
        site.startswith(("site-", "data-", "partition-"))
        and _SAFE_SITE_NAME.fullmatch(site.split("-", 1)[1])
    ):
        key = run_key if _SAFE_RUN_KEY.fullmatch(run_key) else "unknown"
        return Path(directory) / f"audit-{key}-{site}.jsonl"
    key, pid = _audit_names(run_key, site)
    return Path(directory) / f"audit-{key}-partition-{pid}.jsonl"


class _ClientAudit:
    """The site's audit log around one instruction (node-config ``audit-dir``).

    Opened, and so verified, *before* the handler runs: a broken log refuses the
    instruction. Closed when the instruction's record is written.
    """

    def __init__(self, audit_log: Any, message_type: str, rnd: object, artifact: str | None):
        self.log = audit_log
        self.message_type = message_type
        self.round = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None
        self.artifact = artifact

    @classmethod
    def open(cls, msg: Message, context: Context, message_type: str) -> _ClientAudit | None:
        """None when the node keeps no audit log, or for a key-exchange stage (no spec)."""
        from fl_app.audit import AuditError, AuditLog

        directory = context.node_config.get(AUDIT_DIR_KEY)
        config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
        if directory is None or directory == "" or config is None or SPEC_KEY not in config:
            return None
        try:
            spec: ClientSpec | None = decode_spec(config.get(SPEC_KEY))
        except SpecError:
            spec = None  # the handler refuses it; the refusal is still logged
        run_key = spec.run_key if spec is not None else ""
        key, pid = _audit_names(run_key, context.node_config.get("partition-id", 0))
        site = site_identity(context.node_config)
        path = client_audit_path(str(directory), key, site)
        try:
            audit_log = AuditLog(path)
        except (AuditError, OSError) as err:
            raise ClientRefusal(
                f"client audit log: {err} (node-config {AUDIT_DIR_KEY}={directory!r}); "
                "this site trains only with an intact audit log"
            ) from err
        try:
            if audit_log.records == 0:
                audit_log.append(
                    "run.start",
                    {"role": "client", "run_key": key, "partition": pid, "site": site},
                )
            artifact = None
            if spec is not None:
                try:
                    artifact = _artifact(spec, message_type, config)
                except ValueError:
                    artifact = None
        except BaseException:
            audit_log.close()
            raise
        return cls(audit_log, message_type, config.get(SERVER_ROUND), artifact)

    def released(self, reply: Message, policy: bool) -> None:
        """``client.round``: what left the client, its ε, the policy verdict."""
        epsilon: dict[str, float] = {}
        if reply.has_content() and METRICS_KEY in reply.content.metric_records:
            metrics = reply.content.metric_records[METRICS_KEY]
            for key, name in (("dp-epsilon", "record_level"), ("dp-local-epsilon", "local")):
                value = metrics.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    epsilon[name] = float(value)
        self.log.append(
            "client.round",
            {
                "round": self.round,
                "message_type": self.message_type,
                "artifact": self.artifact,
                "epsilon": epsilon,
                "policy": "ok" if policy else "none",
            },
        )

    def refused(self, err: ClientRefusal) -> None:
        """``client.refused``: the reason sent to the server and the policy field, if any."""
        self.log.append(
            "client.refused",
            {
                "round": self.round,
                "message_type": self.message_type,
                "code": int(err.code),
                "policy_field": getattr(err, "field", None),
                "reason": str(err),
            },
        )

    def close(self) -> None:
        self.log.close()


def _refusals_as_errors(
    handler: Callable[[Message, Context], Message], message_type: str
) -> Callable[[Message, Context], Message]:
    """The process boundary: refusals become structured error replies, and every
    instruction with a spec leaves a record in the site's audit log (if it keeps one)."""

    def refuse(msg: Message, err: ClientRefusal) -> Message:
        log.warning("refusing %s: %s", msg.metadata.message_type, err)
        return Message(Error(code=err.code, reason=str(err)), reply_to=msg)

    def wrapped(msg: Message, context: Context) -> Message:
        from fl_app.audit import AuditError

        # Flower's log lines once in client processes too (Ray workers also route the
        # root logger to the driver, which printed every Flower line twice).
        logging.getLogger("flwr").propagate = False
        try:
            audit = _ClientAudit.open(msg, context, message_type)
        except ClientRefusal as err:
            return refuse(msg, err)
        except AuditError as err:  # the run.start append of a new log failed
            return refuse(msg, ClientRefusal(f"client audit log: {err}"))
        if audit is None:
            try:
                return handler(msg, context)
            except ClientRefusal as err:
                return refuse(msg, err)
        try:
            try:
                reply = handler(msg, context)
            except ClientRefusal as err:
                try:
                    audit.refused(err)
                except AuditError as audit_err:
                    log.error("client audit log: cannot record a refusal: %s", audit_err)
                return refuse(msg, err)
            try:
                audit.released(reply, policy=bool(context.node_config.get(POLICY_PATH_KEY)))
            except AuditError as err:
                # Nothing leaves the site unrecorded.
                return refuse(msg, ClientRefusal(f"client audit log: {err}; reply withheld"))
            return reply
        finally:
            audit.close()

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


app = ClientApp()
app.train()(_refusals_as_errors(handle_train, "train"))
app.evaluate()(_refusals_as_errors(handle_evaluate, "evaluate"))
