"""DP synthetic surrogates (``fl-app synth``, issue 20; docs/synthetic-data.md).

Guarantees: the surrogate's epsilon is in the site's budget ledger before the
synthesizer sees a row, and counts in the site's total (and against its policy's
max_epsilon); the domain is the config's, never the data's; the card pins the written
bytes and ``dataset=synthetic`` refuses any others, so a run on the surrogate is
reproducible from its card; the synthesizer's global-RNG draws cannot be predicted from
a seed set elsewhere. The synthesizer itself is a recording double here except in the
one slow test, which runs smartnoise-synth's MST.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app.client.policy import SitePolicy
from fl_app.client.refusal import PolicyRefusal
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.config.schema import AppConfig, DatasetConfig, DatasetKind
from fl_app.data import DataError, load_client_data, load_server_test_set
from fl_app.data.loader import clear_caches
from fl_app.data.synthetic import CARD_FILE, DATA_FILE
from fl_app.privacy.state import SiteBudgetLedger, SiteSpend
from fl_app.synth.mechanism import SynthError, check_table, secret_global_numpy_rng
from fl_app.synth.run import SurrogateRequest, make_surrogate
from fl_app.synth.table import decode_table, encode_table, from_codes, to_codes

RAW = np.arange(17)  # digits' raw pixel values 0..16


def test_seventeen_levels_are_the_raw_digit_values() -> None:
    codes = to_codes(RAW / 16.0, 17, 0.0, 1.0)
    assert codes.tolist() == list(range(17))
    assert np.array_equal(from_codes(codes, 17, 0.0, 1.0), (RAW / 16.0).astype(np.float32))


def test_four_levels_bin_by_hand() -> None:
    # Width 1/4 of [0, 1]: raw 0-3 -> 0, 4-7 -> 1, 8-11 -> 2, 12-16 -> 3 (1.0 in the top).
    expected = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 5
    assert to_codes(RAW / 16.0, 4, 0.0, 1.0).tolist() == expected
    assert from_codes(np.arange(4), 4, 0.0, 1.0).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match="levels"):
        to_codes(RAW, 1, 0.0, 1.0)


def test_binning_of_another_range_by_hand() -> None:
    # [-1, 1] in 4 levels of width 1/2: -1.5 clips to 0, 1 falls in the top level.
    codes = to_codes(np.array([-1.5, -1.0, -0.5, 0.0, 0.49, 1.0]), 4, -1.0, 1.0)
    assert codes.tolist() == [0, 0, 1, 2, 2, 3] and codes.dtype == np.int64
    assert to_codes(np.array([0.0, 0.5, 1.0]), 2, 0.0, 1.0).tolist() == [0, 1, 1]
    decoded = from_codes(np.array([0, 1, 2]), 3, -1.0, 1.0)
    assert decoded.tolist() == [-1.0, 0.0, 1.0] and decoded.dtype == np.float32
    with pytest.raises(ValueError, match="high > low"):
        to_codes(np.zeros(2), 4, 1.0, 1.0)


def test_table_round_trip_keeps_labels_and_shape() -> None:
    x = (np.arange(2 * 4) % 17 / 16.0).reshape(2, 1, 2, 2)
    y = np.array([3, 9])
    table = encode_table(x, y, 17, 0.0, 1.0)
    assert table.tolist() == [[0, 1, 2, 3, 3], [4, 5, 6, 7, 9]]
    xs, ys = decode_table(table, (1, 2, 2), 17, 0.0, 1.0)
    assert np.array_equal(xs, x.astype(np.float32)) and ys.tolist() == [3, 9]
    # Float labels and codes (a library's sample) still give an int64 table and labels.
    assert encode_table(x, y.astype(np.float64), 17, 0.0, 1.0).dtype == np.int64
    assert decode_table(table.astype(np.float64), (1, 2, 2), 17, 0.0, 1.0)[1].dtype == np.int64


def test_check_table_refuses_codes_outside_the_public_domain() -> None:
    assert check_table(np.array([[0, 2], [1, 0]]), [2, 3], "t").dtype == np.int64
    with pytest.raises(SynthError, match="outside the public domain"):
        check_table(np.array([[2, 0]]), [2, 3], "t")
    with pytest.raises(SynthError, match="shape"):
        check_table(np.array([[0, 0, 0]]), [2, 3], "t")


def test_global_rng_inside_is_not_the_seeded_one_and_is_restored_after() -> None:
    np.random.seed(0)
    expected_after = np.random.RandomState(0).random_sample(3)
    with secret_global_numpy_rng():
        first = np.random.random_sample(3)
    assert np.array_equal(np.random.random_sample(3), expected_after)  # caller's stream
    np.random.seed(0)
    with secret_global_numpy_rng():
        second = np.random.random_sample(3)
    # A seed set outside decides nothing inside (equal draws: probability ~2^-150).
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, expected_after)


class RecordingSynth:
    """Returns the site's own table (a stand-in), recording the ledger at call time."""

    def __init__(self, ledger: SiteBudgetLedger) -> None:
        self.ledger = ledger
        self.calls: list[tuple[list[int], float, float, int, list[SiteSpend]]] = []

    def __call__(self, table, cardinalities, epsilon, delta, rows):  # type: ignore[no-untyped-def]
        self.calls.append((list(cardinalities), epsilon, delta, rows, self.ledger.entries()))
        return np.asarray(table)[:rows]


