"""Every command block of README.md and docs/*.md runs, and does what its text says.

A fenced ``bash`` block (or a ``$ command`` transcript) is either run here or carries
an HTML comment right above it saying why not::

    <!-- example: skip: needs a deployment (several machines); run by tests/test_x.py::test_y -->

A skip reason that names a test must name one that exists. Every command of an
unmarked block must be an ``fl-app`` command; it runs with small round counts and the
in-process runtime appended (``_FAST``), and its documented outcome is asserted:
``_OUTCOMES`` maps each command, as written in the doc, to the check of what its
comment or the surrounding text promises; commands not listed must at least finish
with status ``completed`` and a model better than chance. Placeholders
(``outputs/...``, ``multirun/<date>/<time>``, ``<hex>``, ``<n>``) stand for the run
directories and audit-log head of the commands before them in the same file.

Single runs go through the same path as ``fl-app simulate`` (``preflight``, then
``run_simulation_experiment``) in this process, so Ray's and torch's start-up are paid
once; sweeps run as ``fl-app`` subprocesses, as a user would.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FL_APP = str(Path(sys.executable).with_name("fl-app"))

# Appended to every simulation: in-process clients, one round (a command's own
# outcome check may ask for more).
_FAST = ["runtime=inprocess", "num_rounds=1"]

_FENCE = re.compile(
    r"(?:<!--\s*example:\s*(?P<marker>.*?)\s*-->\s*\n)?^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```",
    re.M | re.S,
)


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    body: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


@dataclass
class Command:
    text: str  # as written, comment removed, whitespace collapsed
    argv: list[str]
    expected_output: list[str]  # transcript lines after a "$ command"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in _FENCE.finditer(text):
            found.append(
                Block(
                    doc=doc,
                    line=text[: m.start("lang")].count("\n") + 1,
                    lang=m.group("lang"),
                    body=m.group("body"),
                    marker=m.group("marker"),
                )
            )
    return found


def is_command_block(block: Block) -> bool:
    if block.lang in {"bash", "sh", "shell", "console"}:
        return True
    return block.lang == "" and block.body.lstrip().startswith("$ ")


def commands(block: Block) -> list[Command]:
    """The block's commands: continuations joined, comments dropped, transcripts split."""
    out: list[Command] = []
    lines = block.body.replace("\\\n", " ").splitlines()
    transcript = any(line.startswith("$ ") for line in lines)
    for line in lines:
        if transcript:
            if line.startswith("$ "):
                argv = shlex.split(line[2:], comments=True)
                out.append(Command(" ".join(argv), argv, []))
            elif line.strip() and out:
                out[-1].expected_output.append(line.strip())
            continue
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(Command(" ".join(argv), argv, []))
    return out


# ---- running ------------------------------------------------------------------------

# fl-app commands this test may run unmarked; anything else (a server, a deployment)
# must carry a skip marker, so a new example can fail fast but never hang CI.
_RUNNABLE = {
    ("simulate",),
    ("config",),
    ("audit", "verify"),
    ("export",),
    ("report",),
    ("audit-privacy",),
    ("deploy", "ca"),
    ("deploy", "server-cert"),
    ("deploy", "node-key"),
}


@dataclass
class Result:
    code: int
    output: str
    run_dir: Path | None = None
    summary: dict[str, Any] | None = None
    paths: dict[str, Path] | None = None


