"""Client-level canaries (fl_app.privacy_audit.client_canaries): replay, views, bounds.

Expected values are worked out independently: noise-free replays with orthogonal
directions have closed-form scores (``C_t`` times the rounds an included canary was
in, divided by the round's divisor); the ε a Gaussian mechanism really has comes from
dp-accounting's PLD accountant (not from fl_app), and the noise multiplier for a target
ε is solved here with ``scipy.optimize.brentq``. The bound's own maths is checked in
tests/test_one_run_audit.py against the paper's formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.privacy_audit.client_canaries import (
    ClientCanaries,
    NoiseSite,
    RoundMechanism,
    client_canary_audit,
    draw_client_canaries,
    replay_rounds,
    rounds_from_run,
)
from fl_app.privacy_audit.one_run import (
    AccountingBugSuspected,
    check_against_accounted,
    epsilon_lower_bound,
    guess_from_scores,
)
from fl_app.server.layout import LEDGER_FILE, MODEL_FILE, SUMMARY_FILE
from fl_app.weights import save_safetensors

_K = 1000  # canaries: 250 + 250 guesses
_DIM = 2000


def _gaussian_epsilon(z: float, rounds: int, delta: float = 1e-5) -> float:
    """Exact ε of ``rounds`` Gaussian releases (sensitivity 1, std z): one Gaussian with
    ``mu = sqrt(rounds)/z``, whose δ(ε) = Φ(-ε/mu + mu/2) - e^ε Φ(-ε/mu - mu/2) (Balle &
    Wang 2018, Theorem 8), solved for ε."""
    mu = math.sqrt(rounds) / z

    def delta_of(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    return float(brentq(lambda e: delta_of(e) - delta, 0.0, 100.0))


def _z_for(eps: float, rounds: int) -> float:
    return float(brentq(lambda z: _gaussian_epsilon(z, rounds) - eps, 0.2, 60.0))


def _bound(scores: np.ndarray, included: np.ndarray) -> float:
    g = guess_from_scores(scores, included, _K // 4, _K // 4)
    return epsilon_lower_bound(g.canaries, g.guesses, g.correct, 1e-5, 0.95)


def _identity_canaries(included: list[bool]) -> ClientCanaries:
    k = len(included)
    return ClientCanaries(directions=np.eye(k, 2 * k), included=np.array(included))


# ------------------------------------------------------------------ the replay


def test_canary_directions_are_unit_reproducible_and_half_included() -> None:
    a = draw_client_canaries(400, 50, np.random.default_rng(7))
    b = draw_client_canaries(400, 50, np.random.default_rng(7))
    assert np.array_equal(a.directions, b.directions) and np.array_equal(a.included, b.included)
    assert a.directions.shape == (400, 50)
    assert np.allclose(np.linalg.norm(a.directions, axis=1), 1.0)
    assert 170 <= int(a.included.sum()) <= 230  # Binomial(400, 1/2): sd 10
    # Uniform on the sphere: the mean direction is near 0 (each coordinate sd 1/sqrt(50*400)).
    assert np.abs(a.directions.mean(axis=0)).max() < 0.05
    with pytest.raises(ValueError, match="--client-canaries"):
        draw_client_canaries(3, 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="dim=0"):
        draw_client_canaries(8, 0, np.random.default_rng(0))


@pytest.mark.parametrize("site", [0, 1, 2, 3])
def test_noise_free_replay_scores_are_clip_over_divisor_per_round(site: int) -> None:
    """Orthogonal canaries, every canary in every round, no noise: released score of an
    included canary = sum_t C_t / m_t = 2/4 + 3/5; the server sees C_t per round."""
    noise_site = list(NoiseSite)[site]
    c = _identity_canaries([True, False, True, False])
    rounds = [
        RoundMechanism(2.0, 0.0, 4.0, 1.0, noise_site),
        RoundMechanism(3.0, 0.0, 5.0, 1.0, noise_site),
    ]
    s = replay_rounds(c, rounds, np.random.default_rng(0))
    assert s.released == pytest.approx([2 / 4 + 3 / 5, 0, 2 / 4 + 3 / 5, 0], abs=1e-12)
    assert s.server == pytest.approx([5.0, 0, 5.0, 0], abs=1e-12)


def test_sampling_decides_which_rounds_a_canary_is_in() -> None:
    """q = 0.3 over 200 rounds: an included canary's noise-free server score is C times
    the rounds it was in (Binomial(200, 0.3): mean 60, sd 6.5), its released score that
    over the divisor; excluded canaries score 0 whatever their cohorts."""
    c = _identity_canaries([True] * 20 + [False] * 20)
    rounds = [RoundMechanism(1.0, 0.0, 2.0, 0.3, NoiseSite.server)] * 200
    s = replay_rounds(c, rounds, np.random.default_rng(1))
    counts = s.server[:20]
    assert np.all(counts == np.round(counts)) and counts.min() >= 40 and counts.max() <= 80
    assert len(set(counts.tolist())) > 3  # independent participation, not all-or-none
    assert s.released[:20] == pytest.approx(counts / 2.0)
    assert np.all(s.server[20:] == 0) and np.all(s.released[20:] == 0)


def test_central_noise_is_added_after_the_server_view_distributed_before() -> None:
    """One included canary, σ = 10: central DP's server view is exactly C (no noise), its
    release is noisy; distributed DP's server view is the noisy sum the release divides."""
    c = _identity_canaries([True, False])
    central = replay_rounds(
        c, [RoundMechanism(1.0, 10.0, 1.0, 1.0, NoiseSite.server)], np.random.default_rng(2)
    )
    assert central.server == pytest.approx([1.0, 0.0], abs=1e-12)
    assert abs(central.released[0] - 1.0) > 1e-3
    dist = replay_rounds(
        c, [RoundMechanism(1.0, 10.0, 4.0, 1.0, NoiseSite.clients)], np.random.default_rng(2)
    )
    assert dist.released == pytest.approx(dist.server / 4.0, abs=1e-12)
    assert abs(dist.server[0] - 1.0) > 1e-3