def _request(tmp_path: Path, **kw: object) -> SurrogateRequest:
    base: dict[str, object] = dict(
        out_dir=tmp_path / "out",
        state_dir=tmp_path / "state",
        site="site-a",
        epsilon=2.0,
        delta=1e-6,
        levels=17,
        partition=0,
    )
    base.update(kw)
    return SurrogateRequest(**base)  # type: ignore[arg-type]


def _cfg() -> AppConfig:
    cfg = AppConfig()
    cfg.dataset.num_partitions = 10
    return cfg


def test_surrogate_epsilon_is_in_the_site_ledger_before_synthesis(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path / "state", "site-a")
    ledger.record(SiteSpend("run-1", "record-level", 1.5, 1e-5))  # an earlier FL run
    synth = RecordingSynth(ledger)
    result = make_surrogate(_cfg(), _request(tmp_path), synth)
    card = result.card
    (cards, eps, delta, rows, seen) = synth.calls[0]
    assert cards == [17] * 64 + [10]  # public domain: 64 pixels x 17 levels, 10 labels
    assert (eps, delta) == (2.0, 1e-6)
    # The surrogate's line was on disk when the synthesizer ran.
    assert seen[-1] == SiteSpend(card["release_id"], "synthetic data", 2.0, 1e-6)
    # Site total by hand: the FL run's 1.5 plus the surrogate's 2.0; deltas add.
    assert (result.site_epsilon, result.site_delta) == pytest.approx((3.5, 1e-5 + 1e-6))
    assert ledger.total("next", "record-level", 0.0, 0.0) == pytest.approx((3.5, 1e-5 + 1e-6))
    # Partition 0 of 10 of the digits pool (the server's holdout removed first).
    part = load_client_data(_cfg().dataset, 0, 10, 42)
    assert rows == card["rows"] == len(part.train.y) + len(part.val.y)


def test_card_pins_the_bytes_and_states_no_seed_or_site_total(tmp_path: Path) -> None:
    card = make_surrogate(
        _cfg(), _request(tmp_path), RecordingSynth(SiteBudgetLedger(tmp_path, "x"))
    ).card
    out = tmp_path / "out"
    assert card["data_sha256"] == hashlib.sha256((out / DATA_FILE).read_bytes()).hexdigest()
    assert json.loads((out / CARD_FILE).read_text()) == card
    assert card["privacy"]["epsilon"] == 2.0 and card["privacy"]["delta"] == 1e-6
    assert card["method"]["synthesizer"] == "mst" and card["preprocessing"]["levels"] == 17
    assert card["randomness"]["seed"] is None and card["limits"]
    assert "3.5" not in (out / CARD_FILE).read_text()  # nothing about other releases
    text = (out / "card.md").read_text()
    assert "epsilon 2, delta 1e-06" in text and card["data_sha256"] in text


