"""DP-SGD fails early (issue 17): each institution's record-level ε is projected before
round 1, and a budget that round 1 alone exceeds is a config error naming the field."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import pytest

from fl_app.cli import main as cli_main
from fl_app.cli.simulate import check_record_level_budget, record_level_projection
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.data import load_client_data


def _pld_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD ε for ``steps`` Poisson-sampled Gaussian steps (independent
    of Opacus' PRV accountant the clients use)."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


def test_projection_matches_the_clients_data_and_an_independent_accountant() -> None:
    cfg = compose_config("config", ["privacy=dpsgd", "privacy.dpsgd.max_epsilon=3"])
    proj = record_level_projection(cfg)
    assert proj is not None
    # The sizes are the training sets the clients will actually load.
    real = [
        len(load_client_data(cfg.dataset, pid, cfg.dataset.num_partitions, cfg.seed).train)
        for pid in range(cfg.dataset.num_partitions)
    ]
    assert list(proj.train_sizes) == real
    # Opacus' Poisson loader for N records, batch B: k = ceil(N/B) batches, q = 1/k,
    # k steps an epoch (the defaults: B=16, 3 local epochs, z=1, delta=1e-5).
    n = max(real)
    k = math.ceil(n / 16)
    expected = _pld_epsilon(1 / k, 1.0, 3 * k, 1e-5)
    assert 4.3 < expected < 4.5  # the "round 1 alone needs 4.42"
    assert proj.first_round_epsilon == pytest.approx(expected, rel=0.02)
    five = _pld_epsilon(1 / k, 1.0, 5 * 3 * k, 1e-5)
    assert proj.planned_epsilon == pytest.approx(five, rel=0.02)

    with pytest.raises(ConfigError) as err:
        check_record_level_budget(cfg, proj)
    assert err.value.field == "privacy.dpsgd.max_epsilon"
    assert "round 1 alone" in str(err.value) and "noise_multiplier" in str(err.value)
    # A budget round 1 fits (it stops the run later, client by client) is not refused.
    fits = compose_config(
        "config", ["privacy=dpsgd", f"privacy.dpsgd.max_epsilon={expected * 1.03}"]
    )
    check_record_level_budget(fits, proj)
    # Calibrated z (target_epsilon) is each client's own: nothing to refuse up front.
    calibrated = compose_config(
        "config",
        ["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=null", "privacy.dpsgd.target_epsilon=3"],
    )
    assert record_level_projection(calibrated) is None


def test_impossible_first_round_budget_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        cli_main(
            [
                "simulate",
                "runtime=inprocess",
                "privacy=dpsgd",
                "privacy.dpsgd.max_epsilon=3",
                f"hydra.run.dir={run}",
            ]
        )
    assert done.value.code == 2
    out = capsys.readouterr()
    assert "config error in `privacy.dpsgd.max_epsilon`" in out.err
    assert "round 1 alone" in out.err
    assert "largest epsilon 4.4" in out.out  # the projection was printed
    assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()


def test_a_sweep_job_with_an_impossible_budget_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli_main(
            [
                "simulate",
                "--dry-run",
                "-m",
                "privacy=dpsgd",
                "privacy.dpsgd.max_epsilon=3,6",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ]
        )
    assert done.value.code != 0  # the multirun fails because job 0 was refused...
    out = capsys.readouterr()
    # ... after job 1 (max_epsilon=6, within budget for round 1) was still planned.
    assert out.out.count("record-level projection") == 2
    assert "round 1 alone exceeds the budget: refused" in out.out
    assert "within the budget" in out.out or "clients stop then" in out.out
    assert "job 0 refused" in out.err and "privacy.dpsgd.max_epsilon" in out.err
    # The sweep's dry-run flag ended with it: a later in-process call trains again.
    from fl_app.cli import simulate

    assert simulate._DRY_RUN is False
