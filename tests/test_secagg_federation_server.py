"""Issue 16, server side of the federation colluder bound (malicious server model).

The clients take C over the whole federation (roster entries; num-partitions in
simulation): ``C = max(floor(corrupt_fraction * N), 1)``, and refuse at share-keys unless
``t > C`` and ``2t > n + C``. The server now derives its thresholds with the same C, so
its params (and their ``max_corrupt``) are what the clients check, a round no client would
accept is abandoned before any key is exchanged, and the validator refuses, before the
run, a malicious config whose cohort has no such ``t``. Expected values below are worked
out by hand from those formulas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fl_app.secagg.derive import federation_min_corrupt
from fl_app.secagg.params import GraphMode, SecAggConfigError, ServerModel
from fl_app.secagg.settings import SecAggSettings


def _settings(**kw: Any) -> SecAggSettings:
    base: dict[str, Any] = {
        "mode": GraphMode.secagg,
        "clip": 1.0,
        "stage_timeout_s": 10.0,
        "server_model": ServerModel.malicious,
    }
    base.update(kw)
    return SecAggSettings(**base)


def _round(settings: SecAggSettings, nodes: int, cohort: int) -> tuple[Any, Any, Any]:
    """One real secure round (no lies) over ``cohort`` of ``nodes`` simulated clients,
    each contributing 0.25 per coordinate; the clients see num-partitions = ``nodes``."""
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.testing.adversary import AdversarialServer
    from fl_app.testing.secagg_client import fixed_update_client

    client = fixed_update_client(lambda node: {"w": np.full(4, 0.25, np.float32)})
    grid = InProcessGrid(client, nodes, seed=3)
    try:
        server = AdversarialServer(grid, settings)
        out = server.run_round(1, {"w": np.zeros(4, np.float32)}, cohort=grid.node_ids[:cohort])
        return out, server.refusals(1, 2), server.sent(1)
    finally:
        grid.close()


def test_federation_min_corrupt_by_hand() -> None:
    # floor(f * N), never below one colluder; 0.29 * 100 is 28.999999999999996 in floats:
    # "at most 29 % of 100 sites" is 29 colluders.
    assert federation_min_corrupt(0.1, 20) == 2
    assert federation_min_corrupt(0.15, 20) == 3
    assert federation_min_corrupt(0.29, 100) == 29
    assert federation_min_corrupt(0.1, 9) == 1
    assert federation_min_corrupt(0.1, 0) == 1
    with pytest.raises(SecAggConfigError, match="federation_size"):
        federation_min_corrupt(0.1, -1)
    with pytest.raises(SecAggConfigError, match="corrupt_fraction"):
        federation_min_corrupt(1.0, 20)


def test_settings_take_the_federation_only_under_the_malicious_model() -> None:
    from fl_app.config.compose import compose_config

    assert _settings(corrupt_fraction=0.15, federation_size=20).min_corrupt() == 3
    assert _settings(federation_size=0).min_corrupt() == 1  # unknown: the cohort's
    # honest_but_curious: the server samples fairly, the cohort's fraction stands.
    hbc = _settings(server_model=ServerModel.honest_but_curious, federation_size=100)
    assert hbc.min_corrupt() == 1
    with pytest.raises(ValueError, match="federation size must be >= 0"):
        _settings(federation_size=-1)
    cfg = compose_config(
        "config", ["secagg=secagg", "secagg.clip=1", "secagg.server_model=malicious"]
    )
    from_cfg = SecAggSettings.from_config(cfg.secagg, 20)
    assert from_cfg is not None and from_cfg.federation_size == 20


def test_a_sampled_malicious_round_completes_with_the_federations_colluder_bound() -> None:
    # 20 simulated sites, 10 per round, corrupt_fraction 0.15, dropout 0.2:
    # C = floor(0.15 * 20) = 3 (the cohort's would be floor(1.5) = 1), D = floor(2.0) = 2,
    # t = n - D = 8; t > C and 2t = 16 > n + C = 13: every client shares, and the sum of
    # ten inputs of 0.25 is 2.5.
    out, refusals, _ = _round(_settings(corrupt_fraction=0.15, federation_size=20), 20, 10)
    assert not refusals, refusals
    assert out.decoded is not None, out.note
    p = out.params
    assert (p.num_clients, p.threshold, p.max_dropouts, p.max_corrupt) == (10, 8, 2, 3)
    assert out.num_contributors == 10
    np.testing.assert_allclose(out.decoded.update["w"], np.full(4, 2.5), atol=1e-3)


def test_a_cohort_too_small_for_the_federation_is_abandoned_before_any_exchange() -> None:
    # 12 of 20, dropout 0.45: D = floor(5.4) = 5, t = 7. The cohort's C = 1 gives
    # 2t = 14 > 13, but the federation's C = floor(0.1 * 20) = 2 needs t >= 8 > n - D:
    # the clients would refuse at share-keys, so the server sends nothing at all.
    out, refusals, sent = _round(
        _settings(corrupt_fraction=0.1, dropout_tolerance=0.45, federation_size=20), 20, 12
    )
    assert out.decoded is None and not refusals and not sent
    assert out.note.startswith("no secure-aggregation parameters for 12 clients")
    assert "C=2" in out.note


def _compose(*overrides: str) -> Any:
    from fl_app.config.compose import compose_config

    return compose_config(
        "config",
        ["secagg=secagg", "secagg.clip=1", "dataset.num_partitions=20", *overrides],
    )


def test_an_infeasible_sampled_malicious_config_is_refused_naming_the_fields() -> None:
    from fl_app.config.errors import ConfigError

    bad = (
        "secagg.server_model=malicious",
        "secagg.dropout_tolerance=0.45",
        "strategy.fraction_train=0.6",
    )
    with pytest.raises(ConfigError) as info:
        _compose(*bad)
    assert info.value.field == "secagg.server_model"
    text = str(info.value)
    # C = max(floor(0.1 * 20), 1) = 2, cohort 12 = 0.6 * 20, D = floor(0.45 * 12) = 5.
    assert "C = max(floor(secagg.corrupt_fraction=0.1 * 20 sites), 1) = 2" in text
    assert "a cohort of 12 (strategy.fraction_train=0.6) with D=5" in text
    assert "secagg.server_model=honest_but_curious" in text
    assert "raise strategy.fraction_train" in text
    # Controls: the same cohort under honest_but_curious, and a smaller dropout
    # tolerance (D = floor(0.3 * 12) = 3, t = 9, 18 > 14) are accepted.
    _compose(*bad[1:])
    _compose(bad[0], "secagg.dropout_tolerance=0.3", bad[2])
