"""The one-run audit: its bound (Steinke, Nasr & Jagielski 2023) and its canaries.

Expected bounds are worked out independently of :mod:`fl_app.privacy_audit.one_run`:
a closed form where there is one (δ = 0 and every guess right: ``q(ε)^r = β``, so
``ε = logit(β^(1/r))``), else the paper's p-value re-derived here with ``math.comb``
(no scipy) and solved with ``scipy.optimize.brentq``. The randomized-response case is
a mechanism whose ε is known exactly (each canary's guess is right with probability
``e^ε / (1 + e^ε)``), so it checks soundness (the bound stays below the true ε) and
the flag on an accountant that under-reports it 10x. The training cases use digits,
the repository's MLP and seeded draws (canaries rng 0, init 0, training generator 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy.optimize import brentq
from sklearn.datasets import load_digits

from fl_app.config.compose import compose_config, config_to_dict, to_app_config
from fl_app.config.schema import AppConfig, ClientTrainConfig, ModelConfig
from fl_app.models import build_model
from fl_app.privacy.dpsgd import planned_steps, train_dpsgd
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy_audit.canaries import (
    _rerun_config,
    _site_files,
    accounted_guarantee,
    canary_scores,
    draw_canaries,
    one_run_audit,
)
from fl_app.privacy_audit.one_run import (
    AccountingBugSuspected,
    Guesses,
    OneRunBound,
    check_against_accounted,
    epsilon_lower_bound,
    guess_from_scores,
    one_run_p_value,
)
from fl_app.server.layout import CONFIG_FILE
from fl_app.training import train_local


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logit(q: float) -> float:
    return math.log(q / (1 - q))


def _q(eps: float) -> float:
    return 1 / (1 + math.exp(-eps))


def _binom_pmf(r: int, j: int, q: float) -> float:
    return math.comb(r, j) * q**j * (1 - q) ** (r - j)


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value, written out from its formula with exact binomial terms."""
    q = _q(eps)
    tail = sum(_binom_pmf(r, j, q) for j in range(v, r + 1))
    alpha = max(
        (sum(_binom_pmf(r, j, q) for j in range(v - i, v)) / i for i in range(1, v + 1)),
        default=0.0,
    )
    return min(1.0, tail + 2 * m * delta * alpha)


# ------------------------------------------------------------------ the bound


@pytest.mark.parametrize("r", [10, 50, 200])
def test_all_guesses_right_without_delta_is_the_closed_form(r: int) -> None:
    """δ=0, v=r: P[Binom(r, q) >= r] = q^r = β  =>  ε = logit(β^(1/r))."""
    expected = _logit(0.05 ** (1 / r))
    assert epsilon_lower_bound(2 * r, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-7)


def test_partly_right_guesses_match_an_exact_binomial_tail() -> None:
    """r=100, v=80, δ=0, 95 %: the ε where sum_{j>=80} C(100,j) q^j (1-q)^(100-j) = 0.05."""
    expected = brentq(lambda e: _paper_p_value(200, 100, 80, e, 0.0) - 0.05, 0.0, 10.0)
    assert epsilon_lower_bound(200, 100, 80, 0.0, 0.95) == pytest.approx(expected, abs=1e-7)
    # Sanity of the hand form itself: 80 of 100 right is a rate above q(ε) = 0.8's ε.
    assert 0 < expected < _logit(0.8)


def test_delta_term_follows_the_paper() -> None:
    """m=40, r=v=20, δ=1e-3: the 2mδ·max_i P[v-i <= Binom < v]/i term shrinks the bound."""
    expected = brentq(lambda e: _paper_p_value(40, 20, 20, e, 1e-3) - 0.05, 0.0, 10.0)
    got = epsilon_lower_bound(40, 20, 20, 1e-3, 0.95)
    assert got == pytest.approx(expected, abs=1e-7)
    assert got < epsilon_lower_bound(40, 20, 20, 0.0, 0.95)
    for eps in (0.0, 0.5, 2.0, 5.0):
        assert one_run_p_value(40, 20, 20, eps, 1e-3) == pytest.approx(
            _paper_p_value(40, 20, 20, eps, 1e-3), rel=1e-9
        )


