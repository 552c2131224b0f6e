"""Who holds the randomness (docs/architecture.md, Rules): guarantees that fail if a party other
than the one adding the noise can predict it.

* DP-SGD: from the server's view (seed, round, partition, everything it sent), neither
  the noise nor the Poisson batches can be reproduced: two runs on identical inputs
  differ, and a seeded replica built from that view does not match (the same replica
  *does* match a run that opted into seeded noise, so the replica is faithful).
* ``privacy.secure_mode=false`` (seeded) marks a run "not for release": summary.json
  and the card say why, a public export is refused.
* The published config hash matches no config obtained by trying seeds.
* The keystream sources have the right statistics (each check states its
  false-failure rate; none is seeded, since the sources cannot be).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from scipy import stats
from sklearn.datasets import load_digits

from fl_app.config.schema import ClientTrainConfig, ModelConfig, ModelName
from fl_app.models import build_model
from fl_app.privacy import dpsgd_opacus
from fl_app.privacy.dpsgd import train_dpsgd
from fl_app.privacy.dpsgd_opacus import KeystreamPoissonSampler
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy.noise import SecureNoise
from fl_app.protocol import UPDATE_KEY
from fl_app.weights import flatten, model_to_ndarrays
from strategies.sampling import FixedSizeSampler, PoissonSampler

# ------------------------------------------------------------------- DP-SGD, unit level


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64)


def _mlp() -> torch.nn.Module:
    return build_model(ModelConfig(name=ModelName.mlp), [1, 8, 8], 10, seed=0)


def _flat(model: torch.nn.Module) -> np.ndarray:
    return flatten(model_to_ndarrays(model)).astype(np.float64)


def _server_view_generator() -> torch.Generator:
    """What the server can rebuild: the client's generator from (seed, round, partition)."""
    from fl_app.client.instruction import training_seed as _training_seed

    return torch.Generator().manual_seed(_training_seed(42, 3, 1))


def _train_recording(
    digits: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    *,
    secure: bool,
    z: float,
    n: int,
    batch: int,
) -> tuple[np.ndarray, list[list[int]]]:
    """One DP-SGD call; returns the update and the record indices of every batch."""
    batches: list[list[int]] = []
    original = dpsgd_opacus._PrivateTrainer.batch_sampler

    def spy(self: Any) -> Any:
        for b in original.fget(self):  # type: ignore[attr-defined]
            batches.append(list(b))
            yield b

    monkeypatch.setattr(dpsgd_opacus._PrivateTrainer, "batch_sampler", property(spy))
    x, y = digits
    model = _mlp()
    w0 = _flat(model)
    cfg = ClientTrainConfig(local_epochs=1, batch_size=batch, lr=1.0, momentum=0.0)
    dp = DpSgdSettings(noise_multiplier=z, max_grad_norm=0.5, secure_mode=secure)
    train_dpsgd(model, x[:n], y[:n], cfg, dp, generator=_server_view_generator())
    monkeypatch.undo()
    return _flat(model) - w0, batches


def test_dpsgd_batches_are_not_reproducible_from_the_servers_view(digits, monkeypatch) -> None:
    """N=200, B=20 (q=1/10, 10 steps): two runs from identical server inputs, and the
    seeded replica the server can compute, draw different batches. Two independent
    Poisson draws of 200 records agree with probability < 0.82^200 per step."""
    _, a = _train_recording(digits, monkeypatch, secure=True, z=1.0, n=200, batch=20)
    _, b = _train_recording(digits, monkeypatch, secure=True, z=1.0, n=200, batch=20)
    _, replica = _train_recording(digits, monkeypatch, secure=False, z=1.0, n=200, batch=20)
    _, replica2 = _train_recording(digits, monkeypatch, secure=False, z=1.0, n=200, batch=20)
    assert len(a) == len(b) == len(replica) == 10
    assert replica == replica2  # the seeded path is what the server's view reproduces
    assert a != b and a != replica and b != replica
    # ...and the keystream batches are still Poisson(q=1/10): 2000 coin flips in all,
    # mean 200, sd 13.4; 6 sd (false failure < 2e-9).
    assert abs(sum(len(s) for s in a) - 200) < 6 * math.sqrt(2000 * 0.1 * 0.9)


