"""DP-FTRL's once-per-tree cap (privacy.ftrl.participation), and what a DP-FTRL run's
summary and validation say about its account (issue 19).

Expected values come from dp-accounting's own tree event
(``SingleEpochTreeAggregationDpEvent``, Kairouz et al. 2021 Appendix D), the analytic
Gaussian mechanism (Balle & Wang 2018) and counts worked out by hand.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from scipy import optimize, stats

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError
from fl_app.config.guarantee import privacy_note
from fl_app.config.schema import ClippingMode, ClipSide, PrivacyMode, SamplingMode
from fl_app.config.schema_ftrl import FtrlParticipation
from fl_app.config.validate_privacy import check_privacy
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.privacy.tree import ftrl_round_event
from strategies.ftrl import DpFtrl, ftrl_summary
from strategies.ftrl_cap import OncePerTreeSampler, with_participation_cap
from strategies.sampling import FixedSizeSampler, PoissonSampler
from strategies.validation import TrainReply

DELTA = 1e-5


def _settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping=ClippingMode.fixed,
        noise_multiplier=2.0,
        clip=1.0,
        delta=DELTA,
        accountant=AccountantName.rdp,
        sampling=SamplingScheme.fixed,
        fraction=0.1,
        num_rounds=8,
        planned_population=1000,
        seed=3,
        secure_mode=False,
        ftrl_restart=8,
        ftrl_participation="once",
    )
    base.update(kw)
    return ClientDpSettings(**base)


def _tree_rdp_epsilon(z: float, trees: list[int]) -> float:
    """dp-accounting's once-per-tree bound, one ``SingleEpochTreeAggregationDpEvent`` per
    tree (a client may be in every tree, so trees compose)."""
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for steps in trees:
        acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, steps))
    return float(acc.get_epsilon(DELTA))


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang 2018, Thm 8: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""

    def gap(eps: float) -> float:
        n = stats.norm.cdf
        return n(-eps / mu + mu / 2) - math.exp(eps) * n(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 1e-9, 200.0))


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("k,rounds", [(8, 8), (4, 10), (5, 5), (1, 3)])
def test_once_per_tree_epsilon_after_every_round_is_dp_accountings_tree_event(
    k: int, rounds: int
) -> None:
    # After t rounds, trees of k: full trees compose, the last partial tree of r rounds
    # is SingleEpochTreeAggregationDpEvent(z, r). Checked after every round, not only at
    # the end: the ledger must bound the loss of every prefix of the run.
    s = _settings(ftrl_restart=k, num_rounds=rounds)
    events = s.planned_events()
    assert {e.mechanism for e in events} == {"tree_once"}
    assert {e.sample_rate for e in events} == {1.0}
    for t in range(1, rounds + 1):
        full, rest = divmod(t, k)
        trees = [k] * full + ([rest] if rest else [])
        got = FederationLedger(DELTA, AccountantName.rdp).project(events[:t])
        assert got == pytest.approx(_tree_rdp_epsilon(2.0, trees), rel=1e-6), t


def test_once_per_tree_under_pld_is_one_gaussian_of_the_summed_heights() -> None:
    # Two trees of 8 and one of 3: h = 4 + 4 + 2 = 10 Gaussians of z = 2 compose into
    # one Gaussian with mu = sqrt(10)/2 (PLD is exact for Gaussians up to discretisation).
    s = _settings(ftrl_restart=8, num_rounds=19, accountant=AccountantName.pld)
    got = FederationLedger(DELTA, AccountantName.pld).project(s.planned_events())
    assert got == pytest.approx(_analytic_gaussian_epsilon(math.sqrt(10) / 2.0, DELTA), rel=5e-3)


def test_only_power_of_two_positions_add_loss_and_the_ledger_names_the_bound() -> None:
    agg = DpFtrl(_settings(ftrl_restart=8, planned_population=10, fraction=0.1))
    epsilons = []
    for rnd in range(1, 9):
        assert agg.begin_round(rnd, 10) is None
        agg.aggregate(rnd, [TrainReply(rnd, {"w": np.full(3, 0.1)}, 1.0, {}, 0.1 * math.sqrt(3))])
        epsilons.append(agg.ledger.epsilon())
    ev = agg.ledger.events
    assert [e.tree_position for e in ev] == list(range(1, 9))
    assert {e.mechanism for e in ev} == {"tree_once"}
    assert [e.noise_multiplier for e in ev] == [2.0] * 8
    # Positions 1, 2, 4, 8 raise epsilon; 3, 5, 6, 7 leave it where it was.
    grew = [epsilons[0] > 0] + [b > a for a, b in itertools.pairwise(epsilons)]
    assert grew == [True, True, False, True, False, False, False, True]
    again = FederationLedger.from_json(agg.ledger.to_json())
    assert [e.tree_position for e in again.events] == list(range(1, 9))
    # Other mechanisms' ledgers keep their JSON: no tree_position key at all.
    plain = DpFtrl(_settings(ftrl_participation="arbitrary"))
    assert plain.begin_round(1, 10) is None
    assert "tree_position" not in plain.ledger.to_json()
    # ... and a ledger written before the field existed still reads.
    assert FederationLedger.from_json(plain.ledger.to_json()).events == plain.ledger.events


def test_tree_position_belongs_to_tree_once_events_only() -> None:
    kw: dict[str, Any] = dict(
        round=1,
        sampling="poisson",
        population=10,
        sample_rate=1.0,
        cohort=1.0,
        noise_multiplier=2.0,
        clip=1.0,
        update_noise_multiplier=2.0,
    )
    with pytest.raises(ValueError, match="tree_position is an int >= 1 exactly for"):
        RoundEvent(**kw, mechanism="tree_once")
    with pytest.raises(ValueError, match="tree_position is an int >= 1 exactly for"):
        RoundEvent(**kw, mechanism="tree", tree_position=1)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"found {bad!r}"):
            RoundEvent(**kw, mechanism="tree_once", tree_position=bad)
    with pytest.raises(ValueError) as err:
        ftrl_round_event(RoundEvent(**kw), 1, 10, "sampled")
    assert str(err.value) == ("participation must be one of ('arbitrary', 'once'), found 'sampled'")
    noop = RoundEvent(**kw, mechanism="tree_once", tree_position=6)
    assert noop.accounting_key().kind == "noop"
    assert isinstance(noop.dp_event(), dp_accounting.NoOpDpEvent)
    assert RoundEvent(**kw, mechanism="tree_once", tree_position=4).accounting_key().kind == (
        "poisson"
    )


# ---------------------------------------------------------------- the cap


class _Positions:
    """A stand-in for FtrlAccount: the next round's position in trees of ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.done = 0

    def next_position(self) -> int:
        return self.done % self.k + 1