class Context:
    """What earlier commands of the same file left: run directories for placeholders."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.count = 0
        self.run: Path | None = None
        self.dp_run: Path | None = None
        self.sweep: Path | None = None
        self.dirs: dict[str, Path] = {}

    def fresh(self, name: str) -> Path:
        self.count += 1
        return self.tmp / f"{self.count:02d}-{name}"

    def substitute(self, argv: list[str]) -> tuple[list[str], dict[str, Path]]:
        out, paths = [], {}
        for arg in argv:
            if arg.startswith("multirun/"):
                assert self.sweep is not None, f"{arg}: no sweep ran before this command"
                arg = str(self.sweep)
            elif arg.startswith("outputs/"):
                run = self.dp_run or self.run
                assert run is not None, f"{arg}: no run ran before this command"
                arg = str(run / "audit.jsonl") if arg.endswith(".jsonl") else str(run)
            elif arg in {"<hex>", "<n>"}:
                run = self.dp_run or self.run
                assert run is not None, f"{arg}: no run ran before this command"
                audit = json.loads((run / "summary.json").read_text())["audit"]
                arg = str(audit["head"] if arg == "<hex>" else audit["seq"])
            elif arg.endswith("/") and not arg.startswith("/"):
                # A relative output folder (release/, pki/): one fresh folder per name.
                if arg not in self.dirs:
                    self.dirs[arg] = self.fresh(arg.strip("/").replace("/", "-"))
                paths[arg] = self.dirs[arg]
                arg = str(self.dirs[arg])
            out.append(arg)
        return out, paths


def _in_process(argv: list[str]) -> Result:
    """``fl_app.cli.main`` in this process (commands that never start ``@hydra.main``)."""
    from fl_app.cli import main

    buffer = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return Result(code, buffer.getvalue())


def _simulate(args: list[str], ctx: Context) -> Result:
    """A single ``fl-app simulate`` run, as the CLI does it, without Hydra's run dir."""
    from fl_app.config.compose import preflight
    from fl_app.config.errors import ConfigError
    from fl_app.data import DataError
    from fl_app.runtime.simulation import run_simulation_experiment

    try:
        cfg = preflight(args)
    except (ConfigError, DataError) as err:
        return Result(2, f"fl-app: {err}")
    assert cfg is not None
    run_dir = ctx.fresh("run")
    summary = run_simulation_experiment(cfg, run_dir)
    ctx.run = run_dir
    if summary.get("status") == "completed" and summary["privacy"].get("epsilon") is not None:
        ctx.dp_run = run_dir
    code = 0 if summary.get("status") in {"completed", "degraded"} else 1
    return Result(code, "", run_dir, summary)


def _subprocess(argv: list[str], cwd: Path) -> Result:
    done = subprocess.run([FL_APP, *argv], capture_output=True, text=True, timeout=600, cwd=cwd)
    return Result(done.returncode, done.stdout + done.stderr)


def run_command(cmd: Command, ctx: Context, extra: list[str]) -> Result:
    argv, paths = ctx.substitute(cmd.argv)
    assert argv[0] == "fl-app", "only fl-app commands run unmarked; mark the block"
    sub, args = argv[1], argv[2:]
    assert (sub,) in _RUNNABLE or (sub, *args[:1]) in _RUNNABLE, (
        "this command cannot run in a test: mark its block <!-- example: skip: why -->"
    )
    if sub == "simulate" and ("-m" in args or "--multirun" in args):
        sweep = ctx.fresh("sweep")
        fast = [] if "--dry-run" in args else _FAST
        result = _subprocess(
            ["simulate", *args, *fast, *extra, f"hydra.sweep.dir={sweep}"], ctx.tmp
        )
        ctx.sweep = sweep
        result.run_dir = sweep
        return result
    if sub == "simulate" and "--dry-run" not in args and not cmd.expected_output:
        return _simulate([*args, *_FAST, *extra], ctx)
    result = _in_process([sub, *args, *extra])
    result.paths = paths
    return result


# ---- documented outcomes ------------------------------------------------------------


@dataclass
class Outcome:
    """How one documented command is checked: extra overrides, then ``check``.

    ``covered_by`` names the test that already runs this very command (same
    overrides, checked more closely); the command is then not run twice.
    """

    check: Callable[[Result], None] | None = None
    extra: tuple[str, ...] = ()
    covered_by: str | None = None


def _ok(result: Result) -> None:
    assert result.code == 0, result.output[-3000:]


