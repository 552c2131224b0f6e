"""A surrogate's ε in the site's own budget ledger, recorded before the synthesizer runs.

The site's ledger (:class:`fl_app.privacy.state.SiteBudgetLedger`,
``site-budget-<site identity>.jsonl`` in the site's DP state folder) is where every
release the site makes on its data is appended, whatever run or federation it was for;
the site's total is the sum over its entries' keys (basic composition, Dwork and Roth
2014, Thm 3.16). A surrogate is one more release of the same records, so it gets its
own key (its release id) and kind (:data:`SYNTH_KIND`), and the site's total, and the
policy's ``max_epsilon`` checked against it, include it. The line is written (and
fsynced) before the data is read by the synthesizer: a crash can only over-count.
"""

from __future__ import annotations

from pathlib import Path

from fl_app.client.enforce import enforce_epsilon
from fl_app.client.policy import SitePolicy
from fl_app.privacy.state import SYNTH_KIND, SiteBudgetLedger, SiteSpend

__all__ = ["SYNTH_KIND", "account_surrogate"]


def account_surrogate(
    state_dir: str | Path,
    site: str,
    release_id: str,
    epsilon: float,
    delta: float,
    policy: SitePolicy | None,
) -> tuple[float, float]:
    """Check the site policy against the site's total with this surrogate, then append it.

    Returns the site's epsilon and delta over every release including this one (for the
    operator's terminal only: the shared card never states it, since it would tell a
    reader the site's spend in other federations' runs).

    Raises
    ------
    fl_app.client.refusal.PolicyRefusal
        When ``max_epsilon`` would be exceeded by this surrogate or by the site's total;
        nothing is recorded then.
    fl_app.privacy.state.PrivacyStateError
        When the ledger does not parse (it is the only memory of earlier spend).
    """
    ledger = SiteBudgetLedger(state_dir, site)
    site_epsilon, site_delta = ledger.total(release_id, SYNTH_KIND, epsilon, delta)
    enforce_epsilon(policy, SYNTH_KIND, epsilon, site_epsilon)
    ledger.record(SiteSpend(run_key=release_id, kind=SYNTH_KIND, epsilon=epsilon, delta=delta))
    return site_epsilon, site_delta