def test_round_mechanism_refuses_impossible_values() -> None:
    for args in ((0.0, 1.0, 1.0, 1.0), (1.0, -1.0, 1.0, 1.0), (1.0, 1.0, 0.0, 1.0)):
        with pytest.raises(ValueError, match=r"privacy_ledger\.json"):
            RoundMechanism(*args, NoiseSite.server)
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match="participation"):
            RoundMechanism(1.0, 1.0, 1.0, q, NoiseSite.server)


# ------------------------------------------------------------------ must-holds


def test_non_private_mean_gives_a_bound_clearly_above_zero() -> None:
    rng = np.random.default_rng(0)
    c = draw_client_canaries(_K, _DIM, rng)
    s = replay_rounds(c, [RoundMechanism(1.0, 0.0, 10.0, 1.0, NoiseSite.none)] * 3, rng)
    # At most logit(0.05^(1/500)) = 5.1 from 500 guesses; cross-talk of 2000-dim
    # directions costs a few guesses.
    assert _bound(s.released, c.included) > 2.0
    assert _bound(s.server, c.included) > 2.0


@pytest.mark.parametrize("site", [0, 1, 2])
def test_client_level_dp_at_epsilon_one_stays_below_one_and_the_accounted(site: int) -> None:
    """3 rounds, every client in each, z for ε=1 at δ=1e-5 (exact Gaussian ε, above).
    Local DP's release is replace-one (sensitivity 2C, z/2 per release): the canary's
    change of C makes the same z a stronger guarantee, so the bound stays below too."""
    noise_site = [NoiseSite.server, NoiseSite.clients, NoiseSite.each_client][site]
    z = _z_for(1.0, 3)
    accounted = _gaussian_epsilon(z, 3)
    assert accounted == pytest.approx(1.0, abs=1e-3)
    rng = np.random.default_rng(0)
    c = draw_client_canaries(_K, _DIM, rng)
    s = replay_rounds(c, [RoundMechanism(1.0, z, 10.0, 1.0, noise_site)] * 3, rng)
    released = _bound(s.released, c.included)
    assert released < 1.0 and released < accounted
    if noise_site is not NoiseSite.server:  # central DP trusts the server
        server = _bound(s.server, c.included)
        assert server < 1.0 and server < accounted


# ------------------------------------------------------------------ from a run directory