def _summary(result: Result) -> dict[str, Any]:
    _ok(result)
    assert result.summary is not None
    return result.summary


def _config(result: Result) -> dict[str, Any]:
    import yaml

    assert result.run_dir is not None
    loaded = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _accuracy(s: dict[str, Any]) -> float:
    acc = s["accuracy"] if s["accuracy"] is not None else s["federated_eval_accuracy"]
    assert acc is not None, s
    return float(acc)


# The test cross-entropy of the uniform predictor (the initial model's is 2.308). DP
# noise is drawn from the OS CSPRNG (privacy.secure_mode=true, the default), so a DP
# run's numbers differ every run: a floor must sit many standard deviations from the
# range measured over repeated runs (noted beside each check). After a round or two,
# test loss below ln 10 ("learned something") often does where accuracy above chance
# does not: accuracy is an argmax, it sits at ~0.1 until the model separates classes.
CHANCE_LOSS = math.log(10)


def completed(min_accuracy: float, max_loss: float = math.inf) -> Callable[[Result], None]:
    """Status completed, every planned round run, a model better than ``min_accuracy``,
    a finite test loss below ``max_loss``."""

    def check(result: Result) -> None:
        s = _summary(result)
        assert s["status"] == "completed" and s["rounds"] == s["rounds_planned"], s
        assert _accuracy(s) >= min_accuracy, f"accuracy {_accuracy(s):.3f}: garbage"
        if max_loss < math.inf:
            assert math.isfinite(s["loss"]) and s["loss"] < max_loss, f"loss {s['loss']}: garbage"

    return check


def client_dp(
    min_accuracy: float, max_epsilon: float, max_loss: float = math.inf, **config: float
) -> Callable[[Result], None]:
    """Completed with client-level ε reported and at most ``max_epsilon``; config values."""

    def check(result: Result) -> None:
        completed(min_accuracy, max_loss)(result)
        eps = _summary(result)["privacy"]["epsilon"]
        assert eps is not None and 0 < eps <= max_epsilon, eps
        privacy = _config(result)["privacy"]
        for key, value in config.items():
            assert privacy[key] == pytest.approx(value), (key, privacy[key])

    return check


def _central_defaults(result: Result) -> None:
    # "z = 1, C = 1, delta = 1e-5"; 10 clients and z*C/10 noise on the mean: far from
    # the no-DP 0.95, but well above chance (0.1) after the README's 5 rounds. Measured
    # over 15 CSPRNG runs: accuracy 0.43-0.71 (mean 0.62, sd 0.076; the floor is 5.5 sd
    # below), loss 1.01-1.56 (mean 1.18, sd 0.14; ln 10 is 8 sd above): false failure
    # < 2e-8 if Gaussian. (After 2 rounds accuracy was 0.11-0.52 and a 0.2 floor
    # failed 2 runs in 20.)
    client_dp(0.2, 20.0, CHANCE_LOSS, noise_multiplier=1.0, clip=1.0, delta=1e-5)(result)
    _epsilon_is_independent_pld(result, q=1.0, z=1.0, rounds=5)


def _epsilon_is_independent_pld(result: Result, q: float, z: float, rounds: int) -> None:
    """ε equals dp-accounting's PLD accountant (not the code under test) over ``rounds``
    Gaussian releases at ``z``, Poisson-subsampled at rate ``q`` (1: everyone), δ 1e-5."""
    import dp_accounting as dpa
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    event: dpa.DpEvent = dpa.GaussianDpEvent(z)
    if q < 1.0:
        event = dpa.PoissonSampledDpEvent(q, event)
    want = PLDAccountant().compose(dpa.SelfComposedDpEvent(event, rounds)).get_epsilon(1e-5)
    eps = _summary(result)["privacy"]["epsilon"]
    assert eps == pytest.approx(want, rel=1e-4), (eps, want)


