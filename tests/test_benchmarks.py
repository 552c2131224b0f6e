"""The benchmark suite's machinery: tables, the runner's budget, accounting agreement.

Speed goals are benchmarks (``python -m benchmarks``), not unit tests: nothing here
asserts a timing. What is asserted: every section renders as a well-formed table,
the runner keeps to its budget and reports every section, a section runs end to end
in a child process, the legacy SecAgg+ baseline really aggregates, and fl-app's PLD
ε for 10,000 DP-SGD steps agrees with dp-accounting's PLD accountant within 1 %.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

# Opacus ships a top-level package also named ``benchmarks`` in site-packages; make
# sure this repository's wins, whichever way pytest was started.
_REPO = Path(__file__).resolve().parents[1]
if sys.path[0] != str(_REPO):
    sys.path.insert(0, str(_REPO))
for _name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
    if not str(getattr(sys.modules[_name], "__file__", "") or "").startswith(str(_REPO)):
        del sys.modules[_name]

from benchmarks import runner  # noqa: E402
from benchmarks.accounting import SETTINGS, reference_pld_epsilon  # noqa: E402
from benchmarks.section import (  # noqa: E402
    Section,
    fmt_spread,
    markdown_table,
    render_section,
)
from fl_app.privacy.accounting import epsilon  # noqa: E402
from fl_app.privacy.history import AccountantName, DpSgdEvent, PrivacyHistory  # noqa: E402


# ------------------------------------------------------------------------ tables
def test_markdown_table_aligns_numbers_right_and_escapes_pipes() -> None:
    table = markdown_table(["name", "s"], [["a|b", "1.5"], ["c", "2.0x [1-3]"]])
    lines = table.splitlines()
    assert lines[0] == "| name | s |"
    assert lines[1] == "|---|---:|"
    assert lines[2] == "| a\\|b | 1.5 |"
    assert len(lines) == 4


def test_section_rejects_rows_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"rows\[1\]: expected 2 cells"):
        Section(title="t", columns=["a", "b"], rows=[["1", "2"], ["3"]])


def test_section_round_trips_through_json_and_renders_notes_and_errors() -> None:
    section = Section(
        title="T", columns=["a"], rows=[["1"]], notes=["bounded by X"], data={"k": [1.0]}
    )
    section.wall_s, section.other_cpu_pct = 12.3, 4.0
    again = Section.from_json(section.to_json())
    assert again == section
    text = render_section(again)
    assert text.startswith("## T")
    assert "section wall time 12 s" in text and "4 %" in text
    assert "- bounded by X" in text
    failed = render_section(Section.failed("x", "X", "timed out after 5 s"))
    assert "incomplete: timed out after 5 s" in failed
    assert "| timed out after 5 s |" in failed


def test_fmt_spread_gives_median_and_range() -> None:
    assert fmt_spread([3.0, 1.0, 2.0], 1, "x") == "2.0x [1.0-3.0]"
    assert fmt_spread([2.0]) == "2.00"
    assert fmt_spread([]) == "n/a"


def test_splice_replaces_only_the_marked_block() -> None:
    doc = f"# Title\n\nintro\n{runner.BEGIN_MARKER}\nold\n{runner.END_MARKER}\n\nkept\n"
    out = runner.splice(doc, "new table\n")
    assert (
        out == f"# Title\n\nintro\n{runner.BEGIN_MARKER}\nnew table\n{runner.END_MARKER}\n\nkept\n"
    )
    assert runner.splice("no markers", "x") is None


def test_every_section_module_exists_and_exposes_run() -> None:
    for name in runner.SECTIONS:
        assert (_REPO / "benchmarks" / f"{name}.py").is_file(), name
        assert name in runner.ESTIMATE_S
    # Light modules only (the others import torch/flwr inside run or at import).
    for name in ("distributed_dp", "accounting"):
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(module.run)


def test_distributed_dp_section_measures_both_protocols() -> None:
    from benchmarks.distributed_dp import run

    section = run(quick=True)
    assert len(section.rows) == 1 and len(section.rows[0]) == len(section.columns)
    secagg_bytes, ddp_bytes = (float(v.replace(",", "")) for v in section.rows[0][-1].split(" / "))
    # 100k parameters: 32-bit fixed point (+4 extras) vs 16 bits of the 131,072 rotated
    # coordinates, plus the same key-exchange payloads.
    assert ddp_bytes - 2 * 131_072 == pytest.approx(secagg_bytes - 4 * 100_004, abs=200)


# ------------------------------------------------------------------------ runner
class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_executor(
    clock: _FakeClock, cost: dict[str, float], calls: list[tuple[str, float, float]]
):
    def execute(name: str, quick: bool, soft_s: float, hard_s: float) -> Section:
        calls.append((name, soft_s, hard_s))
        spent = cost.get(name, 1.0)
        if spent > hard_s:
            clock.now += hard_s
            return Section.failed(name, name, f"timed out after {hard_s:.0f} s (killed)")
        clock.now += spent
        return Section(title=name, columns=["x"], rows=[["1"]])

    return execute


def test_runner_reports_every_section_and_skips_when_the_budget_is_spent() -> None:
    clock = _FakeClock()
    calls: list[tuple[str, float, float]] = []
    names = list(runner.SECTIONS)
    cost = {"dpsgd": 50.0, "secagg": 1000.0}  # secagg overruns and is killed
    outcome = runner.run_sections(
        names,
        quick=False,
        budget_s=300.0,
        execute=_fake_executor(clock, cost, calls),
        clock=clock,
        log=lambda _: None,
    )
    assert [s.name for s in outcome.sections] == names
    by_name = {s.name: s for s in outcome.sections}
    assert by_name["dpsgd"].error is None
    assert by_name["secagg"].error is not None and "timed out" in by_name["secagg"].error
    for later in names[2:]:
        assert by_name[later].error is not None and "skipped" in by_name[later].error
    # Never past the budget: the hard limit is what is left minus the clean-up margin.
    assert outcome.total_s <= 300.0
    assert [c[0] for c in calls] == ["dpsgd", "secagg"]
    # The soft deadline leaves the later sections their typical time.
    _, soft, hard = calls[0]
    later = sum(runner.ESTIMATE_S[n][1] for n in names[1:])
    assert soft == pytest.approx(hard - later) or soft == runner.ESTIMATE_S["dpsgd"][1]
    assert hard <= 300.0
    doc = runner.render_document(outcome, {"commit": "abc"}, quick=False, command="x")
    for name in names:
        assert f"| {name} |" in doc


def test_runner_refuses_unknown_sections_and_bad_budgets() -> None:
    with pytest.raises(ValueError, match="unknown section"):
        runner.run_sections(["nope"], quick=True, budget_s=10.0)
    with pytest.raises(ValueError, match="budget_s"):
        runner.run_sections(["accounting"], quick=True, budget_s=0.0)


def test_a_section_runs_end_to_end_in_a_child_process() -> None:
    section = runner.execute_in_child("accounting", True, 120.0, 120.0)
    assert section.error is None, section.error
    assert section.name == "accounting"
    assert section.rows


# ----------------------------------------------------------- accounting agreement
@pytest.mark.parametrize("accountant", [AccountantName.pld, AccountantName.prv])
def test_fl_app_epsilon_for_10000_steps_is_within_1_percent_of_dp_accounting_pld(
    accountant: AccountantName,
) -> None:
    setting = SETTINGS[0]
    assert setting.steps == 10_000
    history = PrivacyHistory(
        (DpSgdEvent(setting.noise_multiplier, setting.sample_rate, setting.steps),)
    )
    ours = epsilon(history, setting.delta, accountant)
    reference = reference_pld_epsilon(setting)
    assert abs(ours - reference) / reference < 0.01
    # PRV and PLD both report upper bounds on the same ε; RDP is a looser bound.
    assert epsilon(history, setting.delta, AccountantName.rdp) >= reference


# -------------------------------------------------------------- legacy baseline
def test_legacy_secaggplus_baseline_aggregates_what_plain_fedavg_aggregates() -> None:
    from benchmarks.legacy_secaggplus import legacy_rounds

    plain = legacy_rounds(10, 1_000, secure=False, rounds=1)
    secure = legacy_rounds(10, 1_000, secure=True, rounds=1)
    assert secure["num_shares"] > secure["threshold"] >= 2
    assert len(secure["round"]) == 1 and secure["round"][0] > 0
    assert np.abs(plain["model"]).max() > 0  # the fixed updates were really aggregated
    # Flower's stochastic quantization (2^22 levels over ±8) bounds the difference.
    assert np.abs(secure["model"] - plain["model"]).max() < 1e-4


def test_simulation_section_states_the_1000_client_goal_and_memory_per_n() -> None:
    from benchmarks.simulation import build_section

    def setting(n: int, round_s: float, rss: float) -> dict[str, object]:
        return {
            "backend": "inprocess",
            "clients": n,
            "startup_s": 5.0,
            "round_s": [round_s * 2, round_s, round_s],
            "peak_rss_mb": rss,
            "session_peak_pss_mb": rss,
            "session_peak_processes": 1,
            "accuracy": 0.5,
            "other_cpu_pct": 3.0,
        }

    results = [
        setting(10, 0.2, 600.0),
        setting(1000, 4.0, 650.0),
        {"backend": "ray", "clients": 10, "error": "timed out after 30s (dropped)"},
    ]
    section = build_section(results, 3, ["ray at 1000 clients (needs ~150 s, 60 s left)"])
    assert len(section.rows) == 3
    assert section.rows[2][2].startswith("error: timed out")
    assert any("4.00 s a round, met" in note for note in section.notes)
    assert any("600 / 650 MB" in note and "+50 MB" in note for note in section.notes)
    assert any(note.startswith("Not run (time budget): ray at 1000") for note in section.notes)


def test_gpu_section_says_skipped_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    section = gpu.run(quick=False)
    assert section.rows == [["skipped: no GPU (torch sees no CUDA device)"]]
    assert "scripts/gpu_check.sh" in render_section(section)
    assert list(runner.SECTIONS)[-1] == "gpu"  # last: its minutes never squeeze the others


def test_resnet18_for_32x32_has_resnet18s_parameter_count_and_trains_under_opacus() -> None:
    from benchmarks.resnet import resnet18_32
    from fl_app.models import count_parameters, opacus_incompatibilities

    model = resnet18_32()
    # torchvision's resnet18 has 11,689,512 parameters; the 3x3 stem saves 64*3*(49-9) =
    # 7,680 and 10 classes instead of 1,000 save 990*513 = 507,870 (BatchNorm and
    # GroupNorm both hold a weight and a bias per channel): 11,173,962.
    assert count_parameters(model) == 11_173_962
    assert opacus_incompatibilities(model) == []
