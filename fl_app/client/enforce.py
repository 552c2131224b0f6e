"""The site's policy applied to one instruction, before any data is read.

:func:`site_policy` is the policy every handler applies (the site's file, with the
secure-aggregation floor of a site holding a signing key or roster);
:func:`enforce_request` checks what the reply would release against it, and
:func:`enforce_epsilon` the ε this client accounts itself (this run's and the site's
total over every run, :mod:`fl_app.client.budget`). The policy's own rules and file
format are :mod:`fl_app.client.policy`'s.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context

from fl_app.client.identity import POLICY_PATH_KEY
from fl_app.client.policy import PolicyError, PolicyViolation, SitePolicy, released_artifact
from fl_app.client.policy_file import load_policy
from fl_app.client.refusal import ClientRefusal, PolicyRefusal
from fl_app.client_spec import ClientSpec
from fl_app.secagg.wire import SECAGG_STAGE_KEY

__all__ = ["artifact", "enforce_epsilon", "enforce_request", "site_policy"]

log = logging.getLogger("fl_app.client")


def site_policy(context: Context) -> SitePolicy | None:
    """The policy every handler applies: node-config ``policy-path`` with the floor of a
    site holding a signing key or roster (:func:`fl_app.secagg.client.effective_policy`;
    None when there is neither)."""
    from fl_app.secagg.client import effective_policy

    path = context.node_config.get(POLICY_PATH_KEY)
    if path is None or path == "":
        return effective_policy(context, None)
    try:
        return effective_policy(context, load_policy(str(path)))
    except PolicyError as err:
        raise ClientRefusal(f"site policy: {err}") from err


def artifact(spec: ClientSpec, message_type: str, config: Any) -> str:
    """What a reply to this instruction releases (see :data:`fl_app.client.policy.ARTIFACTS`)."""
    dp = spec.client_dp
    return released_artifact(
        message_type,
        secure=config.get(SECAGG_STAGE_KEY) == 3,
        client_clips=dp is not None,
        local_noise=dp is not None and dp.local_noise_multiplier is not None,
    )


def enforce_request(
    policy: SitePolicy | None, spec: ClientSpec, message_type: str, config: Any
) -> None:
    """The policy's verdict on the request itself (artifact, secure aggregation, DP)."""
    if policy is None:
        return
    local_dp = spec.client_dp is not None and spec.client_dp.local_noise_multiplier is not None
    try:
        policy.check_request(
            message_type,
            artifact=artifact(spec, message_type, config),
            secure=config.get(SECAGG_STAGE_KEY) == 3,
            record_level_dp=spec.dpsgd is not None,
            accounts_epsilon=spec.dpsgd is not None or local_dp,
        )
    except PolicyViolation as err:
        raise PolicyRefusal(err) from err


def enforce_epsilon(
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