def test_policy_max_epsilon_counts_the_site_total_and_refuses_first(tmp_path: Path) -> None:
    ledger = SiteBudgetLedger(tmp_path / "state", "site-a")
    ledger.record(SiteSpend("run-1", "record-level", 1.5, 1e-5))
    synth = RecordingSynth(ledger)
    with pytest.raises(PolicyRefusal, match=r"its budget ledger.* past its max_epsilon 3"):
        # 2.0 alone fits under 3.0; with the earlier run's 1.5 the site would reach 3.5.
        make_surrogate(_cfg(), _request(tmp_path), synth, SitePolicy(max_epsilon=3.0))
    assert synth.calls == [] and not (tmp_path / "out").exists()
    assert ledger.entries() == [SiteSpend("run-1", "record-level", 1.5, 1e-5)]


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [("epsilon", 0.0, "--epsilon"), ("delta", 1.0, "--delta"), ("levels", 1, "--levels")],
)
def test_bad_arguments_name_the_flag(tmp_path: Path, field: str, value: float, flag: str) -> None:
    with pytest.raises(SynthError, match=flag):
        make_surrogate(
            _cfg(),
            _request(tmp_path, **{field: value}),
            RecordingSynth(SiteBudgetLedger(tmp_path, "x")),
        )


def test_an_output_folder_holding_a_surrogate_is_refused(tmp_path: Path) -> None:
    synth = RecordingSynth(SiteBudgetLedger(tmp_path / "state", "site-a"))
    make_surrogate(_cfg(), _request(tmp_path), synth)
    with pytest.raises(SynthError, match="already holds a surrogate"):
        make_surrogate(_cfg(), _request(tmp_path), synth)
    assert len(synth.ledger.entries()) == 1


def _synthetic_cfg(folder: Path) -> DatasetConfig:
    return DatasetConfig(kind=DatasetKind.synthetic, synthetic_path=str(folder), pixel_scale=1.0)


def test_a_run_on_the_surrogate_is_reproducible_from_its_card(tmp_path: Path) -> None:
    synth = RecordingSynth(SiteBudgetLedger(tmp_path / "state", "site-a"))
    card = make_surrogate(_cfg(), _request(tmp_path), synth).card
    dcfg = _synthetic_cfg(tmp_path / "out")
    test = load_server_test_set(dcfg, 7)
    client = load_client_data(dcfg, 3, 10, 7)
    clear_caches()
    again = load_client_data(dcfg, 3, 10, 7)
    assert np.array_equal(client.train.x, again.train.x)
    assert np.array_equal(client.train.y, again.train.y)
    assert (
        test is not None
        and len(test.y)
        + sum(
            len(load_client_data(dcfg, k, 10, 7).train.y)
            + len(load_client_data(dcfg, k, 10, 7).val.y)
            for k in range(10)
        )
        == card["rows"]
    )
    # The double returned the site's own codes: decoded pixels are k/16 exactly.
    assert set(np.unique(client.train.x * 16).tolist()) <= set(range(17))


def test_dataset_synthetic_refuses_bytes_its_card_does_not_pin(tmp_path: Path) -> None:
    make_surrogate(_cfg(), _request(tmp_path), RecordingSynth(SiteBudgetLedger(tmp_path, "x")))
    path = tmp_path / "out" / DATA_FILE
    blob = bytearray(path.read_bytes())
    blob[-30] ^= 1
    path.write_bytes(bytes(blob))
    clear_caches()
    with pytest.raises(DataError, match=r"dataset\.synthetic_path"):
        load_server_test_set(_synthetic_cfg(tmp_path / "out"), 7)


def test_config_names_the_missing_surrogate_folder() -> None:
    with pytest.raises(ConfigError, match=r"dataset\.synthetic_path"):
        compose_config("config", ["dataset=synthetic"])