def _thousand_clients(result: Result) -> None:
    # "1,000 clients, 50 a round" (Poisson sampling, rate 0.05, what ε accounts). A few
    # rounds move the model a little. Over CSPRNG runs, after 1 round (20 runs): accuracy
    # 0.10-0.26, loss 2.275-2.298 (ln 10 only 2.9 sd above the mean); after 3 (12 runs):
    # accuracy 0.10-0.30 (a floor at chance, 0.1, is 2.2 sd below), loss 2.224-2.253
    # (mean 2.240, sd 0.0099; ln 10 is 6.3 sd above, the untrained model's 2.308 is
    # above ln 10): false failure ~2e-10 if Gaussian (3e-5 at the sd's 95 % upper bound).
    client_dp(0.0, 10.0, CHANCE_LOSS)(result)
    _epsilon_is_independent_pld(result, q=0.05, z=1.0, rounds=3)
    cfg = _config(result)
    assert cfg["dataset"]["num_partitions"] == 1000
    assert (cfg["strategy"]["sampling"], cfg["strategy"]["fraction_train"]) == ("poisson", 0.05)


def _target_epsilon(eps: float) -> Callable[[Result], None]:
    # z is calibrated so the planned rounds end at the target: within 2 % below it. No
    # accuracy floor: the whole budget in a few rounds leaves the model noise-dominated.
    def check(result: Result) -> None:
        client_dp(0.0, eps)(result)
        assert _summary(result)["privacy"]["epsilon"] >= 0.98 * eps
        assert math.isfinite(_summary(result)["loss"]), _summary(result)

    return check


def _budget_stop_after_4(result: Result) -> None:
    # "stops after round 4": round 5 would pass the client-level budget of 5. Not a draw:
    # ε accounts the sampling rate, not the keyed cohorts, and an empty cohort still
    # releases noise (tests/test_privacy_branches.py); 6 of 6 CSPRNG runs stopped there.
    s = _summary(result)
    assert s["status"] == "completed" and s["rounds"] == 4 and s["rounds_planned"] == 5, s
    assert "before round 5" in s["stopped_early"] and "max_epsilon=5" in s["stopped_early"]
    assert s["privacy"]["epsilon"] <= 5.0


def _local_dp_chance(result: Result) -> None:
    # Documented failure mode: with 10 clients each adding N(0, (5C)^2) to its own
    # update the noise swamps the signal and the model stays at chance; the budget holds.
    # Over 20 CSPRNG runs accuracy was 0.02-0.17 (mean 0.10, sd 0.043: 0.3 is 4.6 sd
    # above, false failure ~2e-6 if Gaussian) and test loss 100-240: the ceiling stays.
    client_dp(0.0, 10.0)(result)
    assert _accuracy(_summary(result)) < 0.3


def _dpsgd_defaults(result: Result) -> None:
    # "z = 1.0, C = 1.0, delta = 1e-5": record-level ε per institution, no client-level ε.
    # One round of DP-SGD (keystream noise and batches, unseeded): over 25 runs accuracy
    # was 0.24-0.56 (a 0.2 floor is 2.3 sd below the mean), test loss 1.99-2.12 (mean
    # 2.04, sd 0.03; ln 10 is > 8 sd above): false failure < 1e-15 if Gaussian.
    s = _summary(result)
    completed(0.0, CHANCE_LOSS)(result)
    assert s["privacy"]["epsilon"] is None and s["privacy"]["record_level_epsilon_max"] > 0
    d = _config(result)["privacy"]["dpsgd"]
    assert (d["noise_multiplier"], d["max_grad_norm"], d["delta"]) == (1.0, 1.0, 1e-5)


def _dpsgd_budget_stop(result: Result) -> None:
    # "each institution's budget: stops after round 2": two rounds update the model,
    # then every client refuses (its next round would pass 6) and the run ends early.
    s = _summary(result)
    assert s["status"] in {"completed", "degraded"} and s["rounds_planned"] == 5, s
    assert s["rounds_model_updated"] == 2 and s["rounds"] < 5, s
    assert s["privacy"]["record_level_epsilon_max"] <= 6.0


