"""DP-FTRL (privacy=ftrl): tree-aggregated noise, its accounting, its run-time parts.

Expected values are worked out by hand here (the binary decomposition of each round,
the sensitivity sums, Kairouz et al. 2021's height h) or by a second computation (the
analytic Gaussian mechanism of Balle & Wang 2018; dp-accounting's tree event).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from scipy import optimize, stats

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigRangeError
from fl_app.config.guarantee import privacy_note, threat_model_text
from fl_app.config.schema import ClippingMode, ClipSide, FtrlConfig, PrivacyMode, StrategyName
from fl_app.config.validate_privacy import check_privacy
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.noise import SeededNoise
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.privacy.tree import (
    TreeAggregator,
    ftrl_round_event,
    node_level,
    tree_height,
    tree_position,
    tree_sensitivity_sq,
)
from strategies.budget import BudgetGuard
from strategies.ftrl import FTRL_NOISE_STREAM, DpFtrl
from strategies.validation import TrainReply


class _Scripted:
    """A normal source that returns the next scripted value (times ones) per call."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.calls: list[tuple[float, int]] = []

    def __call__(self, std: float, size: int) -> np.ndarray:
        self.calls.append((std, size))
        return np.full(size, self.values.pop(0))


def test_noisy_prefix_sums_are_true_prefix_sums_plus_the_nodes_of_t() -> None:
    # Round t adds one node (levels 0, 1, 0, 2, 0), draws d_t; P~_t uses t's binary
    # decomposition: 1 -> [1]; 2 -> [1,2]; 3 -> [1,2]+[3]; 4 -> [1..4]; 5 -> [1..4]+[5].
    normal = _Scripted([0.1, 0.2, 0.4, 0.8, 1.6])
    tree = TreeAggregator(noise_std=0.7)
    got = [float(tree.add({"w": np.array([s])}, normal)["w"][0]) for s in (1, 2, 3, 4, 5)]
    assert got == pytest.approx([1 + 0.1, 3 + 0.2, 6 + 0.2 + 0.4, 10 + 0.8, 15 + 0.8 + 1.6])
    assert normal.calls == [(0.7, 1)] * 5  # one draw of sigma per round, never more
    assert tree.rounds == 5


def test_every_array_gets_its_own_node_noise_in_order() -> None:
    normal = _Scripted([1.0, 2.0, 3.0, 4.0])
    tree = TreeAggregator(noise_std=2.0)
    tree.add({"a": np.zeros((2,)), "b": np.ones((1, 3))}, normal)
    out = tree.add({"a": np.ones((2,)), "b": np.ones((1, 3))}, normal)
    # Round 2's node [1,2] (draws 3.0 for "a", 4.0 for "b") replaces round 1's noise.
    np.testing.assert_allclose(out["a"], [1 + 3.0, 1 + 3.0])
    np.testing.assert_allclose(out["b"], [[2 + 4.0] * 3])
    assert normal.calls == [(2.0, 2), (2.0, 3), (2.0, 2), (2.0, 3)]


def test_levels_heights_and_sensitivities_by_hand() -> None:
    assert [node_level(t) for t in range(1, 9)] == [0, 1, 0, 2, 0, 1, 0, 3]
    # h = ceil(log2(k+1)) (Kairouz et al. 2021, App. D).
    assert [tree_height(k) for k in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]
    assert tree_sensitivity_sq(8, "once") == 4
    # Arbitrary participation: sum over rounds of 4^level: k=4: 1+4+1+16; k=8 adds 1+4+1+64.
    assert tree_sensitivity_sq(1, "arbitrary") == 1
    assert tree_sensitivity_sq(4, "arbitrary") == 22
    assert tree_sensitivity_sq(8, "arbitrary") == 92
    assert tree_sensitivity_sq(5, "arbitrary") == 23
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            node_level(bad)
    with pytest.raises(ValueError, match="participation must be one of"):
        tree_sensitivity_sq(4, "sampled")


@pytest.mark.parametrize("k", [1, 3, 8, 100])
def test_once_per_tree_matches_dp_accountings_tree_event(k: int) -> None:
    # The paper's bound as dp-accounting implements it (REPLACE_SPECIAL): one tree with a
    # client in at most one round is the Gaussian mechanism with sensitivity sqrt(h)*C.
    z, delta = 3.0, 1e-5
    ours = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    ours.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(tree_sensitivity_sq(k, "once"))))
    ref = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    ref.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, k))
    assert ours.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def _settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping=ClippingMode.fixed,
        noise_multiplier=2.0,
        clip=1.0,
        delta=1e-5,
        accountant=AccountantName.pld,
        sampling=SamplingScheme.poisson,
        fraction=0.05,
        num_rounds=8,
        planned_population=1000,
        seed=3,
        secure_mode=False,
        ftrl_restart=8,
    )
    base.update(kw)
    return ClientDpSettings(**base)


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang 2018, Thm 8: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""

    def gap(eps: float) -> float:
        n = stats.norm.cdf
        return n(-eps / mu + mu / 2) - math.exp(eps) * n(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 1e-9, 200.0))


