"""Checks of DP-FTRL's once-per-tree cap (``privacy.ftrl.participation``), called by
``validate_privacy._check_ftrl``.

The cap (``strategies/ftrl_cap.py``) draws each round's fixed-size cohort from the
clients not yet selected in the current tree, and the ledger then uses the tighter tree
bound (:mod:`fl_app.privacy.tree`). Two things must hold before the run for that to
mean what it says: the cohort must be the fixed-size one whose size the release divides
by (Poisson over a shrinking pool would shrink every later cohort), and a whole tree's
cohorts must fit in the population (``restart_every · cohort <= clients``), or the last
rounds of each tree would run short of clients.
"""

from __future__ import annotations

from fl_app.config.errors import require as _check
from fl_app.config.schema import AppConfig, SamplingMode
from fl_app.config.schema_ftrl import FtrlParticipation
from fl_app.privacy.round_event import fixed_cohort_size

__all__ = ["check_ftrl_participation"]


def check_ftrl_participation(cfg: AppConfig) -> None:
    """Refuse a once-per-tree cap the server could not keep with full cohorts."""
    f = cfg.privacy.ftrl
    if FtrlParticipation(f.participation) is not FtrlParticipation.once_per_tree:
        return
    s = cfg.strategy
    _check(
        s.sampling is SamplingMode.fixed,
        "strategy.sampling",
        s.sampling.value,
        "privacy.ftrl.participation=once_per_tree draws fixed-size cohorts from the "
        "clients not yet in the tree; set strategy.sampling=fixed (DP-FTRL's epsilon "
        "uses no amplification, so Poisson sampling gains nothing)",
    )
    clients = int(cfg.dataset.num_partitions)
    cohort = fixed_cohort_size(float(s.fraction_train), clients)
    k = int(f.restart_every) if f.restart_every is not None else int(cfg.num_rounds)
    _check(
        k * cohort <= clients,
        "privacy.ftrl.restart_every",
        k,
        f"privacy.ftrl.participation=once_per_tree needs every round of a tree to find "
        f"{cohort} clients not yet in it: {k} rounds x {cohort} > {clients} clients; set "
        f"privacy.ftrl.restart_every <= {clients // cohort} or lower "
        "strategy.fraction_train",
    )