def _dry_run(result: Result) -> None:
    _ok(result)
    assert "[dry run]" in result.output and "projection" in result.output, result.output


def _sweep_dry_run(result: Result) -> None:
    _ok(result)
    assert result.output.count("[dry run]") == 3, result.output[-3000:]
    assert result.run_dir is not None and not list(result.run_dir.glob("*/summary.json"))


def _joblib_sweep(result: Result) -> None:
    _ok(result)
    assert result.run_dir is not None
    summaries = [json.loads(p.read_text()) for p in result.run_dir.glob("*/summary.json")]
    assert len(summaries) == 3 and all(s["status"] == "completed" for s in summaries)
    assert len({s["privacy"]["epsilon"] for s in summaries}) == 3  # one per z


def _config_printed(result: Result) -> None:
    _ok(result)
    assert "name: fedprox" in result.output and "# config hash: " in result.output


def _audit_verified(result: Result) -> None:
    _ok(result)


def _exported(result: Result) -> None:
    _ok(result)
    assert result.paths is not None
    (out,) = result.paths.values()
    assert (out / "model.safetensors").is_file(), sorted(out.iterdir())


def _report(result: Result) -> None:
    _ok(result)
    assert result.output.count("| central |") == 3, result.output
    for name in ("report.csv", "report.md", "accuracy_vs_epsilon.png", "accuracy_vs_rounds.png"):
        assert f"wrote {name}" in result.output or name in result.output


def _audit_privacy(result: Result) -> None:
    _ok(result)
    assert "privacy_audit" in result.output, result.output[-2000:]


def _files_written(*names: str) -> Callable[[Result], None]:
    def check(result: Result) -> None:
        _ok(result)
        assert result.paths is not None
        written = {p.name for d in result.paths.values() for p in d.iterdir()}
        assert set(names) <= written, written

    return check