@pytest.mark.slow
def test_smartnoise_mst_keeps_the_domain_and_a_strong_pair() -> None:
    """The real library (installed by scripts/bootstrap.sh): MST samples codes inside the
    public domain, as many rows as asked, leaves the caller's global RNG stream alone,
    and, at a large epsilon, keeps a 2-way marginal it must select (feature 0 = 2 x label).
    Independent columns would agree on about 1/3 of rows; MST measures the pair with noise
    sigma ~ 1 against counts of ~100 per cell, so agreement below 0.8 is a failure, not
    chance."""
    from fl_app.synth.mechanism import SnsynthSynthesizer

    gen = np.random.default_rng(20)
    label = gen.integers(0, 2, size=300)
    table = np.stack(
        [2 * label, gen.integers(0, 3, size=300), gen.integers(0, 3, size=300), label], axis=1
    )
    np.random.seed(5)
    expected_after = np.random.RandomState(5).random_sample(2)
    out = SnsynthSynthesizer()(table, [3, 3, 3, 2], 10.0, 1e-6, 250)
    assert np.array_equal(np.random.random_sample(2), expected_after)
    assert out.shape == (250, 4) and out.dtype == np.int64
    assert out.min() >= 0 and np.all(out.max(axis=0) <= np.array([2, 2, 2, 1]))
    assert np.mean(out[:, 0] == 2 * out[:, 3]) > 0.8


class _StandIn:
    """``fl-app synth``'s synthesizer replaced by the identity on the site's table."""

    def __init__(self, method: object) -> None:
        self.method = method

    def __call__(self, table, cardinalities, epsilon, delta, rows):  # type: ignore[no-untyped-def]
        return np.asarray(table)[:rows]


