"""Distributed DP: discrete Gaussian shares under secure aggregation.

What is checked:

* the building blocks: the rotation is orthonormal and inverts exactly; bit-packing
  round-trips and refuses malformed bytes; the discrete Gaussian sampler has the
  discrete Gaussian's variance and pmf; conditional rounding is unbiased and bounded;
* the ring: a plan at its minimum bit width is feasible and one bit less is refused;
  at that edge, worst-case (aligned) updates from a full cohort never wrap;
* the guarantee: through the real protocol (all four stages, real client stage
  handlers), the noise in the unmasked sum has the calibrated variance for 3 and for
  100 clients with dropouts down to the minimum survivors (statistical tests with the
  false-failure rate stated at each);
* the accounting: the DDG bound equals dp-accounting's RDP for the Gaussian where they
  must agree, upper-bounds dp-accounting's exact subsampled-Gaussian RDP, and the
  ledger persists and refuses what it cannot account;
* the rules: the server never unmasks fewer shares than calibrated, and clients refuse
  to help it; end to end through the real ClientApp the run reports ε and bandwidth.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import compute_epsilon
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from scipy import stats

from fl_app.client.app import app as client_app
from fl_app.config.compose import compose_config
from fl_app.privacy.ddg_encoding import (
    DdpConfigError,
    DdpRound,
    Rotation,
    conditional_round,
    fwht,
    sample_discrete_gaussian,
)
from fl_app.privacy.distributed import (
    RDP_ORDERS,
    DdpPlan,
    ddg_epsilon,
    ddg_round_rdp,
    sensitivity,
    subsampled_rdp,
)
from fl_app.privacy.history import AccountantName, AccountingError
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.noise import SecureNoise
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.client import STATE_KEY, handle_key_stage
from fl_app.secagg.params import GraphMode
from fl_app.secagg.settings import SecAggSettings
from fl_app.secagg.wire import pack_ring, packed_bytes, unpack_ring
from fl_app.server.app import run_experiment
from fl_app.testing.secagg_client import (
    fixed_update_client,
    grid_exchange,
    train_instructions,
)
from strategies.secagg import SecureAggregation


# ------------------------------------------------------------------ building blocks
def test_rotation_is_orthonormal_and_inverts() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000)
    rot = Rotation(b"round-1", 1000)
    y = rot.forward(x)
    assert y.shape == (1024,)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(rot.inverse(y), x, rtol=0, atol=1e-12)
    # The transform is its own inverse, equals the dense orthonormal Hadamard matrix
    # (below and above the 64-block), and the seed (public) fixes the signs.
    from scipy.linalg import hadamard

    for n in (1, 2, 32, 64, 256):
        z = rng.normal(size=n)
        np.testing.assert_allclose(fwht(z.copy()), hadamard(n) @ z / math.sqrt(n), atol=1e-12)
        np.testing.assert_allclose(fwht(fwht(z.copy())), z, atol=1e-12)
    assert np.array_equal(Rotation(b"round-1", 1000).signs, rot.signs)
    assert not np.array_equal(Rotation(b"round-2", 1000).signs, rot.signs)
    # Flattening: a spike spreads over every coordinate (|y_j| = 1/sqrt(d')).
    spike = np.zeros(1000)
    spike[7] = 1.0
    assert np.allclose(np.abs(rot.forward(spike)), 1 / math.sqrt(1024))


@pytest.mark.parametrize("bits", [8, 10, 12, 16, 20, 24, 32, 40, 64])
def test_bit_packing_round_trips_and_is_strict(bits: int) -> None:
    from fl_app.secagg.crypto import storage_dtype

    rng = np.random.default_rng(bits)
    dtype = storage_dtype(bits)
    values = rng.integers(0, 2 ** min(bits, 63), size=777, dtype=np.uint64).astype(dtype)
    packed = pack_ring(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_bytes(777, bits)
    assert np.array_equal(unpack_ring(packed, 777, bits), values)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_ring(packed[:-1], 777, bits)
    if (777 * bits) % 8:
        bad = packed.copy()
        bad[-1] |= 1  # a padding bit
        with pytest.raises(ValueError, match="padding"):
            unpack_ring(bad, 777, bits)


def _discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    grid = np.arange(-int(12 * sigma) - 1, int(12 * sigma) + 2)
    weights = np.exp(-(grid.astype(float) ** 2) / (2 * sigma**2))
    norm = weights.sum()
    return np.exp(-(support.astype(float) ** 2) / (2 * sigma**2)) / norm


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
@pytest.mark.parametrize("with_words", [False, True], ids=["uniforms", "words"])
def test_discrete_gaussian_sampler_matches_the_distribution(sigma: float, with_words: bool) -> None:
    n = 200_000
    source = SecureNoise()
    draws = sample_discrete_gaussian(sigma, n, source.uniform, source.words if with_words else None)
    assert draws.dtype == np.int64 and draws.shape == (n,)
    grid = np.arange(-int(12 * sigma) - 1, int(12 * sigma) + 2)
    pmf = _discrete_gaussian_pmf(sigma, grid)
    var = float(np.sum(pmf * grid.astype(float) ** 2))
    fourth = float(np.sum(pmf * grid.astype(float) ** 4))
    # Mean and variance within 6 standard errors: false failure < 2e-9 each.
    assert abs(draws.mean()) < 6 * math.sqrt(var / n)
    assert abs(draws.var() - var) < 6 * math.sqrt((fourth - var**2) / n)
    # Chi-square against the exact pmf on bins with >= 50 expected draws (false failure 1e-6).
    values, counts = np.unique(draws, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))
    expected = n * pmf
    keep = expected >= 50
    obs = np.array([observed.get(int(v), 0) for v in grid[keep]], dtype=float)
    exp = expected[keep]
    tail_obs, tail_exp = n - obs.sum(), n - exp.sum()
    chi2 = float(np.sum((obs - exp) ** 2 / exp)) + (tail_obs - tail_exp) ** 2 / max(tail_exp, 1.0)
    assert stats.chi2.sf(chi2, df=int(keep.sum())) > 1e-6


def test_conditional_rounding_is_unbiased_and_bounded() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(scale=3.0, size=256)
    bound = sensitivity(float(np.linalg.norm(x)), 256, math.exp(-0.5))
    source = SecureNoise()
    draws = np.stack([conditional_round(x, bound, source.uniform) for _ in range(4000)])
    assert np.all(np.linalg.norm(draws.astype(float), axis=1) <= bound)
    assert np.all(np.abs(draws - x) < 1)
    # The conditioning (norm <= bound) may bias it slightly; per-coordinate mean error
    # stays within 6 standard errors (<= 0.5/sqrt(4000)) plus 0.01 on every coordinate
    # (false failure < 256 x 2e-9 = 5e-7 without the bias allowance).
    assert np.max(np.abs(draws.mean(axis=0) - x)) < 6 * 0.5 / math.sqrt(4000) + 0.01
    with pytest.raises(DdpConfigError, match="clipped"):
        conditional_round(x * 100, bound, source.uniform, max_tries=5)


# ---------------------------------------------------------------------------- ring
def _plan(**kw: Any) -> DdpPlan:
    base: dict[str, Any] = dict(
        clip=1.0, dim=4096, bits=16, noise_multiplier=1.0, max_cohort=10, dropout_tolerance=0.2
    )
    return DdpPlan(**{**base, **kw})


def test_bits_are_refused_below_the_minimum_and_accepted_at_it() -> None:
    plan = _plan(max_cohort=50)
    edge = plan.min_bits()
    assert 8 < edge < 16
    DdpPlan(**{**dataclasses.asdict(plan), "bits": edge})
    with pytest.raises(DdpConfigError, match=rf"secagg.bits >= {edge}"):
        DdpPlan(**{**dataclasses.asdict(plan), "bits": edge - 1})
    # More bits: a finer step, so less rounding inflation.
    assert _plan(bits=20).inflation < _plan(bits=12).inflation


def test_worst_case_updates_at_the_edge_bit_width_never_wrap() -> None:
    n = 20
    plan = _plan(max_cohort=n, dim=1024)
    plan = DdpPlan(**{**dataclasses.asdict(plan), "bits": plan.min_bits()})
    rnd = plan.round(n)
    # All clients send the same update of norm C (perfect alignment: the sum has norm
    # n*C, the worst case the ring is sized for; its direction is independent of the
    # round's public rotation, as honest training is).
    rng = np.random.default_rng(3)
    update = rng.normal(size=plan.dim)
    update *= (1 - 1e-9) / np.linalg.norm(update)
    mask = np.uint64((1 << plan.bits) - 1)
    for trial in range(5):
        seed = f"edge-{trial}".encode()
        ring_sum = np.zeros(plan.padded, dtype=np.uint64)
        for _ in range(n):
            ring_sum = (ring_sum + rnd.encode(update, seed).astype(np.uint64)) & mask
        signed = ring_sum.astype(np.int64)
        signed[signed >= 1 << (plan.bits - 1)] -= 1 << plan.bits
        # In the rotated domain every coordinate of the signed sum is the signal plus
        # noise and rounding; a wrap would be off by 2**bits. None is.
        signal = n * Rotation(seed, plan.dim).forward(update) / rnd.gamma
        deviation = np.abs(signed - signal)
        sd = math.sqrt(n * rnd.share_std**2 + n / 4)
        # Discrete Gaussians are sub-Gaussian with parameter sigma (Canonne, Kamath &
        # Steinke 2020), a rounding error (range 1, mean ~0 up to conditional rounding's
        # tiny bias) with parameter 1/2 (Hoeffding): P(|deviation| >= 8 sd) <= 2 exp(-32)
        # per coordinate, false failure < 2e-10 over the 5 x 1,024 coordinates.
        assert np.max(deviation) < 8 * sd < 2 ** (plan.bits - 1)
        # The ring is not oversized: its half-width is under 12 measured noise sd (it is
        # sized at ~sqrt(2 ln(2d'/p)) = 7.5 sd plus the rounding term, ~8.9 sd here). The sd
        # of 1,024 coordinates has a relative SE of ~2.2 %, so a false failure needs a
        # 12-SE error (probability < 1e-30). (This replaces a check on the largest
        # coordinate, which is random and failed about once in ten runs.)
        assert 2 ** (plan.bits - 1) < 12 * float(np.std(signed - signal))
        decoded = rnd.decode(ring_sum.astype(rnd_dtype(plan.bits)), seed)
        np.testing.assert_allclose(
            decoded, Rotation(seed, plan.dim).inverse(signed.astype(float) * rnd.gamma)
        )


def rnd_dtype(bits: int) -> type:
    from fl_app.secagg.crypto import storage_dtype

    return storage_dtype(bits)


# --------------------------------------------------------------- the guarantee
UPDATES: dict[int, dict[str, np.ndarray]] = {}


def _ddp_client() -> ClientApp:
    return fixed_update_client(lambda node: UPDATES[node])


def _protocol_round(
    n: int, dim: int, drops: int, tolerance: float, seed: int, plan_tolerance: float | None = None
) -> tuple[Any, DdpPlan, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    plan = DdpPlan(
        clip=1.0,
        dim=dim,
        bits=20,
        noise_multiplier=0.8,
        max_cohort=n,
        dropout_tolerance=tolerance if plan_tolerance is None else plan_tolerance,
    )
    grid = InProcessGrid(_ddp_client(), n, seed=seed)
    UPDATES.clear()
    for node in grid.node_ids:
        u = rng.normal(size=dim)
        UPDATES[node] = {"w": (u / np.linalg.norm(u) * rng.uniform(0.2, 0.999)).astype(np.float32)}
    victims = grid.node_ids[:drops]
    for node in victims:
        grid.drop_at(node, message_type="train", nth=3)

    settings = SecAggSettings(
        mode=GraphMode.secaggplus, bits=20, dropout_tolerance=tolerance, stage_timeout_s=5.0
    )
    out = SecureAggregation(settings, ddp=plan).run_round(
        rnd=1,
        run_id=seed,
        instructions=train_instructions(grid.node_ids, 1),
        arrays={"w": np.zeros(dim, np.float32)},
        weighting="uniform",
        bound=1.0,
        exchange=grid_exchange(grid),
    )
    survivors = [v for v in grid.node_ids if v not in victims]
    exact = np.sum([UPDATES[v]["w"].astype(np.float64) for v in survivors], axis=0)
    if out.decoded is not None:  # survivors wiped their secrets after unmasking
        assert all(STATE_KEY not in grid.context(v).state for v in survivors)
    grid.close()
    return out, plan, exact, survivors


@pytest.mark.parametrize(
    ("n", "drops", "tolerance"),
    # 4 clients, not 3: with one dropout and the one colluder always assumed
    # (MIN_CORRUPT_CLIENTS), 3 clients would leave a sum of one honest input (refused).
    [(4, 0, 0.25), (4, 1, 0.25), (100, 0, 0.2), (100, 20, 0.2)],
    ids=["4-clients", "4-clients-1-dropout", "100-clients", "100-clients-20-dropouts"],
)
def test_unmasked_sum_carries_the_calibrated_noise(n: int, drops: int, tolerance: float) -> None:
    dim = 8192 if n == 4 else 4096
    out, plan, exact, survivors = _protocol_round(n, dim, drops, tolerance, seed=n + drops)
    assert out.decoded is not None, out.note
    assert out.num_contributors == len(survivors) == n - drops
    rnd = plan.round(n)
    if drops:
        assert len(survivors) == rnd.min_survivors  # down to the minimum
    noise = out.decoded.update["w"] - exact
    # In rounded units the noise is Σ shares + Σ rounding errors (each in (-1, 1),
    # variance <= 1/4); the rotation is orthonormal and d = d' so nothing is lost.
    per_coord = noise / rnd.gamma
    expected = len(survivors) * rnd.share_std**2
    rounding = len(survivors) / 4.0
    estimate = float(np.mean(per_coord**2))
    # The estimate of a variance from d' near-Gaussian values has relative standard
    # error sqrt(2/d'); 6 of them: false failure < 2e-9.
    se = math.sqrt(2.0 / plan.padded) * expected
    assert expected - 6 * se <= estimate <= expected + rounding + 6 * se
    assert abs(float(np.mean(per_coord))) < 6 * math.sqrt((expected + rounding) / plan.padded)
    # With exactly the minimum survivors the sum carries exactly the target sigma^2.
    if drops:
        assert expected == pytest.approx(plan.sigma**2, rel=1e-9)


def test_too_few_survivors_abandon_the_round_before_unmasking() -> None:
    # The protocol would go on with 8 of 10 (tolerance 0.2), but the shares were
    # calibrated for 9 (a server configured inconsistently, or lying about it).
    out, _, _, _ = _protocol_round(10, 1024, drops=2, tolerance=0.2, seed=5, plan_tolerance=0.1)
    assert out.decoded is None
    assert "distributed DP needs 9" in out.note
    assert [int(s.stage) for s in out.stages] == [1, 2, 3]  # stage 4 never sent


def test_client_refuses_to_unmask_fewer_shares_than_calibrated() -> None:
    from fl_app.secagg.client.state import _MIN_SURVIVORS, SecAggStageError, _load, _save
    from fl_app.secagg.protocol import Stage

    app = _ddp_client()
    grid = InProcessGrid(app, 4, seed=0)
    node = grid.node_ids[0]
    ctx = grid.context(node)
    # Pretend the node went through stages 1-3 of a round whose share assumed 4 survivors.
    from fl_app.secagg import ClientSession
    from fl_app.secagg.derive import derive_params
    from fl_app.secagg.vector import pack_ids

    params = derive_params(4, mode="secagg", dropout_tolerance=0.25)
    session = ClientSession(node, b"c" * 32, params, vector_length=8, bits=16, cohort=grid.node_ids)
    meta = {
        "_round": 1,
        "_params": json.dumps(params.to_config(), sort_keys=True),
        "_bits": 16,
        "_vector-length": 8,
        "_cohort": pack_ids(grid.node_ids),
        _MIN_SURVIVORS: 4,
    }
    _save(ctx, session, meta)
    _load(ctx, 1, Stage.share_keys)
    msg = Message(
        RecordDict(
            {
                "config": ConfigRecord(
                    {
                        "server-round": 1,
                        "fl-app.secagg-stage": 4,
                        "fl-app.secagg.survivors": pack_ids(grid.node_ids[:3]),
                        "fl-app.secagg.dropouts": pack_ids(grid.node_ids[3:]),
                    }
                )
            }
        ),
        dst_node_id=node,
        message_type="train",
    )
    with pytest.raises(SecAggStageError, match="refusing to unmask"):
        handle_key_stage(msg, ctx, 4)
    assert STATE_KEY not in ctx.state
    grid.close()


# ------------------------------------------------------------------- accounting
def test_unsampled_ddg_epsilon_equals_dp_accounting_gaussian_rdp() -> None:
    # With tau = 0 and no sampling the DDG bound is the Gaussian's alpha/(2 z^2).
    for z, rounds in [(1.0, 10), (0.7, 100), (3.0, 1000)]:
        ours = ddg_epsilon([(1.0, z, 0.0, 4096, rounds)], 1e-5)
        acc = dp_accounting.rdp.RdpAccountant(orders=[float(o) for o in RDP_ORDERS])
        acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
        assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def _zhu_wang_scalar(order: int, q: float, eps: Any) -> float:
    # Theorem 5 of Zhu & Wang (2019) written out term by term with math.comb.
    total = (1 - q) ** (order - 1) * (order * q - q + 1)
    total += math.comb(order, 2) * q**2 * (1 - q) ** (order - 2) * math.exp(eps(2))
    for j in range(3, order + 1):
        total += (
            3 * math.comb(order, j) * q**j * (1 - q) ** (order - j) * math.exp((j - 1) * eps(j))
        )
    return min(math.log(total) / (order - 1), eps(order))


def test_subsampled_bound_matches_the_theorem_and_upper_bounds_the_exact_gaussian() -> None:
    z, q = 1.2, 0.05

    def eps(a: int) -> float:
        return ddg_round_rdp(a, 1 / z, 0.0, 1024)

    exact = dp_accounting.rdp.RdpAccountant(orders=[float(o) for o in RDP_ORDERS])
    exact.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    exact_rdp = exact._rdp  # per-order values (dp-accounting has no public getter)
    for i, order in enumerate(RDP_ORDERS[:40]):
        ours = subsampled_rdp(order, q, eps)
        assert ours == pytest.approx(_zhu_wang_scalar(order, q, eps), rel=1e-9)
        assert ours >= exact_rdp[i] * (1 - 1e-9)
    # tau > 0 (too little noise per share) can only cost epsilon.
    assert ddg_epsilon([(q, z, 1e-6, 1024, 100)], 1e-5) > ddg_epsilon(
        [(q, z, 0.0, 1024, 100)], 1e-5
    )


def _ddg_event(rnd: int, z: float = 1.0) -> RoundEvent:
    return RoundEvent(
        round=rnd,
        sampling=SamplingScheme.poisson,
        population=1000,
        sample_rate=0.05,
        cohort=50.0,
        noise_multiplier=z,
        clip=1.0,
        update_noise_multiplier=z,
        mechanism="ddg",
        ddg_tau=0.0,
        ddg_dimension=8192,
    )


def test_ledger_accounts_ddg_rounds_and_refuses_what_it_cannot() -> None:
    ledger = FederationLedger(1e-5, AccountantName.rdp)
    for r in range(1, 201):
        ledger = ledger.add(_ddg_event(r))
    eps = ledger.epsilon()
    assert eps == pytest.approx(ddg_epsilon([(0.05, 1.0, 0.0, 8192, 200)], 1e-5))
    assert FederationLedger.from_json(ledger.to_json()) == ledger
    with pytest.raises(AccountingError, match=r"privacy\.accountant=rdp"):
        FederationLedger(1e-5, AccountantName.pld, ledger.events).epsilon()
    gaussian = RoundEvent(
        round=201,
        sampling="poisson",
        population=1000,
        sample_rate=0.05,
        cohort=50.0,
        noise_multiplier=1.0,
        clip=1.0,
        update_noise_multiplier=1.0,
    )
    with pytest.raises(AccountingError, match="mixes distributed-DP"):
        ledger.add(gaussian).epsilon()
    # A ledger written before distributed DP existed still parses.
    old = json.loads(FederationLedger(1e-5).add(gaussian).to_json())
    for e in old["events"]:
        del e["mechanism"], e["ddg_tau"], e["ddg_dimension"]
    assert FederationLedger.from_json(json.dumps(old)).events[0].mechanism == "gaussian"


def test_round_parameters_round_trip_and_refuse_garbage() -> None:
    rnd = _plan().round(10)
    assert DdpRound.from_json(rnd.to_json()) == rnd
    raw = json.loads(rnd.to_json())
    raw["share_std"] = -1.0
    with pytest.raises(ValueError, match="share_std"):
        DdpRound.from_json(json.dumps(raw))
    with pytest.raises(ValueError, match="keys"):
        DdpRound.from_json(json.dumps({"clip": 1.0}))


# ------------------------------------------------------------------- end to end
def test_distributed_dp_run_through_the_real_client_app(tmp_path: Path) -> None:
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "federated_eval_every=0",
            "privacy=distributed",
            "secagg=secaggplus",
            "secagg.bits=16",
            "secagg.stage_timeout_s=5",
            "num_rounds=3",
            "privacy.noise_multiplier=0.3",
        ],
    )
    grid = InProcessGrid(client_app, cfg.dataset.num_partitions, seed=cfg.seed)
    try:
        summary = run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed"
    assert all(r["model_updated"] and r["secagg_contributors"] == 10 for r in lines)
    # The noise shares are client-keyed CSPRNG draws (secure_mode cannot seed them): over
    # 15 runs accuracy was 0.69-0.83 (mean 0.76, sd 0.033) against this floor of 0.32,
    # 13 sd below: false failure < 1e-30 if Gaussian.
    assert summary["accuracy"] > summary["initial_accuracy"] + 0.2
    # The upload is 16 bits per rotated coordinate (8,192 for 4,810 parameters), plus
    # keys and shares (round 1 also advertises keys ahead and shares for round 2).
    for line in lines:
        assert 8192 * 2 <= line["secagg_bytes_up_per_client"] < 8192 * 2 + 4096
    ledger = FederationLedger.from_json((run / "privacy_ledger.json").read_text())
    assert [e.mechanism for e in ledger.events] == ["ddg"] * 3
    assert summary["privacy"]["epsilon"] == pytest.approx(ledger.epsilon())
    # Against the server: every client was in all 3 cohorts; 3 unsampled rounds of
    # [KLS] Proposition 14 (L2 branch) composed by hand and converted by dp-accounting.
    assert dict(ledger.participation) == {str(n): 3 for n in grid.node_ids}
    event = ledger.events[-1]
    tau, dim, ell = event.ddg_tau, event.ddg_dimension, 1.0 / event.noise_multiplier
    assert tau is not None and dim is not None
    orders = [*range(2, 65), 80, 96, 128, 160, 192, 256]
    rdp = [
        3 * min(a * ell**2 / 2 + tau * dim, a / 2 * (ell + math.sqrt(dim) * tau) ** 2)
        for a in orders
    ]
    by_hand = compute_epsilon(orders, rdp, cfg.privacy.delta)[0]
    assert summary["privacy"]["epsilon_against_server"] == pytest.approx(by_hand, rel=1e-6)
    against = summary["privacy"]["client_level"]["against_server"]
    assert against["rounds_max_over_clients"] == 3
    assert against["epsilon_planned_worst_case"] == pytest.approx(by_hand, rel=1e-6)
    bandwidth = summary["bandwidth"]
    assert bandwidth["bits"] == 16
    # The mean over rounds (round 1 also carries the key pairs advertised ahead).
    assert bandwidth["upload_bytes_per_client_round"] == pytest.approx(
        sum(r["secagg_bytes_up_per_client"] for r in lines) / len(lines)
    )
    assert lines[2]["secagg_bytes_up_per_client"] < lines[0]["secagg_bytes_up_per_client"]
    # No plaintext training metrics: the server learns nothing un-noised.
    assert "train_loss" not in lines[0] and "train-loss" not in json.dumps(lines[0])
    # The release states the distributed-DP threat model and its caveat.
    from fl_app.release import export_run

    card = export_run(run, "public", tmp_path / "release").card
    assert "distributed DP" in json.dumps(card)
    # The card states both parties' epsilon.
    assert "against outsiders" in json.dumps(card)
    assert f"{summary['privacy']['epsilon_against_server']}" in json.dumps(card)
    assert "colluded" in json.dumps(card)


def test_sweep_refusal_uses_the_budget_against_the_server() -> None:
    """``over_budget`` (a sweep job refused before it trains) must use the figure the
    guard uses under ``threat_model=distributed_dp``: the preset at max_epsilon=10 passes
    against outsiders (4.77) but stops early against the server. The round is the median
    stop over cohort draws, worked out here with scipy's binomial: the guard stops before
    round r + 1 once some client of N has been in k cohorts after r rounds."""
    from fl_app.cli.simulate import over_budget
    from fl_app.config.client_dp import ClientDpSettings
    from fl_app.config.plan import resolve
    from fl_app.privacy.composition import unsampled_epsilon

    cfg = compose_config("config", ["experiment=digits_1000_clients_ddp", "privacy.max_epsilon=10"])
    s = ClientDpSettings.from_config(cfg)
    event = s.round_event(1, 1000, s.clip)
    k = max(j for j in range(1, 50) if unsampled_epsilon(event, j, s.delta, s.accountant) <= 10)
    # P[some client in >= k cohorts after r rounds] = 1 - P[Bin(r, q) <= k - 1]^N.
    r = next(r for r in range(1, 200) if 1 - stats.binom.cdf(k - 1, r, 0.05) ** 1000 >= 0.5)
    reason = over_budget(resolve(cfg))
    assert reason is not None and "against the server" in reason
    assert f"allows one client {k} cohorts" in reason
    assert f"before round {r + 1} of 200" in reason
    # The preset itself (max_epsilon=30) fits its planned rounds: no refusal.
    preset = compose_config("config", ["experiment=digits_1000_clients_ddp"])
    assert over_budget(resolve(preset)) is None