# Each command as written in the docs -> how it runs and what it must give. The values
# come from the text beside the command (its comment, the paragraph after it).
_OUTCOMES: dict[str, Outcome] = {
    # README: quick examples (no DP: a sensible model in the configured rounds).
    "fl-app simulate": Outcome(completed(0.75), ("num_rounds=2",)),
    "fl-app simulate dataset.partitioner=dirichlet": Outcome(completed(0.6), ("num_rounds=2",)),
    "fl-app simulate strategy=fedadam num_rounds=10": Outcome(completed(0.75), ("num_rounds=10",)),
    "fl-app simulate experiment=digits_dirichlet": Outcome(completed(0.6), ("num_rounds=2",)),
    "fl-app simulate runtime=inprocess": Outcome(completed(0.75), ("num_rounds=2",)),
    "fl-app simulate -m strategy=fedavg,fedadam seed=1,2": Outcome(
        covered_by="tests/test_e2e.py::test_hydra_multirun_sweeps_strategies"
    ),
    "fl-app config strategy=fedprox": Outcome(_config_printed),
    # README: client-level DP.
    "fl-app simulate privacy=central": Outcome(_central_defaults, ("num_rounds=5",)),
    "fl-app simulate experiment=digits_1000_clients_dp": Outcome(
        _thousand_clients, ("num_rounds=3",)
    ),
    "fl-app simulate --dry-run experiment=digits_1000_clients_dp": Outcome(_dry_run),
    # Calibration is what it shows (README: "mechanics, not utility"): the whole budget
    # of 3 over 3 rounds of 10 clients leaves accuracy at 0.11-0.29 and test loss at
    # 2.4-6.8 over 20 CSPRNG runs, so neither gets a floor; the epsilon is asserted.
    "fl-app simulate privacy=central privacy.noise_multiplier=null privacy.target_epsilon=3": (
        Outcome(_target_epsilon(3.0), ("num_rounds=3",))
    ),
    "fl-app simulate privacy=central strategy.sampling=poisson strategy.fraction_train=0.3 "
    "privacy.max_epsilon=5": Outcome(_budget_stop_after_4, ("num_rounds=5",)),
    # README: "mechanics, not utility" on 10 clients; only the accounting is asserted.
    "fl-app simulate privacy=central_adaptive": Outcome(client_dp(0.0, 20.0), ("num_rounds=2",)),
    "fl-app simulate privacy=local privacy.max_epsilon=10": Outcome(
        _local_dp_chance, ("num_rounds=2",)
    ),
    # README: record-level DP-SGD.
    "fl-app simulate privacy=dpsgd": Outcome(_dpsgd_defaults),
    "fl-app simulate experiment=digits_dpsgd_3sites": Outcome(
        covered_by="tests/test_dpsgd_app.py::test_utility_at_epsilon_8_within_8_points_of_non_private"
    ),
    "fl-app simulate privacy=dpsgd privacy.dpsgd.max_epsilon=6": Outcome(
        _dpsgd_budget_stop, ("num_rounds=5",)
    ),
    # README: secure aggregation and distributed DP.
    "fl-app simulate secagg=secaggplus secagg.clip=5": Outcome(completed(0.75), ("num_rounds=2",)),
    # Both with CSPRNG noise (distributed DP's shares are client-keyed whatever
    # secure_mode says), hence 5 rounds: after 2, accuracy was 0.18-0.45 over 20 runs
    # each and a floor at chance (0.1) only 2.3-4 sd below the mean. After 5 rounds
    # (15 runs each): client-side clipping, accuracy 0.49-0.73 (mean 0.63, sd 0.086:
    # the floor is 6 sd below), loss 0.98-1.41 (ln 10 is 8 sd above); distributed DP,
    # accuracy 0.41-0.67 (mean 0.54, sd 0.067: 6.5 sd), loss 1.11-1.50 (8 sd). False
    # failure < 1e-9 if Gaussian.
    "fl-app simulate secagg=secaggplus privacy=central privacy.threat_model=honest_but_curious "
    "privacy.clip_side=client": Outcome(client_dp(0.1, 20.0, CHANCE_LOSS), ("num_rounds=5",)),
    "fl-app simulate privacy=distributed secagg=secaggplus secagg.bits=16": Outcome(
        client_dp(0.1, 20.0, CHANCE_LOSS), ("num_rounds=5",)
    ),
    # One round, so z is calibrated to reach the target in it (with more rounds cut
    # short, the experiment's server-side budget of 10 would stop it after round 1).
    # The whole budget in one round of 50 clients is noise-dominated: test accuracy
    # measured 0.09-0.16 over runs (noise from the OS CSPRNG, so it differs each run),
    # so chance (0.1) is no floor to hold it to; the README promises the epsilon only.
    "fl-app simulate experiment=digits_1000_clients_ddp": Outcome(_target_epsilon(4.77)),
    "fl-app simulate privacy=distributed secagg=secaggplus --dry-run": Outcome(_dry_run),
    # README: audit log and release (on the last client-level DP run above).
    "fl-app audit verify outputs/.../audit.jsonl --head <hex> --seq <n>": Outcome(_audit_verified),
    "fl-app export outputs/... --tier public --out release/": Outcome(_exported),
    "fl-app export outputs/... --tier restricted --out release-internal/": Outcome(_exported),
    # README: sweeps and reports.
    "fl-app simulate -m privacy=central privacy.noise_multiplier=0.5,1,2 privacy.clip=0.5,1": (
        Outcome(covered_by="tests/test_report.py::test_report_collects_a_six_job_privacy_sweep")
    ),
    "fl-app simulate -m hydra/launcher=joblib hydra.launcher.n_jobs=2 privacy=central "
    "privacy.noise_multiplier=0.5,1,2": Outcome(_joblib_sweep),
    "fl-app simulate --dry-run -m privacy=central privacy.noise_multiplier=0.5,1,2": Outcome(
        _sweep_dry_run
    ),
    "fl-app report multirun/<date>/<time>": Outcome(_report),
    "fl-app audit-privacy outputs/<date>/<time>": Outcome(_audit_privacy),
    # docs/deployment.md: the coordinator's and a site's local set-up.
    "fl-app deploy ca --out pki/": Outcome(_files_written("ca.crt", "ca.key")),
    "fl-app deploy server-cert --ca-dir pki/ --out superlink/ --san superlink.example.org "
    "--san 203.0.113.10": Outcome(_files_written("server.pem", "server.key", "ca.crt")),
    "fl-app deploy node-key --out keys/ --name hospital-a": Outcome(
        _files_written("hospital-a", "hospital-a.pub")
    ),
}