def test_bound_is_monotone_in_evidence_delta_and_confidence() -> None:
    by_correct = [epsilon_lower_bound(500, 200, v, 1e-5, 0.95) for v in range(100, 201, 10)]
    assert by_correct == sorted(by_correct) and by_correct[-1] > by_correct[0]
    by_guesses = [epsilon_lower_bound(1000, r, r, 1e-5, 0.95) for r in (10, 50, 100, 400)]
    assert by_guesses == sorted(by_guesses) and len(set(by_guesses)) == 4
    by_delta = [epsilon_lower_bound(500, 200, 180, d, 0.95) for d in (0.0, 1e-5, 1e-4, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1]
    by_conf = [epsilon_lower_bound(500, 200, 180, 1e-5, c) for c in (0.5, 0.9, 0.95, 0.99)]
    assert by_conf == sorted(by_conf, reverse=True) and by_conf[0] > by_conf[-1]


def test_guessing_at_chance_gives_a_bound_near_zero() -> None:
    """Scores independent of inclusion (rng 0): 1000 canaries, 250 + 250 guesses."""
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    g = guess_from_scores(rng.normal(size=1000), included, 250, 250)
    assert abs(g.correct - 250) < 40  # Binomial(500, 1/2): sd 11
    assert epsilon_lower_bound(1000, g.guesses, g.correct, 1e-5, 0.95) < 0.1


def test_no_evidence_at_all_gives_zero() -> None:
    assert epsilon_lower_bound(100, 0, 0, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound(100, 50, 25, 1e-5, 0.95) == 0.0


def test_p_value_edges_follow_the_paper() -> None:
    """r = m is allowed; δ = 1 is allowed; the p-value is a probability (capped at 1);
    v = 1 and v = 2 take the δ term's maximum over i like larger v."""
    assert one_run_p_value(5, 5, 5, 0.0, 0.0) == pytest.approx(0.5**5, rel=1e-12)
    assert one_run_p_value(40, 20, 20, 0.0, 1.0) == 1.0
    for v in (1, 2, 7):
        for eps in (0.0, 1.0):
            assert one_run_p_value(40, 20, v, eps, 1e-2) == pytest.approx(
                _paper_p_value(40, 20, v, eps, 1e-2), rel=1e-9
            )


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta", "field"),
    [(10, 11, 0, 1.0, 0.0, "guesses"), (10, 5, 6, 1.0, 0.0, "correct"),
     (10, 5, 5, -1.0, 0.0, "epsilon"), (10, 5, 5, 1.0, 1.5, "delta")],
)  # fmt: skip
def test_p_value_refuses_impossible_counts(
    m: int, r: int, v: int, eps: float, delta: float, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        one_run_p_value(m, r, v, eps, delta)
    for confidence in (0.0, 1.0):
        with pytest.raises(ValueError, match="confidence must lie in"):
            epsilon_lower_bound(10, 5, 5, 0.0, confidence)


def test_impossible_counts_say_how_to_count() -> None:
    with pytest.raises(ValueError, match="count guesses among the canaries only"):
        one_run_p_value(10, 11, 0, 1.0, 0.0)


def test_guesses_take_the_top_and_bottom_scores() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3])
    included = np.array([True, False, True, False, False, True])
    # top 2: canaries 0 (in, right) and 3 (out, wrong); bottom 2: 1 (out, right), 4 (right)
    assert guess_from_scores(scores, included, 2, 2) == Guesses(6, 4, 3)
    assert guess_from_scores(scores, included, 0, 1) == Guesses(6, 1, 1)
    assert guess_from_scores(scores, included, 6, 0) == Guesses(6, 6, 3)
    with pytest.raises(ValueError, match="k_plus"):
        guess_from_scores(scores, included, 4, 3)
    for k_plus, k_minus in ((-1, 2), (2, -1)):
        with pytest.raises(ValueError, match="non-negative"):
            guess_from_scores(scores, included, k_plus, k_minus)
    with pytest.raises(ValueError, match="1-D arrays of equal length"):
        guess_from_scores(scores, included[:5], 1, 1)
    with pytest.raises(ValueError, match="1-D arrays of equal length"):
        guess_from_scores(scores.reshape(2, 3), included.reshape(2, 3), 1, 1)


def test_guesses_read_unsigned_scores_and_integer_inclusion_bits() -> None:
    """uint8 scores are not negated modulo 256; 0/1 inclusion ints are not bit-inverted."""
    scores = np.array([200, 0, 100, 150, 20, 30], dtype=np.uint8)
    included = np.array([1, 0, 1, 0, 0, 1])
    assert guess_from_scores(scores, included, 2, 2) == Guesses(6, 4, 3)


