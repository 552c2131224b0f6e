"""scripts/bench_compression.py's table assembly, on fake summaries (no run).

The script's numbers go into docs/performance.md; what is checked here is that they are
read from the right fields of ``summary.json`` and summarised as the doc says: mean and
sample standard deviation (n - 1) of the accuracy over seeds, the run's upload per
client as the per-round mean times the rounds measured, upload relative to the
uncompressed run of the same privacy setting, and a refused method as a row that says
so. Expected values are worked out by hand in each test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_compression.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compression", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bc = _load()


def _summary(
    acc: float, up: float, down: float = 20_000.0, rounds: int = 10, eps: float | None = None
) -> dict[str, Any]:
    return {
        "status": "completed",
        "accuracy": acc,
        "bandwidth": {
            "rounds_measured": rounds,
            "upload_bytes_per_client_round": up,
            "download_bytes_per_client_round": down,
        },
        "privacy": {} if eps is None else {"epsilon": eps},
    }


def _row(setting: Any, summaries: list[dict[str, Any]]) -> Any:
    row = bc.Row(setting)
    for s in summaries:
        bc.add_result(row, s)
    return row


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_settings_are_none_then_each_method_at_each_ratio_in_order() -> None:
    got = [(s.method, s.ratio, s.dp_z) for s in bc.settings([0.25, 0.1], None)]
    assert got == [
        ("none", 1.0, None),
        ("randk", 0.25, None),
        ("randk", 0.1, None),
        ("topk", 0.25, None),
        ("topk", 0.1, None),
        ("sketch", 0.25, None),
        ("sketch", 0.1, None),
    ]
    with_dp = bc.settings([0.5], 1.0)
    assert [(s.method, s.dp_z) for s in with_dp] == [
        ("none", None),
        ("randk", None),
        ("topk", None),
        ("sketch", None),
        ("none", 1.0),
        ("randk", 1.0),
        ("topk", 1.0),
        ("sketch", 1.0),
    ]


def test_overrides_name_the_compression_its_ratio_and_central_dp() -> None:
    assert bc.Setting("none", 1.0).overrides(10, 2) == [
        "runtime=inprocess",
        "num_rounds=10",
        "seed=2",
    ]
    assert bc.Setting("topk", 0.25, 1.5).overrides(3, 0) == [
        "runtime=inprocess",
        "num_rounds=3",
        "seed=0",
        "share.artifact=compressed",
        "share.compression=topk",
        "share.ratio=0.25",
        "privacy=central",
        "privacy.noise_multiplier=1.5",
    ]


def test_table_mean_sample_sd_run_total_and_share_of_uncompressed() -> None:
    none = _row(bc.Setting("none", 1.0), [_summary(a, 20_000.0) for a in (0.90, 0.94, 0.98)])
    randk = _row(
        bc.Setting("randk", 0.25),
        [_summary(0.80, 5_000.0, rounds=10), _summary(0.70, 5_000.0, rounds=10)],
    )
    lines = bc.markdown_table([none, randk], 10).splitlines()
    assert _cells(lines[0]) == [
        "compression",
        "accuracy after 10 rounds",
        "upload B / client / round",
        "upload B / client, 10 rounds",
        "upload vs none",
        "download B / client / round",
    ]
    # none: mean 0.94; sample sd sqrt((0.04² + 0 + 0.04²) / 2) = 0.04.
    assert _cells(lines[2]) == ["none", "0.940 ± 0.040", "20,000", "200,000", "1.000", "20,000"]
    # randk: mean 0.75; sd sqrt(2 · 0.05² / 1) = 0.0707; 5,000 · 10 rounds; 5,000 / 20,000.
    assert _cells(lines[3]) == [
        "randk, ratio 0.25",
        "0.750 ± 0.071",
        "5,000",
        "50,000",
        "0.250",
        "20,000",
    ]
    assert "- randk: " + bc.NOTES["randk"] in lines


def test_run_total_uses_the_rounds_each_run_measured() -> None:
    # 4,000 B over 10 rounds and 4,000 B over 5 rounds: totals 40,000 and 20,000, mean 30,000.
    row = _row(bc.Setting("topk", 0.1), [_summary(0.5, 4_000.0), _summary(0.5, 4_000.0, rounds=5)])
    assert row.up_total == [40_000.0, 20_000.0]
    line = bc.markdown_table([row], 10).splitlines()[2]
    assert _cells(line)[1:4] == ["0.500 ± 0.000", "4,000", "30,000"]


def test_one_seed_shows_the_value_alone() -> None:
    row = _row(bc.Setting("none", 1.0), [_summary(0.9613, 19_784.0)])
    assert _cells(bc.markdown_table([row], 10).splitlines()[2])[1] == "0.961"


def test_refused_method_is_a_row_saying_so_with_the_reason_below() -> None:
    none = _row(bc.Setting("none", 1.0), [_summary(0.9, 20_000.0)])
    refused = bc.Row(bc.Setting("sketch", 0.1), refused="`share.compression`: not available")
    lines = bc.markdown_table([none, refused], 10).splitlines()
    assert _cells(lines[3]) == ["sketch, ratio 0.1", "refused in this version", *["—"] * 4]
    assert "- refused in this version: `share.compression`: not available" in lines


def test_dp_rows_show_epsilon_and_compare_with_the_dp_uncompressed_run() -> None:
    rows = [
        _row(bc.Setting("none", 1.0), [_summary(0.9, 20_000.0)]),
        _row(bc.Setting("none", 1.0, 1.0), [_summary(0.6, 10_000.0, eps=12.345)]),
        _row(bc.Setting("randk", 0.1, 1.0), [_summary(0.5, 2_000.0, eps=12.345)]),
    ]
    lines = bc.markdown_table(rows, 10).splitlines()
    assert _cells(lines[0])[-1] == "ε (δ=1e-5)"
    assert _cells(lines[2])[-1] == "—"  # no DP: no ε
    # The DP randk row is measured against the DP none row (2,000 / 10,000), not the plain one.
    assert _cells(lines[4]) == [
        "randk, ratio 0.1, central DP z=1",
        "0.500",
        "2,000",
        "20,000",
        "0.200",
        "20,000",
        "12.3",
    ]


@pytest.mark.parametrize("case", [0, 1])
def test_a_run_that_did_not_complete_or_has_no_bytes_is_refused(case: int) -> None:
    bad = [
        {**_summary(0.9, 1.0), "status": "degraded"},
        {**_summary(0.9, 1.0), "bandwidth": None},
    ][case]
    with pytest.raises(ValueError, match=["status 'degraded'", "no bandwidth block"][case]):
        bc.add_result(bc.Row(bc.Setting("none", 1.0)), bad)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [
        _row(bc.Setting("none", 1.0), [_summary(0.9, 20_000.0), _summary(0.92, 20_000.0)]),
        _row(bc.Setting("randk", 0.1), [_summary(0.8, 2_000.0)]),
        bc.Row(bc.Setting("sketch", 0.1), refused="no"),
    ]
    out = tmp_path / "curve.png"
    bc.plot(rows, out, 10)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