def test_dpsgd_noise_is_not_reproducible_from_the_servers_view(digits, monkeypatch) -> None:
    """q = 1 (B >= N): every batch holds every record, so the z > 0 update minus the
    z = 0 update is exactly -lr·noise/B. The noise of two runs from identical server
    inputs, and of the server's seeded replica, are uncorrelated: |corr| < 6/sqrt(n)
    over n = 4,810 coordinates (false failure < 2e-9 per pair)."""
    base, _ = _train_recording(digits, monkeypatch, secure=True, z=0.0, n=50, batch=50)
    base_seeded, _ = _train_recording(digits, monkeypatch, secure=False, z=0.0, n=50, batch=50)
    np.testing.assert_array_equal(base, base_seeded)  # z = 0: nothing random
    noise = [
        _train_recording(digits, monkeypatch, secure=True, z=2.0, n=50, batch=50)[0] - base
        for _ in range(2)
    ]
    replica = _train_recording(digits, monkeypatch, secure=False, z=2.0, n=50, batch=50)[0]
    replica -= base
    again = _train_recording(digits, monkeypatch, secure=False, z=2.0, n=50, batch=50)[0] - base
    np.testing.assert_array_equal(replica, again)  # the server's replica is exact
    bound = 6 / math.sqrt(base.size)
    for u, v in [(noise[0], noise[1]), (noise[0], replica), (noise[1], replica)]:
        assert abs(np.corrcoef(u, v)[0, 1]) < bound


# ------------------------------------------------------------ DP-SGD through the ClientApp


def _dpsgd_cfg(tmp: Path, *overrides: str) -> Any:
    from fl_app.config.compose import compose_config

    return compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=dpsgd",
            "dataset.num_partitions=3",
            "train.local_epochs=1",
            f"privacy.dpsgd.state_dir={tmp}",
            "privacy.dpsgd.accountant=rdp",  # the fastest; accounting is not tested here
            *overrides,
        ],
    )


def _client_reply(cfg: Any, run_key: str, **node_config: Any) -> dict[str, np.ndarray]:
    """The update a fresh client (partition 0) returns for round 1 of ``cfg``."""
    reply = _client_message(cfg, run_key, **node_config)
    assert not reply.has_error(), reply.error
    return {k: v.numpy() for k, v in reply.content[UPDATE_KEY].items()}


def _client_message(cfg: Any, run_key: str, **node_config: Any) -> Message:
    from fl_app.client.app import app as client_app
    from fl_app.client_spec import encode_spec, spec_from_config
    from fl_app.privacy.state import STEPS_SEEN_KEY
    from fl_app.protocol import SPEC_KEY
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import initial_arrays
    from fl_app.weights import to_array_record

    grid = InProcessGrid(client_app, 3, seed=0)
    spec = spec_from_config(cfg, run_key)
    content = RecordDict(
        {
            "arrays": to_array_record(initial_arrays(cfg)),
            "config": ConfigRecord(
                {SPEC_KEY: encode_spec(spec), "server-round": 1, STEPS_SEEN_KEY: 0}
            ),
        }
    )
    msg = Message(content, dst_node_id=grid.node_ids[0], message_type="train")
    context = Context(
        run_id=1,
        node_id=grid.node_ids[0],
        node_config={"partition-id": 0, "num-partitions": 3, **node_config},
        state=RecordDict(),
        run_config={},
    )
    return client_app(msg, context)