def _write_run(
    run_dir: Path, summary: dict[str, Any], ledger: FederationLedger | None, dim: int = _DIM
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    if ledger is not None:
        (run_dir / LEDGER_FILE).write_text(ledger.to_json())
    save_safetensors(run_dir / MODEL_FILE, {"w": np.zeros((dim,), np.float32)}, {})


def _event(
    rnd: int,
    sampling: SamplingScheme,
    population: int,
    rate: float,
    *,
    noise_multiplier: float,
    clip: float,
    update_noise_multiplier: float,
    encoding_slack: float = 0.0,
) -> RoundEvent:
    """A ledger round with an expected cohort of 10."""
    return RoundEvent(
        round=rnd,
        sampling=sampling,
        population=population,
        sample_rate=rate,
        cohort=10.0,
        noise_multiplier=noise_multiplier,
        clip=clip,
        update_noise_multiplier=update_noise_multiplier,
        encoding_slack=encoding_slack,
    )


def _central_run(run_dir: Path, z: float, rounds: int, reported_eps: float) -> None:
    events = tuple(
        _event(t, SamplingScheme.poisson, 10, 1.0, noise_multiplier=z, clip=1.0,
               update_noise_multiplier=z)
        for t in range(1, rounds + 1)
    )  # fmt: skip
    ledger = FederationLedger(delta=1e-5, events=events)
    privacy = {"mode": "central", "epsilon": reported_eps, "delta": 1e-5}
    summary = {"rounds": rounds, "privacy": {**privacy, "client_level": {"clip": 1.0}}}
    _write_run(run_dir, summary, ledger)


def test_rounds_from_run_reads_the_ledger_events() -> None:
    ev = [
        _event(1, SamplingScheme.poisson, 50, 0.2, noise_multiplier=1.2, clip=0.5,
               update_noise_multiplier=1.5, encoding_slack=0.1).to_dict(),
        _event(2, SamplingScheme.fixed, 40, 0.25, noise_multiplier=1.2, clip=0.7,
               update_noise_multiplier=1.2).to_dict(),
    ]  # fmt: skip
    ledger = {"events": ev}
    got = rounds_from_run({"privacy": {"mode": "distributed"}}, ledger, 2)
    assert got == [
        RoundMechanism(0.5, 1.5 * 0.6, 10.0, 0.2, NoiseSite.clients),
        RoundMechanism(0.7, 1.2 * 0.7, 10.0, 10 / 40, NoiseSite.clients),
    ]
    assert rounds_from_run({"privacy": {"mode": "central"}}, ledger, 2)[0].noise_site is (
        NoiseSite.server
    )
    local = {"privacy": {"mode": "local", "client_level": {"clip": 2.0}}}
    assert (
        rounds_from_run(local, {"local_noise_multiplier": 3.0}, 4)
        == [RoundMechanism(2.0, 6.0, 1.0, 1.0, NoiseSite.each_client)] * 4
    )
    assert (
        rounds_from_run({"privacy": {"mode": "none"}}, None, 2)
        == [RoundMechanism(1.0, 0.0, 1.0, 1.0, NoiseSite.none)] * 2
    )
    with pytest.raises(ValueError, match=r"privacy_ledger\.json"):
        rounds_from_run({"privacy": {"mode": "central"}}, None, 2)
    with pytest.raises(ValueError, match="records no round"):
        rounds_from_run({"privacy": {"mode": "central"}}, {"events": []}, 2)
    with pytest.raises(ValueError, match="local_noise_multiplier"):
        rounds_from_run({"privacy": {"mode": "local"}}, {}, 2)


def test_an_epsilon_under_reported_ten_times_is_flagged(tmp_path: Path) -> None:
    """Central DP, 2 rounds, every client in each, z for a true ε=4 (exact Gaussian ε). The
    honest summary passes; a test double reporting ε/10 fails the audit. The server's
    view is reported (exact sums: high bound) but central DP never compares it."""
    z = _z_for(4.0, 2)
    true_eps = _gaussian_epsilon(z, 2)
    _central_run(tmp_path / "honest", z, 2, true_eps)
    bounds, section = client_canary_audit(tmp_path / "honest", _K, seed=0)
    released = bounds["released_model"]
    assert 0.4 < released.epsilon_lower_bound < true_eps
    check_against_accounted(released)
    assert bounds["server_view"].accounted_epsilon is None
    assert bounds["server_view"].epsilon_lower_bound > 2.0
    assert section["released_model"]["accounted_epsilon"] == pytest.approx(true_eps)
    assert (section["canaries"], section["dimension"], section["rounds_replayed"]) == (
        _K, _DIM, 2)  # fmt: skip
    assert section["released_model"]["guesses"] == _K // 2
    assert section["mode"] == "central"
    _central_run(tmp_path / "double", z, 2, true_eps / 10)
    under, _ = client_canary_audit(tmp_path / "double", _K, seed=0)
    assert under["released_model"].epsilon_lower_bound == released.epsilon_lower_bound
    with pytest.raises(AccountingBugSuspected, match="accounting bug"):
        check_against_accounted(under["released_model"])


def test_distributed_server_view_is_compared_with_epsilon_against_the_server(
    tmp_path: Path,
) -> None:
    z = _z_for(1.0, 2)
    events = tuple(
        _event(t, SamplingScheme.poisson, 10, 1.0, noise_multiplier=z, clip=1.0,
               update_noise_multiplier=z)
        for t in (1, 2)
    )  # fmt: skip
    against = {"against_server": {"epsilon_planned_worst_case": 1.0}}
    privacy = {"mode": "distributed", "epsilon": 1.0, "delta": 1e-5, "client_level": against}
    summary = {"rounds": 2, "privacy": privacy}
    _write_run(tmp_path, summary, FederationLedger(delta=1e-5, events=events))
    bounds, section = client_canary_audit(tmp_path, _K, seed=0)
    assert bounds["server_view"].accounted_epsilon == 1.0
    for b in bounds.values():
        assert b.epsilon_lower_bound < 1.0
        check_against_accounted(b)
    assert "noise shares" in section["server_sees"]


def test_local_dp_compares_both_views_with_a_client_releasing_every_round(
    tmp_path: Path,
) -> None:
    """Local DP's ε per client: R releases of GaussianDpEvent(z/2) (replace-one,
    sensitivity 2C), the exact Gaussian ε here; fl_app's accountant is PLD."""
    ledger = FederationLedger(delta=1e-5, local_noise_multiplier=8.0)
    summary = {"rounds": 3, "privacy": {"mode": "local", "epsilon": 0.01, "delta": 1e-5,
               "client_level": {"clip": 1.0, "accountant": "pld"}}}  # fmt: skip
    _write_run(tmp_path, summary, ledger, dim=500)
    bounds, _ = client_canary_audit(tmp_path, 200, seed=0)
    expected = _gaussian_epsilon(4.0, 3)
    for b in bounds.values():
        assert b.accounted_epsilon == pytest.approx(expected, rel=1e-3)
        check_against_accounted(b)


# ------------------------------------------------------------------ edges (mutation testing)


def test_four_canaries_and_one_dimension_are_enough() -> None:
    c = draw_client_canaries(4, 1, np.random.default_rng(0))
    assert c.directions.shape == (4, 1) and np.allclose(np.abs(c.directions), 1.0)


def test_noise_below_one_is_still_added_and_local_noise_is_per_coordinate() -> None:
    """σ = 0.5 on the sum (distributed): the server's view moves off C; local DP, σ = 1,
    one excluded canary in 2000 dimensions: the released update is N(0, 1) per coordinate
    (sample sd near 1, not one value broadcast to every coordinate)."""
    c = _identity_canaries([True, False])
    d = replay_rounds(
        c, [RoundMechanism(1.0, 0.5, 1.0, 1.0, NoiseSite.clients)], np.random.default_rng(3)
    )
    assert abs(d.server[0] - 1.0) > 1e-6
    one = ClientCanaries(directions=np.eye(1, 2000), included=np.array([False]))
    rng = np.random.default_rng(4)
    rounds = [RoundMechanism(1.0, 1.0, 1.0, 1.0, NoiseSite.each_client)]
    delta = replay_rounds(one, rounds, rng)
    # The released score is the first coordinate; the server's, its own update's: equal.
    assert delta.released == pytest.approx(delta.server)
    noise = np.random.default_rng(4)
    noise.random(size=1)  # the cohort draw
    expected = noise.standard_normal((1, 2000))[0]
    assert delta.released[0] == pytest.approx(expected[0])
    assert 0.9 < float(np.std(expected)) < 1.1
    # Two excluded canaries on coordinates 0 and 1: their noise differs per coordinate.
    two = replay_rounds(_identity_canaries([False, False]), rounds, np.random.default_rng(5))
    assert two.released[0] != two.released[1]


def _none_run(run_dir: Path, rounds: int | None, **privacy: Any) -> None:
    summary: dict[str, Any] = {"privacy": {"mode": "none", **privacy}}
    if rounds is not None:
        summary["rounds"] = rounds
    _write_run(run_dir, summary, None, dim=300)


def test_a_run_without_dp_needs_no_ledger_and_is_compared_with_nothing(tmp_path: Path) -> None:
    """One plain round, δ taken from summary.json (1e-4), or 1e-5 when it has none."""
    _none_run(tmp_path / "a", 1, delta=1e-4)
    bounds, section = client_canary_audit(tmp_path / "a", 40, seed=0)
    assert (section["mode"], section["rounds_replayed"], section["dimension"]) == ("none", 1, 300)
    assert 5 <= section["included"] <= 35  # Binomial(40, 1/2): sd 3.2
    assert section["server_sees"] == "the plain sum (no DP)"
    for b in bounds.values():
        assert (b.accounted_epsilon, b.delta) == (None, 1e-4)
        assert (b.guesses.guesses, b.guesses.correct) == (20, 20)
    _none_run(tmp_path / "b", 2)
    assert client_canary_audit(tmp_path / "b", 40, seed=0)[0]["server_view"].delta == 1e-5
    _none_run(tmp_path / "c", None)
    with pytest.raises(ValueError, match="0 rounds"):
        client_canary_audit(tmp_path / "c", 40, seed=0)
    # A summary without privacy.mode is a run without DP.
    _write_run(tmp_path / "d", {"rounds": 1, "privacy": {}}, None, dim=300)
    bounds, section = client_canary_audit(tmp_path / "d", 40, seed=0)
    assert section["mode"] == "none" and bounds["released_model"].accounted_epsilon is None
    local = {"mode": "local", "client_level": {"clip": 1.0, "accountant": "pld"}}
    _write_run(tmp_path / "e", {"rounds": 0, "privacy": local}, FederationLedger(delta=1e-5))
    with pytest.raises(ValueError, match="0 rounds"):
        client_canary_audit(tmp_path / "e", 40, seed=0)


def test_the_model_file_named_in_the_summary_sets_the_dimension(tmp_path: Path) -> None:
    _none_run(tmp_path, 1)
    save_safetensors(tmp_path / "other.safetensors", {"a": np.zeros((3, 5), np.float32)}, {})
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({**summary, "model_file": "other.safetensors"}))
    assert client_canary_audit(tmp_path, 8, seed=0)[1]["dimension"] == 15