@pytest.mark.parametrize(
    "k,rounds,expected_sq,accountant", [(4, 8, 44, "pld"), (8, 8, 92, "rdp"), (1, 8, 8, "rdp")]
)
def test_ledger_epsilon_is_one_gaussian_with_the_trees_sensitivity(
    k: int, rounds: int, expected_sq: int, accountant: str
) -> None:
    # Planned rounds compose, without amplification (rate 1, though q=0.05), into the
    # Gaussian mechanism with mu = sqrt(sum 4^level)/z: two trees of 4 -> 2*22 = 44; a
    # restart every round is unamplified DP-FedAvg, 8 rounds of sensitivity C.
    s = _settings(ftrl_restart=k, num_rounds=rounds, accountant=AccountantName(accountant))
    events = s.planned_events()
    assert {e.sample_rate for e in events} == {1.0}
    assert {e.mechanism for e in events} == {"tree"}
    assert sum((s.noise_multiplier / e.noise_multiplier) ** 2 for e in events) == pytest.approx(
        expected_sq
    )
    eps = FederationLedger(1e-5, AccountantName(accountant)).project(events)
    if accountant == "pld":  # PLD is exact for Gaussians up to its discretisation
        expected = _analytic_gaussian_epsilon(math.sqrt(expected_sq) / 2.0, 1e-5)
        assert eps == pytest.approx(expected, rel=5e-3)
    else:  # RDP: the same Gaussian, by dp-accounting's own RDP accountant
        ref = RdpAccountant()
        ref.compose(dp_accounting.GaussianDpEvent(2.0 / math.sqrt(expected_sq)))
        assert eps == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)


def _reply(node: int, value: float) -> TrainReply:
    return TrainReply(node, {"w": np.full(3, value)}, 1.0, {}, abs(value) * math.sqrt(3))


def test_the_model_is_theta0_plus_the_noisy_prefix_over_m_and_trees_restart() -> None:
    # Two clients (full participation, m = 2), C = 1 clips nothing; trees of 4 rounds.
    s = _settings(
        sampling=SamplingScheme.fixed,
        fraction=1.0,
        planned_population=2,
        ftrl_restart=4,
        accountant=AccountantName.rdp,
    )
    agg = DpFtrl(s)
    sigma = 2.0  # z * C

    def noise(rnd: int) -> np.ndarray:
        return SeededNoise(3, (rnd, FTRL_NOISE_STREAM)).normal(sigma, 3)

    sums = {1: 0.2, 2: 0.4, 3: -0.2, 4: 0.1, 5: 0.3}  # each client sends sums[t]/2 * ones
    released: dict[int, np.ndarray] = {}
    for rnd in range(1, 6):
        assert agg.begin_round(rnd, 2) is None
        out = agg.aggregate(rnd, [_reply(1, sums[rnd] / 2), _reply(2, sums[rnd] / 2)])
        released[rnd] = out.update["w"]
    total = np.zeros(3)
    model = []
    for rnd in range(1, 6):
        total = total + released[rnd]
        model.append(total.copy())
    # theta_t - theta_0 = P~_t / m, nodes: [1], [1,2], [1,2]+[3], [1..4]; then a new tree.
    np.testing.assert_allclose(model[0], (0.2 + noise(1)) / 2)
    np.testing.assert_allclose(model[1], (0.6 + noise(2)) / 2)
    np.testing.assert_allclose(model[2], (0.4 + noise(2) + noise(3)) / 2)
    np.testing.assert_allclose(model[3], (0.5 + noise(4)) / 2)
    np.testing.assert_allclose(released[5], (0.3 + noise(5)) / 2)
    got = [e.noise_multiplier for e in agg.ledger.events]
    assert got == pytest.approx([2.0, 1.0, 2.0, 0.5, 2.0])
    assert [e.update_noise_multiplier for e in agg.ledger.events] == [2.0] * 5