def test_cli_synth_then_dataset_synthetic_composes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The commands of docs/synthetic-data.md with a stand-in synthesizer (the real one
    takes minutes on 65 columns): a surrogate, a ledger line, a config that runs on it."""
    import fl_app.synth.mechanism as mechanism
    from fl_app.cli.synth import synth_main

    monkeypatch.setattr(mechanism, "SnsynthSynthesizer", _StandIn)
    out, state = tmp_path / "sandbox", tmp_path / "state"
    argv = ["--out", str(out), "--epsilon", "3", "--levels", "4", "--state-dir", str(state)]
    assert synth_main([*argv, "--site-name", "demo"]) == 0
    printed = capsys.readouterr().out
    assert "epsilon 3, delta 1e-06" in printed and "totals epsilon 3" in printed
    (entry,) = SiteBudgetLedger(state, "site-demo").entries()
    assert (entry.kind, entry.epsilon, entry.delta) == ("synthetic data", 3.0, 1e-6)
    card = json.loads((out / CARD_FILE).read_text())
    held_out = load_server_test_set(_cfg().dataset, 42)
    assert held_out is not None  # load_digits has 1,797 rows; the server keeps its holdout
    assert card["rows"] == 1797 - len(held_out.y) and card["preprocessing"]["levels"] == 4
    cfg = compose_config("config", ["dataset=synthetic", f"dataset.synthetic_path={out}"])
    assert cfg.dataset.kind is DatasetKind.synthetic
    # A second surrogate into the same folder, and a missing site, are refused (status 2).
    assert synth_main([*argv, "--site-name", "demo"]) == 2
    assert synth_main(argv) == 2
    assert "--site-name" in capsys.readouterr().err


def _run_dir(folder: Path, cfg: AppConfig, seed: int) -> torch.nn.Module:
    import yaml

    from fl_app.config.compose import config_to_dict
    from fl_app.models import build_model
    from fl_app.weights import model_to_ndarrays, save_safetensors

    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=seed)
    sha = save_safetensors(folder / "model.safetensors", model_to_ndarrays(model), {})
    (folder / "summary.json").write_text(json.dumps({"model_sha256": sha}))
    return model.eval()


def _direct_accuracy(model: torch.nn.Module, dcfg: DatasetConfig, seed: int) -> float:
    test = load_server_test_set(dcfg, seed)
    assert test is not None
    with torch.no_grad():
        pred = model(torch.as_tensor(test.x)).argmax(dim=1).numpy()
    return float(np.mean(pred == test.y))


def test_compare_evaluates_both_models_on_the_real_test_rows(tmp_path: Path) -> None:
    from fl_app.synth.compare import compare_runs

    make_surrogate(_cfg(), _request(tmp_path), RecordingSynth(SiteBudgetLedger(tmp_path, "x")))
    real_cfg = _cfg()
    sur_cfg = _cfg()
    sur_cfg.dataset = _synthetic_cfg(tmp_path / "out")
    real = _run_dir(tmp_path / "real", real_cfg, seed=1)
    sur = _run_dir(tmp_path / "sur", sur_cfg, seed=2)
    doc = compare_runs(tmp_path / "real", tmp_path / "sur")
    acc = doc["accuracy"]
    assert acc["real_on_real"] == pytest.approx(_direct_accuracy(real, real_cfg.dataset, 42))
    assert acc["surrogate_on_real"] == pytest.approx(_direct_accuracy(sur, real_cfg.dataset, 42))
    assert acc["surrogate_on_surrogate"] == pytest.approx(
        _direct_accuracy(sur, sur_cfg.dataset, 42)
    )
    held_out = load_server_test_set(real_cfg.dataset, 42)
    assert held_out is not None
    assert doc["surrogate"]["epsilon"] == 2.0 and doc["real_test_rows"] == len(held_out.y)
    with pytest.raises(SynthError, match="give the real-data run first"):
        compare_runs(tmp_path / "sur", tmp_path / "real")


def test_compare_refuses_a_run_whose_sites_kept_layers(tmp_path: Path) -> None:
    """A body-only release (share.layers) has no full model to score: refused by name,
    not a bare missing-keys error and not a score with the head at its initial values."""
    from fl_app.synth.compare import compare_runs

    real_cfg, sur_cfg = _cfg(), _cfg()
    real_cfg.share.layers = ["net.1.*"]
    real_cfg.server_eval = False
    _run_dir(tmp_path / "real", real_cfg, seed=1)
    _run_dir(tmp_path / "sur", sur_cfg, seed=2)
    with pytest.raises(SynthError, match=r"share.layers=\['net.1.\*'\].*kept \['net.3.bias'"):
        compare_runs(tmp_path / "real", tmp_path / "sur")


def test_surrogate_folder_problems_name_the_field(tmp_path: Path) -> None:
    """Each way a surrogate folder can be wrong is a DataError saying what to fix."""
    from dataclasses import replace

    from fl_app.config.schema import LocalFormat
    from fl_app.data.synthetic import load_synthetic_source, read_card, synthetic_data_path

    with pytest.raises(DataError, match=r"needs dataset\.synthetic_path"):
        synthetic_data_path(DatasetConfig(kind=DatasetKind.synthetic))
    with pytest.raises(DataError, match=r"card\.json is missing"):
        read_card(tmp_path)
    (tmp_path / CARD_FILE).write_text("[1, 2]")
    with pytest.raises(DataError, match="holds no data_sha256"):
        read_card(tmp_path)
    (tmp_path / CARD_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not a readable surrogate card"):
        read_card(tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({"data_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"cannot read .*synthetic\.npz"):
        load_synthetic_source(_synthetic_cfg(tmp_path))
    # A surrogate loads as npz, scaled as written, whatever the config's file settings.
    make_surrogate(_cfg(), _request(tmp_path), RecordingSynth(SiteBudgetLedger(tmp_path, "x")))
    odd = replace(_synthetic_cfg(tmp_path / "out"), local_format=LocalFormat.csv, pixel_scale=16.0)
    assert load_synthetic_source(odd).x.max() == pytest.approx(1.0)


def test_a_surrogate_above_max_epsilon_alone_is_refused_naming_its_kind(tmp_path: Path) -> None:
    synth = RecordingSynth(SiteBudgetLedger(tmp_path / "state", "site-a"))
    with pytest.raises(PolicyRefusal, match="synthetic data epsilon would reach 2"):
        make_surrogate(_cfg(), _request(tmp_path), synth, SitePolicy(max_epsilon=1.5))
    assert synth.calls == [] and synth.ledger.entries() == []