def test_no_client_is_selected_twice_within_a_tree() -> None:
    # 20 clients, cohorts of 5 (q = 0.25), trees of 4: each tree uses every client
    # exactly once; the next tree may pick anyone again.
    account = _Positions(4)
    sampler = OncePerTreeSampler(FixedSizeSampler(0.25, seed=7), account)  # type: ignore[arg-type]
    nodes = list(range(100, 120))
    cohorts = []
    for rnd in range(1, 9):
        cohort = sampler.sample(nodes, rnd)
        assert sampler.sample(nodes, rnd) == cohort  # sampling a round again: same cohort
        cohorts.append(cohort)
        account.done += 1
    for tree in (cohorts[:4], cohorts[4:]):
        assert [len(c) for c in tree] == [5, 5, 5, 5]
        assert sorted(n for c in tree for n in c) == nodes
    # Without the cap the same sampler repeats clients within a tree (same draws).
    plain = [FixedSizeSampler(0.25, seed=7).sample(nodes, rnd) for rnd in range(1, 5)]
    assert len({n for c in plain for n in c}) < 20


def test_a_short_pool_gives_what_is_left_and_a_dropped_client_stays_used() -> None:
    account = _Positions(3)
    sampler = OncePerTreeSampler(FixedSizeSampler(0.4, seed=1), account)  # type: ignore[arg-type]
    first = sampler.sample(range(5), 1)  # 2 of 5
    account.done += 1
    # A selected client that then left (node 4 gone) is still used in this tree.
    second = sampler.sample([n for n in range(5) if n != 4], 2)
    account.done += 1
    third = sampler.sample(range(5), 3)
    assert len(first) == 2 and len(second) == 2 and len(third) == 1
    assert not set(first) & set(second) and not (set(first) | set(second)) & set(third)
    assert sampler.used() == set(range(5)) - (set(range(4)) - set(first) - set(second)) | set(third)