def _outcome(cmd: Command) -> Outcome:
    if cmd.expected_output:
        return Outcome(lambda r: _transcript(r, cmd.expected_output))
    found = _OUTCOMES.get(cmd.text)
    assert found is not None, (
        f"`{cmd.text}` has no documented outcome in tests/test_readme_examples.py::_OUTCOMES: "
        "add what its text promises"
    )
    return found


def _transcript(result: Result, expected: list[str]) -> None:
    assert result.code != 0 or not any("error" in line for line in expected), result.output
    for line in expected:
        assert line in result.output, f"documented output {line!r} not in {result.output!r}"


# ---- the tests ----------------------------------------------------------------------


def test_skip_markers_name_a_reason_and_existing_tests() -> None:
    marked = [b for b in blocks() if b.marker is not None]
    assert marked
    for block in marked:
        kind, _, reason = block.marker.partition(":") if block.marker else ("", "", "")
        assert kind.strip() == "skip" and reason.strip(), f"{block.where}: bad marker"
        for ref in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", reason):
            path, _, name = ref.partition("::")
            assert (ROOT / path).is_file(), f"{block.where}: {path} does not exist"
            if name:
                assert f"def {name}(" in (ROOT / path).read_text(), f"{block.where}: {ref}"


def test_covered_commands_are_run_by_the_named_test() -> None:
    """A command left to another test must appear there with the same overrides."""
    for text, outcome in _OUTCOMES.items():
        if outcome.covered_by is None:
            continue
        path, _, name = outcome.covered_by.partition("::")
        source = (ROOT / path).read_text()
        body = source[source.index(f"def {name}(") :]
        body = body[: body.find("\ndef ", 1) if "\ndef " in body[1:] else len(body)]
        for arg in text.split()[2:]:
            if arg != "-m":
                assert f'"{arg}"' in body, f"{outcome.covered_by} does not run {arg!r}"


def test_every_unmarked_command_has_a_documented_outcome() -> None:
    """Fast guard: a new example without an outcome fails here, not after minutes."""
    for block in blocks():
        if not is_command_block(block) or block.marker is not None:
            continue
        for cmd in commands(block):
            assert cmd.argv[0] == "fl-app", f"{block.where}: `{cmd.text}`: mark the block"
            _outcome(cmd)


@pytest.mark.slow
def test_every_command_block_of_readme_and_docs(tmp_path: Path) -> None:
    ran: list[str] = []
    for doc in DOCS:
        ctx = Context(tmp_path / doc.stem)
        ctx.tmp.mkdir()
        for block in blocks():
            if block.doc != doc or not is_command_block(block) or block.marker is not None:
                continue
            for cmd in commands(block):
                outcome = _outcome(cmd)
                if outcome.covered_by is not None:
                    continue
                started = time.perf_counter()
                try:
                    result = run_command(cmd, ctx, list(outcome.extra))
                    assert outcome.check is not None
                    outcome.check(result)
                except AssertionError as err:
                    raise AssertionError(f"{block.where}: `{cmd.text}`: {err}") from err
                # Shown with -s (or on failure): where the test's minutes go.
                print(f"{time.perf_counter() - started:6.1f} s  {block.where}  {cmd.text}")
                ran.append(cmd.text)
    assert len(ran) >= 20
