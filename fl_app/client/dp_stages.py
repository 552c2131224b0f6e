"""The client's privacy stages as this round asks for them: clip, local noise, DP-SGD.

Each wires a unit of :mod:`fl_app.privacy` (clipping, local DP's release, DP-SGD's
round plan) to this site: its state directory, its policy's floors, its budget ledger
(:mod:`fl_app.client.budget`). Every budget is checked and the release recorded
*before* training, so a crash can only over-count. The order in which the stages run is
the pipeline's (:mod:`fl_app.client.pipeline`), never decided here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context

from fl_app.client.budget import site_accountant
from fl_app.client.identity import DP_STATE_DIR_KEY, site_hash, site_identity
from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.client.refusal import BudgetExhausted, ClientRefusal, PolicyRefusal
from fl_app.client_spec import ClientSpec
from fl_app.protocol import CLIP_NORM_KEY, UNCLIPPED_KEY

__all__ = ["client_dp_stages", "prepare_dpsgd"]


def client_dp_stages(
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
    noise = _local_noise_stage(spec, clip_norm, config, context, pid, policy, metrics)
    return clip, noise, metrics


def _local_noise_stage(
    spec: ClientSpec,
    clip_norm: float,
    config: Any,
    context: Context,
    pid: int,
    policy: SitePolicy | None,
    metrics: dict[str, float],
) -> Any:
    """Local DP's noise stage, after its budget checks and the release is recorded;
    its public metrics go into ``metrics``."""
    dp = spec.client_dp
    assert dp is not None and dp.local_noise_multiplier is not None
    from fl_app.client.state import local_dp_store
    from fl_app.config.schema import Accountant
    from fl_app.privacy.local import begin_release
    from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal

    z, state_dir, seen = _local_dp_inputs(spec, config, context, policy)
    site = site_identity(context.node_config)

    account_site = site_accountant(
        policy, context, str(state_dir), spec.run_key, "local DP", dp.delta
    )

    try:
        release = begin_release(
            lambda: local_dp_store(context, str(state_dir), spec.run_key, site),
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
        # 48-bit keyed digest of the site's identity keys the server's guard.
        metrics["dp-site-hash"] = site_hash(site, str(state_dir))
    return release.noise_stage()


def _local_dp_inputs(
    spec: ClientSpec, config: Any, context: Context, policy: SitePolicy | None
) -> tuple[float, str, int]:
    """Local DP's ``z`` (checked against the site's floor), state directory and the
    releases the server says it received from this site."""
    from fl_app.privacy.local import releases_seen
    from fl_app.privacy.refusal import PrivacyRefusal
    from fl_app.privacy.state import LOCAL_RELEASES_SEEN_KEY

    dp = spec.client_dp
    assert dp is not None and dp.local_noise_multiplier is not None
    z = float(dp.local_noise_multiplier)
    try:
        # The client adds the noise, so the client decides how little (claims audit:
        # z = 0.05 from the server was accepted, epsilon ~ 970 a release).
        (policy or SitePolicy()).check_local_noise(z)
    except PolicyViolation as err:
        raise PolicyRefusal(err) from err
    state_dir = context.node_config.get(DP_STATE_DIR_KEY) or dp.state_dir
    if not state_dir:
        raise ClientRefusal(
            "local DP needs a state directory for its release count: start the SuperNode "
            'with --node-config "dp-state-dir=/path"'
        )
    try:
        seen = releases_seen(config.get(LOCAL_RELEASES_SEEN_KEY, 0), LOCAL_RELEASES_SEEN_KEY)
    except PrivacyRefusal as err:
        raise ClientRefusal(str(err)) from err
    return z, str(state_dir), seen


def prepare_dpsgd(
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
    from fl_app.client.state import dpsgd_store
    from fl_app.privacy.dpsgd_plan import plan_round, train_round
    from fl_app.privacy.refusal import BudgetRefusal, PrivacyRefusal
    from fl_app.privacy.state import ROUNDS_SEEN_KEY, STEPS_SEEN_KEY

    dp = spec.dpsgd
    assert dp is not None
    _check_seeded_noise(spec, context, policy)
    state_dir = context.node_config.get(DP_STATE_DIR_KEY) or dp.state_dir
    if not state_dir:
        raise ClientRefusal(
            "DP-SGD needs a state directory: start the SuperNode with --node-config "
            '"dp-state-dir=/path" (or set privacy.dpsgd.state_dir)'
        )
    site = site_identity(context.node_config)

    account_site = site_accountant(
        policy, context, str(state_dir), spec.run_key, "record-level", dp.delta
    )

    try:
        plan = plan_round(
            dp,
            lambda: dpsgd_store(context, str(state_dir), spec.run_key, site),
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
        metrics["dp-site-hash"] = site_hash(site, str(state_dir))
    return run, metrics


def _check_seeded_noise(spec: ClientSpec, context: Context, policy: SitePolicy | None) -> None:
    """DP-SGD noise seeded from the run's seed only where the site allows it."""
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