def test_the_factory_caps_only_once_per_tree_ftrl() -> None:
    fixed = FixedSizeSampler(0.1, seed=1)
    once = DpFtrl(_settings())
    capped = with_participation_cap(fixed, once)
    assert isinstance(capped, OncePerTreeSampler) and capped.inner is fixed
    assert capped.account is once.tree_account  # the cap follows the release's own tree
    arbitrary = DpFtrl(_settings(ftrl_participation="arbitrary"))
    assert with_participation_cap(fixed, arbitrary) is fixed
    with pytest.raises(ValueError) as err:
        with_participation_cap(PoissonSampler(0.1, seed=1), DpFtrl(_settings()))
    assert str(err.value) == (
        "privacy.ftrl.participation=once_per_tree needs strategy.sampling=fixed "
        "(the validator refuses anything else)"
    )


# ---------------------------------------------------------------- validation


def _ftrl_cfg(*overrides: str) -> Any:
    return compose_config(
        "config", ["experiment=digits_1000_clients_dp", "privacy=ftrl", *overrides]
    )


def test_fixed_sampling_ftrl_needs_no_replace_one_accountant() -> None:
    # DP-FTRL's events are rate-1 add/remove Gaussians: PLD is fine with fixed cohorts.
    cfg = _ftrl_cfg("strategy.sampling=fixed", "num_rounds=8", "privacy.max_epsilon=null")
    assert cfg.privacy.accountant.value == "pld"
    check_privacy(cfg)
    events = _settings(ftrl_participation="arbitrary", fraction=0.05).planned_events()
    assert not any(e.replace_one for e in events)
    # DP-FedAvg with the same sampling still needs the replace-one RDP accountant.
    cfg.privacy.ftrl.enabled = False
    with pytest.raises(ConfigConflictError, match=r"privacy\.accountant.*set privacy\.accountant"):
        check_privacy(cfg)


def test_once_per_tree_refusals_name_the_field_and_the_fix() -> None:
    cfg = _ftrl_cfg(
        "strategy.sampling=fixed",
        "privacy.ftrl.participation=once_per_tree",
        "privacy.ftrl.restart_every=20",
    )
    assert cfg.privacy.ftrl.participation is FtrlParticipation.once_per_tree
    check_privacy(cfg)  # 20 rounds x 50 clients = 1000: fits exactly
    too_long = copy.deepcopy(cfg)
    too_long.privacy.ftrl.restart_every = 21
    with pytest.raises(ConfigConflictError) as err:
        check_privacy(too_long)
    assert str(err.value).startswith("config error in `privacy.ftrl.restart_every` (found 21)")
    assert "21 rounds x 50 > 1000 clients" in str(err.value)
    assert "set privacy.ftrl.restart_every <= 20 or lower strategy.fraction_train" in str(err.value)
    one_tree = copy.deepcopy(cfg)
    one_tree.privacy.ftrl.restart_every = None  # one tree over num_rounds = 200
    with pytest.raises(ConfigConflictError, match=r"200 rounds x 50 > 1000"):
        check_privacy(one_tree)
    poisson = copy.deepcopy(cfg)
    poisson.strategy.sampling = SamplingMode.poisson
    with pytest.raises(ConfigConflictError) as err:
        check_privacy(poisson)
    assert str(err.value) == (
        "config error in `strategy.sampling` (found 'poisson'): "
        "privacy.ftrl.participation=once_per_tree draws fixed-size cohorts from the "
        "clients not yet in the tree; set strategy.sampling=fixed (DP-FTRL's epsilon "
        "uses no amplification, so Poisson sampling gains nothing)"
    )
    arbitrary = copy.deepcopy(poisson)
    arbitrary.privacy.ftrl.participation = FtrlParticipation.arbitrary
    check_privacy(arbitrary)  # the cap's checks only apply to the cap


# ---------------------------------------------------------------- the summary


def test_the_summary_says_ftrl_rests_on_no_amplification() -> None:
    arbitrary = ftrl_summary(_settings(ftrl_participation="arbitrary"))
    assert arbitrary["sample_rate_accounted"] == 1.0
    assert arbitrary["amplification"].startswith(
        "none: every round is accounted at sampling rate 1"
    )
    assert arbitrary["mechanism"].startswith("DP-FTRL")
    assert arbitrary["ftrl"]["participation"] == "arbitrary"
    assert arbitrary["ftrl"]["sensitivity_sq_per_tree"] == 92  # 2^2*7 + 64, by hand
    once = ftrl_summary(_settings())
    assert once["ftrl"]["participation"] == "once_per_tree"
    assert once["ftrl"]["sensitivity_sq_per_tree"] == 4  # ceil(log2 9)
    assert "Appendix D" in once["ftrl"]["bound"]
    assert ftrl_summary(_settings(ftrl_restart=None)) == {}  # DP-FedAvg: nothing added


