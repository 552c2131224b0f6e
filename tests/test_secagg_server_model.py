"""``secagg.server_model``: semi-honest thresholds for ``honest_but_curious``, split-view-safe
ones for ``malicious``, and the client deciding which it accepts.

Expected thresholds are worked out here from the definitions with scipy's
hypergeometric distribution (not with the code under test): correctness
``n * P[X > k - t] <= 2^-20`` (``X`` dropped neighbours), security ``n * P[Y >= a] <=
2^-41`` (``Y`` corrupt neighbours; ``a = t`` semi-honest, ``a = 2t - k - 1`` malicious),
``2t > k + 1``; the smallest even ``k`` and the largest such ``t``. At ``n = 100`` with the
default 0.2/0.1 the semi-honest pair is ``(38, 20)``, the pair base commit 402619b derived
before the split-view bound, and the malicious pair ``(52, 32)`` (the sparse derivation,
valid for an honestly drawn graph; the app runs the malicious model on the complete
graph only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
from scipy.stats import hypergeom

from fl_app.client.policy import PolicyError, PolicyViolation, SitePolicy
from fl_app.client.policy_file import parse_policy
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.derive import custom_params, derive_params, params_from_config
from fl_app.secagg.params import GraphMode, SecAggConfigError, ServerModel
from fl_app.secagg.settings import SecAggSettings
from fl_app.secagg.wire import SECAGG_PARAMS
from fl_app.testing.adversary import AdversarialServer, weaker_params
from fl_app.testing.secagg_client import fixed_update_client

MODELS = ["honest_but_curious", "malicious"]


def _by_hand(n: int, drop: float, corrupt: float, model: str) -> tuple[int, int]:
    """Smallest even k, then largest t, meeting the definitions (module docstring)."""
    d, c = math.floor(drop * n), max(math.floor(corrupt * n), 1)
    for k in range(2, n - 1, 2):
        # Connectivity (two runs of k/2 bad nodes) holds trivially once k > D + C.
        if k <= d + c:
            continue
        t = next(
            (t for t in range(k + 1, 0, -1) if n * hypergeom.sf(k - t, n - 1, d, k) <= 2**-20),
            0,
        )
        if 2 * t <= k + 1:
            continue
        at_least = t if model == "honest_but_curious" else 2 * t - k - 1
        if n * hypergeom.sf(at_least - 1, n - d - 1, c, k) <= 2**-41:
            return k, t
    raise AssertionError("no sparse degree")


@pytest.mark.parametrize("model", MODELS)
def test_thresholds_at_100_clients_match_the_definitions(model: str) -> None:
    expected = {"honest_but_curious": (38, 20), "malicious": (52, 32)}[model]
    assert _by_hand(100, 0.2, 0.1, model) == expected
    p = derive_params(100, dropout_tolerance=0.2, corrupt_fraction=0.1, server_model=model)
    assert (p.degree, p.threshold, p.server_model.value) == (*expected, model)


def test_complete_graph_thresholds_per_model() -> None:
    # n = 10, D = 4, C = 2: t = n - D = 6. Semi-honest needs t > C and 2t > n (6 > 2,
    # 12 > 10): fine. Malicious needs 2t > n + C = 12: no threshold exists.
    p = derive_params(10, mode="secagg", dropout_tolerance=0.4, corrupt_fraction=0.2,
                      server_model="honest_but_curious")  # fmt: skip
    assert (p.degree, p.threshold) == (9, 6)
    with pytest.raises(SecAggConfigError, match="2t > n \\+ C"):
        derive_params(10, mode="secagg", dropout_tolerance=0.4, corrupt_fraction=0.2,
                      server_model="malicious")  # fmt: skip
    with pytest.raises(SecAggConfigError, match="server_model must be one of"):
        derive_params(10, server_model="trusting")


def test_custom_parameters_per_model() -> None:
    # k = 4, t = 3, C = 1: 2t = 6 > k + 1 = 5 (semi-honest fine), 6 <= k + 1 + C = 6.
    ok = custom_params(10, 4, 3, max_dropouts=1, max_corrupt=1, server_model="honest_but_curious")
    assert ok.server_model is ServerModel.honest_but_curious
    with pytest.raises(SecAggConfigError, match="2t > degree\\+1\\+min"):
        custom_params(10, 4, 3, max_dropouts=1, max_corrupt=1, server_model="malicious")
    # Odd degree: 2t = k + 1 is refused in both models (the off-by-one of k//2 + 1).
    for model in MODELS:
        with pytest.raises(SecAggConfigError):
            custom_params(6, 5, 3, max_dropouts=1, server_model=model)


@pytest.mark.parametrize("model", MODELS)
def test_the_client_rederives_for_the_model_it_is_told(model: str) -> None:
    p = derive_params(100, dropout_tolerance=0.2, corrupt_fraction=0.1, server_model=model)
    assert params_from_config(json.loads(json.dumps(p.to_config()))) == p
    # The cheaper (k, t) labelled malicious, or the model left out: refused.
    other = "malicious" if model == "honest_but_curious" else "honest_but_curious"
    with pytest.raises(SecAggConfigError, match="differ from the derivation"):
        params_from_config({**p.to_config(), "server_model": other})
    cfg = p.to_config()
    del cfg["server_model"]
    with pytest.raises(SecAggConfigError, match="malformed"):
        params_from_config(cfg)


def test_site_policy_minimum_server_model() -> None:
    hbc = derive_params(100, server_model="honest_but_curious")
    mal = derive_params(100, server_model="malicious")
    SitePolicy().check_secagg_params(hbc)  # the default accepts both
    SitePolicy().check_secagg_params(mal)
    strict = parse_policy({"secagg_min_server_model": "malicious"})
    strict.check_secagg_params(mal)
    with pytest.raises(PolicyViolation) as info:
        strict.check_secagg_params(hbc)
    assert info.value.field == "secagg_min_server_model"
    assert "secagg.server_model=malicious" in info.value.message
    with pytest.raises(PolicyError, match="secagg_min_server_model"):
        parse_policy({"secagg_min_server_model": "paranoid"})
    # Deterministic bound per model: complete graph n = 10, D = 4, C = 2, t = 6.
    loose = derive_params(
        10, mode="secagg", dropout_tolerance=0.4, corrupt_fraction=0.2,
        server_model="honest_but_curious",
    )  # fmt: skip
    SitePolicy(secagg_max_dropout_tolerance=0.5).check_secagg_params(loose)


# ------------------------------------------------ through the real client handlers
N = 10
DIM = 8


def _update(node: int) -> dict[str, np.ndarray]:
    u = np.random.default_rng(node % 2**32).normal(size=DIM)
    return {"w": (0.9 * u / np.linalg.norm(u)).astype(np.float32)}


def _server(policy: SitePolicy | None, model: ServerModel) -> Iterator[AdversarialServer]:
    grid = InProcessGrid(fixed_update_client(_update, policy=policy), N, seed=N)
    # The malicious model runs on the complete graph only (clients refuse SecAgg+'s).
    mode = GraphMode.secagg if model is ServerModel.malicious else GraphMode.secaggplus
    settings = SecAggSettings(mode=mode, clip=1.0, stage_timeout_s=5.0, server_model=model)
    try:
        yield AdversarialServer(grid, settings)
    finally:
        grid.close()


ARRAYS = {"w": np.zeros(DIM, np.float32)}


def test_a_site_requiring_malicious_refuses_an_honest_but_curious_round() -> None:
    strict = SitePolicy(secagg_min_server_model="malicious")
    for server in _server(strict, ServerModel.honest_but_curious):
        out = server.run_round(1, ARRAYS)
        assert out.decoded is None
        refusals = server.refusals(1, 2)
        assert len(refusals) == N  # at stage 2: before any share left a client
        assert all("site policy `secagg_min_server_model`" in r for r in refusals.values())
        assert not server.sent(1, 3)  # nothing masked, nothing revealed
    # A malicious server relabelling its round's cheaper thresholds: refused as well.
    for server in _server(strict, ServerModel.malicious):
        lie = weaker_params(server_model="honest_but_curious", mode="secaggplus")
        out = server.run_round(1, ARRAYS, [lie])
        assert out.decoded is None
        sent = json.loads(
            server.sent(1, 2)[0].message.content.config_records["config"][SECAGG_PARAMS]
        )
        assert (sent["degree"], sent["threshold"]) == (6, 4)  # the lie was delivered
        refusals = server.refusals(1, 2)
        assert all("secagg_min_server_model" in r for r in refusals.values()), refusals