def test_a_resumed_run_starts_a_fresh_tree_and_accounts_it() -> None:
    s = _settings(
        sampling=SamplingScheme.fixed,
        fraction=1.0,
        planned_population=2,
        ftrl_restart=4,
        accountant=AccountantName.rdp,
    )
    first = DpFtrl(s)
    for rnd in (1, 2):
        assert first.begin_round(rnd, 2) is None
        first.aggregate(rnd, [_reply(1, 0.1), _reply(2, 0.1)])
    again = DpFtrl(s, first.ledger)
    again.restore_state(first.export_state(), 2)
    assert again.begin_round(3, 2) is None
    # Round 3 is position 1 of the new tree (a leaf node), not position 3 of the old one.
    assert again.ledger.events[-1].noise_multiplier == pytest.approx(2.0)
    out = again.aggregate(3, [_reply(1, 0.1), _reply(2, 0.1)])
    expected = (0.2 + SeededNoise(3, (3, FTRL_NOISE_STREAM)).normal(2.0, 3)) / 2
    np.testing.assert_allclose(out.update["w"], expected)
    assert out.metrics["dp_ftrl_tree_position"] == 1.0


def test_privacy_ftrl_composes_and_bad_combinations_name_the_field() -> None:
    cfg = compose_config("config", ["privacy=ftrl"])
    assert cfg.privacy.ftrl.enabled and cfg.privacy.ftrl.restart_every == 8
    bad: list[tuple[str, Any, type[Exception], str]] = [
        ("clipping", ClippingMode.adaptive, ConfigConflictError, "privacy.clipping"),
        ("ftrl", FtrlConfig(True, 0), ConfigRangeError, "privacy.ftrl.restart_every"),
        ("target_epsilon", 3.0, ConfigConflictError, "privacy.target_epsilon"),
        ("mode", PrivacyMode.local, ConfigConflictError, "privacy.ftrl.enabled"),
    ]
    for name, value, kind, field_name in bad:
        broken = copy.deepcopy(cfg)
        setattr(broken.privacy, name, value)
        with pytest.raises(kind, match=field_name.replace(".", r"\.")):
            check_privacy(broken)
    broken = copy.deepcopy(cfg)
    broken.strategy.name = StrategyName.fedadam
    with pytest.raises(ConfigConflictError, match=r"use strategy\.name=fedavg"):
        check_privacy(broken)


def test_the_run_says_its_epsilon_does_not_rest_on_a_secret_sample() -> None:
    cfg = compose_config("config", ["privacy=ftrl"])
    assert "no amplification by sampling" in privacy_note(cfg)
    assert "whoever knows or picks the cohorts" in threat_model_text(cfg)
    cfg.privacy.ftrl.enabled = False  # DP-FedAvg's statement says nothing of the kind
    assert "cohorts" not in privacy_note(cfg) + threat_model_text(cfg)


# ---- edges pinned by mutation testing (scoped mutmut on tree.py and strategies/ftrl.py)


def test_eight_rounds_keep_only_the_nodes_of_each_binary_decomposition() -> None:
    # 6 = [1..4] + [5,6]; 7 adds [7]; 8 = [1..8]: draws d_t = t/10 of round t's node.
    normal = _Scripted([t / 10 for t in range(1, 9)])
    tree = TreeAggregator(noise_std=1.0)
    got = [float(tree.add({"w": np.array([1.0])}, normal)["w"][0]) for _ in range(8)]
    assert got[5] == pytest.approx(6 + 0.4 + 0.6)
    assert got[6] == pytest.approx(7 + 0.4 + 0.6 + 0.7)
    assert got[7] == pytest.approx(8 + 0.8)


def test_a_column_shaped_array_keeps_its_shape() -> None:
    tree = TreeAggregator(noise_std=1.0)
    out = tree.add({"b": np.ones((3, 1))}, _Scripted([0.5]))
    assert out["b"].shape == (3, 1)
    np.testing.assert_allclose(out["b"], [[1.5]] * 3)


def test_tree_argument_refusals_name_the_value() -> None:
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match=r"tree rounds must be an int >= 1, found"):
            tree_height(bad)  # type: ignore[arg-type]
    for std in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"noise_std must be finite and > 0, found"):
            TreeAggregator(noise_std=std)
    with pytest.raises(ValueError, match=r"^an empty tree has no prefix sum$"):
        TreeAggregator(noise_std=1.0).prefix()
    assert [tree_position(r, 4) for r in (1, 4, 5, 8, 9)] == [1, 4, 1, 4, 1]


def test_a_round_event_is_rate_one_add_remove_at_the_given_population() -> None:
    base = RoundEvent(
        round=3,
        sampling=SamplingScheme.fixed,
        population=4,
        sample_rate=0.5,
        cohort=2,
        noise_multiplier=3.0,
        clip=1.0,
        update_noise_multiplier=3.0,
        branch_delta=0.01,
    )
    event = ftrl_round_event(base, 4, 10)
    assert (event.sampling, event.population, event.sample_rate) == (
        SamplingScheme.poisson,
        10,
        1.0,
    )
    assert (event.noise_multiplier, event.branch_delta, event.mechanism) == (0.75, 0.0, "tree")
    assert not event.replace_one


