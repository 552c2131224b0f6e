"""The site's budget across runs: every ε release checked and recorded before it is made.

The per-run privacy state is named by the server's run key, so a server that renames
the run would start a fresh count; the site's budget ledger
(:class:`fl_app.privacy.state.SiteBudgetLedger`, named by the site identity alone) is
what the policy's ``max_epsilon`` is checked against (:func:`site_accountant`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context

from fl_app.client.enforce import enforce_epsilon
from fl_app.client.identity import DP_STATE_DIR_KEY, site_identity
from fl_app.client.policy import PolicyViolation, SitePolicy
from fl_app.client.refusal import ClientRefusal, PolicyRefusal

__all__ = ["account_site_release", "site_accountant"]

log = logging.getLogger("fl_app.client")


def site_accountant(
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
        account_site_release(
            policy, context, state_dir, run_key, kind, epsilon, delta, spent_before=spent_before
        )

    return account_site


def account_site_release(
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
        and not context.node_config.get(DP_STATE_DIR_KEY)
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
    enforce_epsilon(policy, kind, epsilon, site_epsilon)
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