def test_accounted_epsilon_edges() -> None:
    """Central DP never compares the server view, even if a summary carried a worst case;
    a central summary without ε compares nothing; a ledger event from before
    encoding_slack existed reads as slack 0; a fixed-size event's rate is m/N, not the
    informational sample_rate; local DP needs both z and C."""
    from fl_app.privacy_audit.client_canaries import _accounted

    against = {"against_server": {"epsilon_planned_worst_case": 7.0}}
    central = {"privacy": {"mode": "central", "epsilon": 2.0, "client_level": against}}
    assert _accounted(central, {"events": []}, 1)["server"] is None
    assert _accounted({"privacy": {"mode": "central"}}, {"events": []}, 1)["released"] is None
    old = {"clip": 2.0, "update_noise_multiplier": 1.5, "cohort": 10.0, "sampling": "poisson",
           "sample_rate": 0.5, "population": 20}  # fmt: skip
    assert rounds_from_run(central, {"events": [old]}, 1)[0].noise_std == 3.0
    fixed = {**old, "sampling": "fixed", "sample_rate": 0.3}
    assert rounds_from_run(central, {"events": [fixed]}, 1)[0].participation == 0.5
    poisson = {**old, "sample_rate": 0.3}  # Poisson: the rate itself, not cohort / N
    assert rounds_from_run(central, {"events": [poisson]}, 1)[0].participation == 0.3
    local = {"privacy": {"mode": "local", "client_level": {"clip": 2.0}}}
    with pytest.raises(ValueError, match="local_noise_multiplier"):
        rounds_from_run(local, {"local_noise_multiplier": None}, 2)
    with pytest.raises(ValueError, match="local_noise_multiplier"):
        rounds_from_run({"privacy": {"mode": "local"}}, {"local_noise_multiplier": 3.0}, 2)