def test_ties_are_broken_by_canary_order_not_inclusion() -> None:
    """100 equal scores: top 25 are canaries 0-24, bottom 25 are 75-99 (stable order)."""
    included = np.arange(100) < 50
    assert guess_from_scores(np.zeros(100), included, 25, 25) == Guesses(100, 50, 50)
    assert guess_from_scores(np.zeros(100), ~included, 25, 25) == Guesses(100, 50, 0)
    # Three score levels (rng 0), even canaries included: Python's sort on
    # (-score, index) gives the expected count.
    scores = np.random.default_rng(0).integers(0, 3, 100).astype(float)
    even = np.arange(100) % 2 == 0
    order = sorted(range(100), key=lambda i: (-scores[i], i))
    expected = sum(bool(even[i]) for i in order[:25]) + sum(not even[i] for i in order[75:])
    assert guess_from_scores(scores, even, 25, 25) == Guesses(100, 50, expected)


# ------------------------------------------------------------------ the flag


def _randomized_response(eps: float, k: int, seed: int) -> Guesses:
    """Each canary's observable bit is its inclusion bit flipped w.p. 1/(1+e^eps):
    exactly eps-DP per canary. Guess on the 1000 clearest (ties broken by extra
    independent noise)."""
    rng = np.random.default_rng(seed)
    included = rng.random(k) < 0.5
    flip = rng.random(k) < 1 - _q(eps)
    scores = (included ^ flip).astype(float) + rng.uniform(0, 0.5, size=k)
    return guess_from_scores(scores, included, k // 4, k // 4)


def test_randomized_response_bound_is_sound_and_flags_a_10x_under_report() -> None:
    """True ε = 3 (randomized response, 2000 canaries, rng 1)."""
    g = _randomized_response(3.0, 2000, seed=1)
    honest = OneRunBound.of(g, 1e-5, 0.95, accounted=3.0)
    assert 2.0 < honest.epsilon_lower_bound <= 3.0
    check_against_accounted(honest)  # a correct accountant passes
    under = OneRunBound.of(g, 1e-5, 0.95, accounted=0.3)  # the test double: 10x too low
    with pytest.raises(AccountingBugSuspected, match="accounting bug"):
        check_against_accounted(under)
    check_against_accounted(OneRunBound.of(g, 1e-5, 0.95, accounted=None))  # no DP: no claim


def test_bound_equal_to_the_accounted_epsilon_passes_and_the_message_says_what_to_do() -> None:
    g = Guesses(100, 50, 50)
    check_against_accounted(OneRunBound(g, 1e-5, 0.95, 2.0, 2.0))
    with pytest.raises(AccountingBugSuspected, match="do not release this run") as err:
        check_against_accounted(OneRunBound(g, 1e-5, 0.95, 2.5, 2.0))
    assert "2.500" in str(err.value) and "2.000" in str(err.value) and "95%" in str(err.value)


def test_one_run_section_carries_the_counts_and_the_bound() -> None:
    """Keys as docs/privacy-audit.md documents them; δ=0, 50 of 50 right: logit(0.05^(1/50))."""
    doc = OneRunBound.of(Guesses(100, 50, 50), 0.0, 0.95, accounted=4.0).to_json()
    expected = _logit(0.05 ** (1 / 50))
    assert doc.pop("epsilon_lower_bound") == pytest.approx(expected, abs=1e-7)
    assert doc == {"canaries": 100, "guesses": 50, "correct": 50, "delta": 0.0,
                   "confidence": 0.95, "accounted_epsilon": 4.0}  # fmt: skip


def test_accounted_guarantee_reads_record_level_first() -> None:
    rec = {"privacy": {"record_level_epsilon_max": 2.5, "record_level": {"delta": 1e-6},
                       "epsilon": 9.0, "delta": 1e-4}}  # fmt: skip
    assert accounted_guarantee(rec) == (2.5, 1e-6)
    assert accounted_guarantee({"privacy": {"epsilon": 4.0, "delta": 1e-4}}) == (4.0, 1e-4)
    assert accounted_guarantee({"privacy": {"mode": "none", "epsilon": None}}) == (None, 1e-5)


# ------------------------------------------------------------------ canaries


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def test_canaries_are_mislabeled_reproducible_and_half_included(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    a = draw_canaries(x, y, 400, 10, np.random.default_rng(3))
    b = draw_canaries(x, y, 400, 10, np.random.default_rng(3))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert np.array_equal(a.included, b.included)
    # Each canary is a record of x with a label that is not its own.
    rows = {r.tobytes(): int(t) for r, t in zip(x, y, strict=True)}
    assert all(rows[r.tobytes()] != int(t) for r, t in zip(a.x, a.y, strict=True))
    assert len({r.tobytes() for r in a.x}) == 400
    assert set(a.y.tolist()) == set(range(10))
    assert 170 <= int(a.included.sum()) <= 230  # Binomial(400, 1/2): sd 10
    with pytest.raises(ValueError, match="--canaries"):
        draw_canaries(x, y, len(y) + 1, 10, np.random.default_rng(3))


def test_rerun_changes_only_the_stated_keys(tmp_path: Path) -> None:
    _run_config(tmp_path, ["dataset.num_partitions=2"])
    cfg = yaml_load(tmp_path / CONFIG_FILE)
    rerun = _rerun_config(cfg, ["a.npz", "b.npz"])
    changed = {
        (top, key)
        for top in rerun
        for key in (rerun[top] if isinstance(rerun[top], dict) else [None])
        if (rerun[top] if key is None else rerun[top][key])
        != (cfg[top] if key is None else cfg[top][key])
    }
    assert changed == {
        ("dataset", "kind"), ("dataset", "site_files"), ("dataset", "val_fraction"),
        ("server_eval", None), ("strategy", "fraction_evaluate"),
    }  # fmt: skip
    assert rerun["runtime"]["backend"] == "inprocess"
    assert rerun["dataset"]["site_files"] == ["a.npz", "b.npz"]


def yaml_load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _run_config(run_dir: Path, overrides: list[str]) -> AppConfig:
    """Compose ``overrides`` and write the run's config.yaml as the ServerApp does."""
    cfg = compose_config("config", ["runtime=inprocess", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg)))
    return cfg


def test_site_files_hold_each_partitions_train_split_and_site0_the_included_canaries(
    tmp_path: Path,
) -> None:
    """What each re-run client trains on, read back through the data loader."""
    from fl_app.data import load_client_data, load_server_test_set

    cfg = _run_config(tmp_path, ["dataset.num_partitions=3"])
    raw = yaml_load(tmp_path / CONFIG_FILE)
    test = load_server_test_set(cfg.dataset, cfg.seed)
    assert test is not None
    canaries = draw_canaries(test.x, test.y, 40, 10, np.random.default_rng(0))
    rerun = to_app_config(_rerun_config(raw, _site_files(raw, canaries, tmp_path / "sites")))
    for pid in range(3):
        orig = load_client_data(cfg.dataset, pid, 3, cfg.seed).train
        got = load_client_data(rerun.dataset, pid, 3, rerun.seed)
        assert len(got.val.y) == 0
        want_x, want_y = orig.x, orig.y
        if pid == 0:
            want_x = np.concatenate([want_x, canaries.x[canaries.included]])
            want_y = np.concatenate([want_y, canaries.y[canaries.included]])
        assert _records(got.train.x, got.train.y) == _records(want_x, want_y)


def _records(x: np.ndarray, y: np.ndarray) -> list[tuple[bytes, int]]:
    """The multiset of (features, label) records, order ignored."""
    return sorted((r.astype(np.float32).tobytes(), int(t)) for r, t in zip(x, y, strict=True))


# ------------------------------------------------------------------ must-holds, central

_K = 100  # canaries; 25 + 25 guesses


def _trained_bound(
    digits: tuple[np.ndarray, np.ndarray], dp: DpSgdSettings | None, train: ClientTrainConfig
) -> float:
    """400 digits records + the included canaries (100 others, mislabeled, rng 0)."""
    x, y = digits
    canaries = draw_canaries(x[400:], y[400:], _K, 10, np.random.default_rng(0))
    tx = np.concatenate([x[:400], canaries.x[canaries.included]])
    ty = np.concatenate([y[:400], canaries.y[canaries.included]])
    model = build_model(ModelConfig(hidden=[256]), [1, 8, 8], 10, seed=0)
    gen = torch.Generator().manual_seed(0)
    if dp is None:
        train_local(model, tx, ty, train, generator=gen)
    else:
        train_dpsgd(model, tx, ty, train, dp, generator=gen)
    g = guess_from_scores(canary_scores(model, canaries), canaries.included, _K // 4, _K // 4)
    return epsilon_lower_bound(g.canaries, g.guesses, g.correct, 1e-5, 0.95)


def test_overfit_non_private_training_gives_a_bound_clearly_above_zero(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    plain = ClientTrainConfig(local_epochs=60, batch_size=16, lr=0.1, momentum=0.9)
    # The most 50 guesses can show at 95 %: logit(0.05^(1/50)) = 2.78.
    assert _trained_bound(digits, None, plain) > 1.5


def test_dpsgd_at_epsilon_one_stays_below_one_and_below_the_accounted_epsilon(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """z for ε=1 at δ=1e-5 from Opacus' own PRV accountant, not from fl_app.

    Control: the same training with z=0 (clipping only) memorises the canaries (bound
    2.78, every guess right), so the low bound comes from the noise, not the optimizer.
    Seeded: the bound at ε=1 was 0.22.
    """
    from opacus.accountants import PRVAccountant
    from opacus.accountants.utils import get_noise_multiplier

    train = ClientTrainConfig(local_epochs=30, batch_size=16, lr=0.5, momentum=0.9)
    n = 400 + 60  # upper end of the included canaries' count, for the plan only
    steps, q = planned_steps(n, train.batch_size, train.local_epochs)
    z = get_noise_multiplier(
        target_epsilon=1.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="prv"
    )
    acc = PRVAccountant()
    acc.history = [(z, q, steps)]
    accounted = acc.get_epsilon(delta=1e-5)
    assert accounted <= 1.0 + 1e-6
    clip_only = DpSgdSettings(noise_multiplier=0.0, max_grad_norm=1.0, secure_mode=False)
    assert _trained_bound(digits, clip_only, train) > 1.5
    dp = DpSgdSettings(noise_multiplier=z, max_grad_norm=1.0, secure_mode=False)
    bound = _trained_bound(digits, dp, train)
    assert bound < 1.0 and bound < accounted


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_audit_privacy_canaries_end_to_end_and_an_under_reporting_double(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-private run overfit (2 sites, 3 rounds of 10 local epochs, run seed 42); the
    CLI's --quick --canaries 100 (attack seed 42) bounds ε clearly above 0 and exits 0;
    the same canaries with a re-run whose summary claims ε=0.1 exit 3."""
    from fl_app.cli.audit_privacy import audit_privacy_main
    from fl_app.runtime.simulation import run_simulation_experiment

    overrides = ["num_rounds=3", "dataset.num_partitions=2", "train.local_epochs=10"]
    cfg = _run_config(tmp_path / "cfg", overrides)
    run = tmp_path / "run"
    run_simulation_experiment(cfg, str(run))
    out = tmp_path / "audit"
    assert audit_privacy_main([str(run), "--quick", "--canaries", str(_K), "--out", str(out)]) == 0
    one = json.loads((out / "audit.json").read_text())["one_run"]
    assert (one["canaries"], one["guesses"], one["confidence"]) == (_K, _K // 2, 0.95)
    assert one["accounted_epsilon"] is None and one["rerun_status"] == "completed"
    assert one["epsilon_lower_bound"] > 0.5
    # The secret inserted into the same re-run (one of 1000 candidates): its exposure.
    exposure = one["exposure"]
    assert exposure["candidates"] == 1000 and 1 <= exposure["rank"] <= 1000
    assert exposure["exposure_bits"] == pytest.approx(math.log2(1000 / exposure["rank"]))
    assert exposure["dp_limit_95_bits"] is None  # no DP: no limit
    printed = capsys.readouterr().out
    assert "one-run audit (100 canaries" in printed
    assert "exposure of the inserted secret" in printed

    def under_reporting(c: AppConfig, d: str) -> dict[str, Any]:
        summary = run_simulation_experiment(c, d)
        summary["privacy"] = {"record_level_epsilon_max": 0.1, "record_level": {"delta": 1e-5}}
        return summary

    # Into the CLI's --out again: the earlier canary re-run is replaced, not resumed.
    bound, section = one_run_audit(run, out, _K, 42, under_reporting)
    assert section["correct"] == one["correct"]  # same seed, same canaries, same re-run
    with pytest.raises(AccountingBugSuspected, match="accounting bug"):
        check_against_accounted(bound)