def _fixed(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        sampling=SamplingScheme.fixed,
        fraction=1.0,
        planned_population=2,
        ftrl_restart=4,
        accountant=AccountantName.rdp,
    )
    base.update(kw)
    return _settings(**base)


def test_metrics_weight_positions_and_the_servers_clip() -> None:
    agg = DpFtrl(_fixed())
    assert agg.settings.ftrl_restart == 4
    positions, rounds = [], []
    for rnd in range(1, 6):
        assert agg.begin_round(rnd, 2) is None
        # Client 2 sends norm 2*sqrt(3) > C = 1: the server clips it (clip_side=server).
        out = agg.aggregate(rnd, [_reply(1, 0.1), _reply(2, 2.0)])
        assert out.total_weight == 2.0
        assert {
            k: out.metrics[k] for k in ("dp_clip", "dp_noise_std_node", "dp_expected_cohort")
        } == {"dp_clip": 1.0, "dp_noise_std_node": 2.0, "dp_expected_cohort": 2.0}
        assert "dp_server_reclipped" not in out.metrics
        positions.append(out.metrics["dp_ftrl_tree_position"])
        rounds.append(out.metrics["dp_ftrl_node_rounds"])
        if rnd == 1:  # (0.1 + 1/sqrt(3)) per coordinate, plus the node noise, over m = 2
            noise = SeededNoise(3, (1, FTRL_NOISE_STREAM)).normal(2.0, 3)
            np.testing.assert_allclose(out.update["w"], (0.1 + 1 / math.sqrt(3) + noise) / 2)
    assert positions == [1.0, 2.0, 3.0, 4.0, 1.0]
    assert rounds == [1.0, 2.0, 1.0, 4.0, 1.0]
    assert agg.status()["dp_epsilon"] == pytest.approx(agg.ledger.epsilon())
    assert agg.status()["dp_epsilon"] > 0


def test_an_empty_round_releases_the_nodes_noise_and_populations_are_recorded() -> None:
    agg = DpFtrl(_fixed())
    assert agg.begin_round(1, 0) is None
    assert agg.ledger.events[-1].population == 1
    out = agg.release_without_sum(1, {"w": np.zeros(3)})
    assert out is not None and out.total_weight == 0.0
    # No one connected: population 1, so the fixed cohort (fraction 1) and divisor are 1.
    np.testing.assert_allclose(
        out.update["w"], SeededNoise(3, (1, FTRL_NOISE_STREAM)).normal(2.0, 3)
    )
    assert agg.begin_round(2, 1) is None
    assert agg.ledger.events[-1].population == 1


def test_the_budget_guard_stops_before_a_round_and_fresh_generations_redraw() -> None:
    tight = DpFtrl(_fixed(), budget=BudgetGuard(0.01))
    assert tight.begin_round(1, 2) is not None
    assert tight.ledger.events == ()
    loose = DpFtrl(_fixed(), budget=BudgetGuard(1e6))
    assert loose.begin_round(1, 2) is None
    agg = DpFtrl(_fixed())
    agg.noise_generation = 1
    agg.begin_round(1, 2)
    out = agg.aggregate(1, [_reply(1, 0.0), _reply(2, 0.0)])
    np.testing.assert_allclose(
        out.update["w"], SeededNoise(3, (1, FTRL_NOISE_STREAM, 1)).normal(2.0, 3) / 2
    )
    secure = [DpFtrl(_fixed(secure_mode=True)) for _ in range(2)]
    draws = []
    for a in secure:
        a.begin_round(1, 2)
        draws.append(a.aggregate(1, [_reply(1, 0.0), _reply(2, 0.0)]).update["w"])
    assert not np.allclose(draws[0], draws[1])  # OS-keyed, never the seed's stream


def test_ftrl_needs_its_restart_setting_and_a_resume_counts_after_the_ledger() -> None:
    with pytest.raises(ValueError, match=r"^FtrlAccount needs settings\.ftrl_restart"):
        DpFtrl(_fixed(ftrl_restart=None))
    first = DpFtrl(_fixed())
    for rnd in (1, 2, 3):  # round 3 recorded, then interrupted
        first.begin_round(rnd, 2)
    again = DpFtrl(first.settings, first.ledger)
    again.restore_state(first.export_state(), 2)
    assert again.begin_round(3, 2) is None
    assert again.ledger.events[-1].round == 4