def _server_replica(cfg: Any) -> dict[str, np.ndarray]:
    """What the server computes from its view: same code, data, seed, round, partition,
    global weights and noise multiplier, seeded DP-SGD."""
    from fl_app.client.instruction import training_seed as _training_seed
    from fl_app.data import load_client_data
    from fl_app.server.app import initial_arrays
    from fl_app.weights import load_ndarrays

    data = load_client_data(cfg.dataset, 0, 3, cfg.seed, {})
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    load_ndarrays(model, initial_arrays(cfg))
    d = cfg.privacy.dpsgd
    assert d.noise_multiplier is not None
    dp = DpSgdSettings(
        noise_multiplier=d.noise_multiplier,
        max_grad_norm=d.max_grad_norm,
        grad_sample_mode=d.grad_sample_mode.value,
        secure_mode=False,
    )
    gen = torch.Generator().manual_seed(_training_seed(cfg.seed, 1, 0))
    train_dpsgd(model, data.train.x, data.train.y, cfg.train, dp, generator=gen)
    global_ = initial_arrays(cfg)
    return {  # the client's update, computed as its pipeline does
        k: (v.astype(np.float64) - global_[k].astype(np.float64)).astype(global_[k].dtype)
        for k, v in model_to_ndarrays(model).items()
    }


def test_client_app_dpsgd_is_not_reproducible_by_the_server(tmp_path: Path) -> None:
    seeded = _dpsgd_cfg(tmp_path / "s", "privacy.secure_mode=false")
    replica = _server_replica(seeded)
    got = _client_reply(seeded, "seeded")
    # Control: with the opt-in, the server's replica is the client's reply, bit for bit.
    assert all(np.array_equal(got[k], replica[k]) for k in replica)

    default = _dpsgd_cfg(tmp_path / "d")
    assert default.privacy.secure_mode
    # The server's replica does not depend on secure_mode: it is `replica` again.
    first = _client_reply(default, "first")
    second = _client_reply(default, "second")
    for k in replica:
        assert not np.array_equal(first[k], replica[k]), k
        assert not np.array_equal(first[k], second[k]), k


# ------------------------------------------------------------- release and published hash


def _finished_run(path: Path, *overrides: str) -> dict[str, Any]:
    from fl_app.client.app import app as client_app
    from fl_app.config.compose import compose_config
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import run_experiment

    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=central",
            "dataset.num_partitions=3",
            "num_rounds=1",
            "train.local_epochs=1",
            "federated_eval_every=0",
            *overrides,
        ],
    )
    with InProcessGrid(client_app, 3, seed=cfg.seed) as grid:
        return run_experiment(grid, cfg, path, progress=False)


@pytest.fixture(scope="module")
def central_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("randomness-runs")
    _finished_run(base / "default")
    _finished_run(base / "seeded", "privacy.secure_mode=false")
    return {"default": base / "default", "seeded": base / "seeded"}


def test_seeded_run_is_not_for_release_and_public_export_refuses_it(
    central_runs: dict[str, Path], tmp_path: Path
) -> None:
    from fl_app.release import ExportRefused, export_run

    run = central_runs["seeded"]
    release = json.loads((run / "summary.json").read_text())["release"]
    assert release["for_release"] is False and release["status"] == "not for release"
    assert any("central DP noise" in r and "seed" in r for r in release["reasons"])
    with pytest.raises(ExportRefused) as info:
        export_run(run, "public", tmp_path / "pub")
    assert "not for release" in info.value.reason and "secure_mode=true" in info.value.fix
    assert not (tmp_path / "pub").exists()
    # Internal use: the restricted export says so on the card.
    res = export_run(run, "restricted", tmp_path / "res")
    assert res.card["release"] == release
    md = (res.out_dir / "model_card.md").read_text()
    assert md.startswith("# Model card") and "NOT FOR RELEASE: central DP noise" in md
    # The default run is releasable, and says so.
    default = json.loads((central_runs["default"] / "summary.json").read_text())["release"]
    assert default == {"for_release": True, "status": "for release", "reasons": []}