def test_the_model_card_does_not_claim_amplification_for_ftrl() -> None:
    from fl_app.release.card import _client_level_card

    cfg = _ftrl_cfg("strategy.sampling=fixed", "num_rounds=2")
    s = _settings(num_rounds=2)
    ledger = FederationLedger(DELTA, AccountantName.rdp)
    for event in s.planned_events():
        ledger = ledger.add(event)
    central = {"against_server": {"epsilon_max_over_clients": None, "note": "central DP"}}
    summary = {"privacy": {"epsilon": 1.0, "delta": DELTA, "client_level": central}}
    fedavg = _client_level_card(cfg, summary, ledger)  # DP-FedAvg's statement, unchanged
    assert fedavg["epsilon_is"].startswith("against outsiders, who do not know the cohorts")
    summary["privacy"]["client_level"] = {**central, **ftrl_summary(s)}
    card = _client_level_card(cfg, summary, ledger)
    assert card["epsilon_is"] == (
        "against anyone but the server, whether or not they know the cohorts (DP-FTRL: "
        "every round accounted at sampling rate 1, no amplification by sampling)"
    )
    assert card["ftrl"]["participation"] == "once_per_tree"
    assert card["sample_rate_q"] == 1.0


def test_the_card_caveats_do_not_claim_amplification_for_ftrl() -> None:
    from fl_app.release.caveats import not_protected

    cfg = _ftrl_cfg("strategy.sampling=fixed", "privacy.ftrl.restart_every=20")
    items = not_protected(cfg)
    assert not any("amplification by sampling in epsilon" in i for i in items)
    assert any(
        i.startswith("DP-FTRL: epsilon is accounted at sampling rate 1 for arbitrary")
        for i in items
    )
    cfg.privacy.ftrl.participation = FtrlParticipation.once_per_tree
    assert any("a cap the server enforced by cohort selection" in i for i in not_protected(cfg))
    cfg.privacy.ftrl.enabled = False  # DP-FedAvg keeps its sampling caveat
    assert any("amplification by sampling in epsilon" in i for i in not_protected(cfg))


def test_the_privacy_note_names_the_bound_the_ledger_used() -> None:
    cfg = _ftrl_cfg("strategy.sampling=fixed", "privacy.ftrl.restart_every=20")
    assert "accounted for arbitrary participation" in privacy_note(cfg)
    cfg.privacy.ftrl.participation = FtrlParticipation.once_per_tree
    note = privacy_note(cfg)
    assert "arbitrary participation" not in note
    assert (
        "epsilon is accounted with each client at most once per tree, a cap the server "
        "enforced by cohort selection, with no amplification by sampling" in note
    )


@pytest.mark.slow
def test_a_capped_run_accounts_the_tree_bound_end_to_end(tmp_path: Path) -> None:
    from fl_app.runtime.simulation import run_simulation_experiment

    # 12 clients, cohorts of 3, trees of 4 rounds (4 x 3 = 12), 6 rounds: the ledger
    # holds trees of 4 and 2, i.e. h = 3 + 2 = 5 Gaussians of z = 2.
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=ftrl",
            "dataset.num_partitions=12",
            "federated_eval_every=0",
            "num_rounds=6",
            "strategy.sampling=fixed",
            "strategy.fraction_train=0.25",
            "strategy.min_available_nodes=12",
            "privacy.noise_multiplier=2.0",
            "privacy.accountant=rdp",
            "privacy.secure_mode=false",
            "privacy.ftrl.restart_every=4",
            "privacy.ftrl.participation=once_per_tree",
        ],
    )
    summary = run_simulation_experiment(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["rounds"] == 6
    level = summary["privacy"]["client_level"]
    assert level["ftrl"]["participation"] == "once_per_tree"
    assert level["sample_rate_accounted"] == 1.0 and level["sample_rate"] == 0.25
    assert summary["privacy"]["epsilon"] == pytest.approx(_tree_rdp_epsilon(2.0, [4, 2]), 1e-6)
    ledger = FederationLedger.from_json((tmp_path / "privacy_ledger.json").read_text())
    assert [e.tree_position for e in ledger.events] == [1, 2, 3, 4, 1, 2]