def test_published_config_hash_matches_no_seed_search(
    central_runs: dict[str, Path], tmp_path: Path
) -> None:
    """The attack of the review: hash the card's config with every seed until one
    matches. The search finds the run's seed against the unsalted hash (the old card),
    but nothing matches the published one."""
    import hashlib

    import yaml

    from fl_app.config.compose import config_to_dict, to_app_config
    from fl_app.release import export_run

    run = central_runs["default"]
    summary = json.loads((run / "summary.json").read_text())
    card = export_run(run, "public", tmp_path / "pub").card
    manifest = json.loads((tmp_path / "pub" / "MANIFEST.json").read_text())
    published = card["reproducibility"]["config_hash"]
    assert published == manifest["source"]["config_hash"]
    cfg = to_app_config(yaml.safe_load((run / "config.yaml").read_text()))
    plain = config_to_dict(
        dataclasses.replace(cfg, resume=None, rollback_to=None, audit_signing_key=None)
    )

    def hash_with_seed(seed: int) -> str:
        canonical = json.dumps({**plain, "seed": seed}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    assert hash_with_seed(cfg.seed) == summary["config_hash"]  # the search works...
    found = {hash_with_seed(s) for s in range(20_000)}
    assert summary["config_hash"] in found
    assert published not in found  # ...but not against what is published
    for f in (tmp_path / "pub").iterdir():
        assert summary["config_hash"][:16].encode() not in f.read_bytes(), f.name
    # The manifest publishes the run's model file SHA-256 (source.model_sha256) and the
    # weights are public: had that file kept the plain hash in its metadata, rebuilding it
    # per guessed seed would be the same oracle (red-team finding). It keeps the salted one.
    source_model = (run / "model.safetensors").read_bytes()
    assert manifest["source"]["model_sha256"] == hashlib.sha256(source_model).hexdigest()
    assert summary["config_hash"].encode() not in source_model
    assert published.encode() in source_model


# ------------------------------------------------------------------- statistics (d)
# Unseeded by construction (the sources take no seed), so every bound below is set for
# a stated false-failure rate; together they fail spuriously less than once in 1e6 runs.


def test_keystream_float32_gaussian_has_the_right_moments_and_shape() -> None:
    """n = 1,000,001 samples (odd: Box-Muller pairs are trimmed). Mean within 6 SE
    (1/sqrt(n)); std within 6 SE of 1 (SE of the std ~ 1/sqrt(2n)); P(|x| > 3) =
    0.0026998 (erfc(3/sqrt 2)) within 6 binomial sd; KS against N(0, 1) on 100,000
    samples, p > 1e-7. Each check's false-failure rate < 2e-9 (KS: 1e-7)."""
    x = SecureNoise().standard_normal_f32(1_000_001)
    assert x.dtype == np.float32 and x.shape == (1_000_001,)
    n = x.size
    xd = x.astype(np.float64)
    assert abs(xd.mean()) < 6 / math.sqrt(n)
    assert abs(xd.std() - 1) < 6 / math.sqrt(2 * n)
    p3 = math.erfc(3 / math.sqrt(2))
    tail = float(np.mean(np.abs(xd) > 3))
    assert abs(tail - p3) < 6 * math.sqrt(p3 * (1 - p3) / n)
    assert stats.kstest(xd[:100_000], "norm").pvalue > 1e-7
    # The two halves (cos and sin branches) are uncorrelated: |corr| < 6/sqrt(n/2).
    h = n // 2
    assert abs(np.corrcoef(xd[:h], xd[h : 2 * h])[0, 1]) < 6 / math.sqrt(h)
    assert SecureNoise().standard_normal_f32(0).shape == (0,)


def test_keystream_poisson_sampler_keeps_each_record_with_probability_q() -> None:
    """5 steps over 100,000 records at q = 0.03: per record and step a Bernoulli(q),
    so the 500,000 flips total Binomial(5e5, 0.03) (mean 15,000, sd 120.6): within 6 sd
    (false failure < 2e-9); every batch is sorted, distinct and in range; q = 1 keeps
    every record (like torch.rand's [0, 1))."""
    s = KeystreamPoissonSampler(
        num_samples=100_000, sample_rate=0.03, steps=5, source=SecureNoise()
    )
    batches = list(s)
    assert len(batches) == len(s) == 5
    for b in batches:
        assert b == sorted(set(b)) and b[0] >= 0 and b[-1] < 100_000
    total = sum(len(b) for b in batches)
    assert abs(total - 15_000) < 6 * math.sqrt(5e5 * 0.03 * 0.97)
    full = KeystreamPoissonSampler(num_samples=1000, sample_rate=1.0, steps=2, source=SecureNoise())
    assert all(b == list(range(1000)) for b in full)


def test_keyed_client_sampling_is_secret_per_run_and_uniform() -> None:
    """Same key and round: the same cohort (the driver samples the next round ahead);
    another key, or the seeded sampler with the run's seed: another cohort. Inclusion
    over 400 rounds of 50-of-200 is Binomial(400, 1/4) per node (sd 8.66): every node
    within 6 sd (union bound over 200 nodes: false failure < 4e-7). Poisson at 0.3 over
    400 rounds of 200 nodes: Binomial(80,000, 0.3) within 6 sd (< 2e-9)."""
    import os

    ids = [2**64 - 1 - 7 * i for i in range(200)]
    key = os.urandom(32)
    fixed = FixedSizeSampler(0.25, seed=42, key=key)
    assert fixed.sample(ids, 5) == fixed.sample(list(reversed(ids)), 5)
    assert FixedSizeSampler(0.25, seed=42, key=key).sample(ids, 5) == fixed.sample(ids, 5)
    assert fixed.sample(ids, 5) != FixedSizeSampler(0.25, seed=42, key=os.urandom(32)).sample(
        ids, 5
    )
    assert fixed.sample(ids, 5) != FixedSizeSampler(0.25, seed=42).sample(ids, 5)
    assert key.hex() not in repr(fixed)
    counts = dict.fromkeys(ids, 0)
    for rnd in range(1, 401):
        cohort = fixed.sample(ids, rnd)
        assert len(cohort) == 50 == len(set(cohort)) and set(cohort) <= set(ids)
        for n in cohort:
            counts[n] += 1
    assert all(abs(c - 100) < 6 * math.sqrt(400 * 0.25 * 0.75) for c in counts.values())
    poisson = PoissonSampler(0.3, seed=42, key=key)
    assert poisson.sample(ids, 9) == poisson.sample(ids, 9)
    assert poisson.sample(ids, 9) != PoissonSampler(0.3, seed=42).sample(ids, 9)
    total = sum(len(poisson.sample(ids, r)) for r in range(1, 401))
    assert abs(total - 24_000) < 6 * math.sqrt(80_000 * 0.3 * 0.7)
    # Train and evaluate streams under one key are independent draws.
    assert fixed.sample(ids, 3) != FixedSizeSampler(0.25, 42, stream=1, key=key).sample(ids, 3)
    with pytest.raises(ValueError, match="32 bytes"):
        PoissonSampler(0.3, seed=1, key=b"short")


def test_stochastic_rounding_from_the_keystream_is_unbiased_with_the_right_variance() -> None:
    """Secure-aggregation encoding with the clients' keystream source: rounding x·s to
    floor or floor + 1 with P(up) = frac(x·s). Over n = 400,000 coordinates of one
    value with frac = 0.3: the share rounded up is Binomial(n, 0.3)/n, within 6 sd of
    0.3 (false failure < 2e-9); every coordinate decodes to floor or floor + 1."""
    from fl_app.secagg.vector import round_codec

    codec = round_codec(32, 1.0, 10)
    s = codec.scale
    x = np.full(400_000, (np.floor(0.25 * s) + 0.3) / s)
    encoded = codec.encode(x, SecureNoise())  # type: ignore[arg-type]
    decoded = codec.decode_signed(encoded, 1)
    low = int(np.floor(0.25 * s))
    assert set(np.unique(decoded).tolist()) == {low, low + 1}
    up = float(np.mean(decoded == low + 1))
    assert abs(up - 0.3) < 6 * math.sqrt(0.3 * 0.7 / x.size)


def test_a_site_with_a_policy_refuses_seeded_dpsgd_unless_it_opts_in(tmp_path: Path) -> None:
    """The server cannot switch a site's DP-SGD to noise it can regenerate: with a
    policy file in force, secure_mode=false is refused (naming the policy field)
    before training, and runs only if the site itself sets allow_seeded_noise."""
    seeded = _dpsgd_cfg(tmp_path / "s", "privacy.secure_mode=false")
    strict = tmp_path / "strict.yaml"
    strict.write_text("max_epsilon: 100.0\n")
    reply = _client_message(seeded, "strict", **{"policy-path": str(strict)})
    assert reply.has_error() and "allow_seeded_noise" in reply.error.reason
    assert not list((tmp_path / "s").glob("*strict*"))  # nothing spent or recorded
    opted = tmp_path / "opted.yaml"
    opted.write_text("max_epsilon: 100.0\nallow_seeded_noise: true\n")
    assert not _client_message(seeded, "opted", **{"policy-path": str(opted)}).has_error()
    default = _dpsgd_cfg(tmp_path / "d")
    assert not _client_message(default, "d", **{"policy-path": str(strict)}).has_error()


def test_a_site_with_its_own_data_and_no_policy_refuses_seeded_dpsgd(tmp_path: Path) -> None:
    """No policy file is no consent: a deployed site (site-name in its node config)
    refuses the server's secure_mode=false; a simulated partition keeps the opt-in
    (found by the red-team review: the check was skipped whenever no policy existed)."""
    seeded = _dpsgd_cfg(tmp_path / "s", "privacy.secure_mode=false")
    reply = _client_message(seeded, "named", **{"site-name": "hospital-a"})
    assert reply.has_error() and "allow_seeded_noise" in reply.error.reason
    assert not _client_message(seeded, "simulated").has_error()


@pytest.mark.parametrize(
    ("overrides", "keyed"),
    [
        (["privacy=central"], True),
        (["privacy=distributed", "secagg=secaggplus"], True),
        (["privacy=central", "privacy.secure_mode=false"], False),
        (["privacy=local"], False),  # no amplification by sampling in local DP's epsilon
        ([], False),  # no DP: experiments reproduce
    ],
)
def test_driver_samples_from_a_secret_key_where_epsilon_uses_amplification(
    overrides: list[str], keyed: bool
) -> None:
    from fl_app.config.compose import compose_plan
    from strategies.factory import build_driver

    plan = compose_plan("config", ["runtime=inprocess", *overrides])
    driver = build_driver(plan, train_config={}, evaluate_config={}, evaluate_fn=None)
    assert (driver.train_sampler.key is not None) is keyed  # type: ignore[attr-defined]


def test_secure_noise_stream_never_starts_near_the_chacha20_counter_limit(monkeypatch) -> None:
    """The 4 counter bytes of the ChaCha20 nonce are not random: with an all-ones OS
    source a random counter would sit at 2**32 - 1 and OpenSSL would refuse the stream
    after one 64-byte block (a random mid-training crash, ~24 % per round for an
    11M-parameter model). Found by the red-team review."""
    import fl_app.privacy.noise as noise_mod

    monkeypatch.setattr(noise_mod.os, "urandom", lambda n: b"\xff" * n)
    source = noise_mod.SecureNoise()
    assert source.standard_normal_f32(50_000).shape == (50_000,)  # 200 kB of keystream
    assert source.words(10_000).shape == (10_000,)


def test_secure_noise_random_in_place_matches_the_general_path(monkeypatch) -> None:
    """Stochastic rounding's in-place fast path (reused buffers) yields exactly the
    53-bit doubles of the plain path for the same keystream, call after call."""
    import fl_app.privacy.noise as noise_mod

    key_bytes = iter([b"k" * 32, b"n" * 12, b"k" * 32, b"n" * 12])
    monkeypatch.setattr(noise_mod.os, "urandom", lambda n: next(key_bytes))
    fast, plain = noise_mod.SecureNoise(), noise_mod.SecureNoise()
    for size in (5, 16_384, 3, 20_000):
        out = np.empty((size,))
        assert fast.random(out=out) is out
        np.testing.assert_array_equal(out, plain.random(size))
        assert out.min() >= 0.0 and out.max() < 1.0
