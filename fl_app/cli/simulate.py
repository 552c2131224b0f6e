"""``fl-app simulate`` and ``fl-app config``: run (or sweep, or dry-run) an experiment
from Hydra overrides, and print the composed config.

``fl-app simulate [hydra overrides...]``  run an experiment (Hydra main; ``-m`` sweeps)
``fl-app simulate --dry-run [...]``       validate and print the privacy projection only
``fl-app config [hydra overrides...]``    print the composed, validated config
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_app.config.plan import RunPlan

__all__ = [
    "JobFailed",
    "RecordLevelProjection",
    "check_record_level_budget",
    "over_budget",
    "print_config",
    "privacy_plan",
    "record_level_projection",
    "simulate_main",
]

_DRY_RUN = False
# The plan preflight resolved for a single run, reused by its Hydra job (same process).
_PREFLIGHT: RunPlan | None = None


def privacy_plan(plan: RunPlan, projection: RecordLevelProjection | None = None) -> list[str]:
    """Human lines describing what ``plan`` will spend, before anything trains
    (``projection``: :func:`record_level_projection`'s, for DP-SGD)."""
    from strategies.dp_projection import projection_lines

    cfg = plan.cfg
    lines = plan.guarantee.lines()
    if plan.client_dp is not None:
        lines += projection_lines(plan.client_dp)
    if cfg.privacy.record_level:
        d = cfg.privacy.dpsgd
        target = (
            f"z={d.noise_multiplier:g}"
            if d.noise_multiplier is not None
            else f"calibrated to epsilon={d.target_epsilon:g}"
        )
        budget = f", budget max_epsilon={d.max_epsilon:g}" if d.max_epsilon is not None else ""
        lines.append(
            f"record-level DP-SGD in every client ({target}, C={d.max_grad_norm:g}, "
            f"delta={d.delta:g}{budget}): each client projects its own epsilon before each round"
        )
        if projection is not None:
            lo, hi = min(projection.train_sizes), max(projection.train_sizes)
            verdict = ""
            if d.max_epsilon is not None:
                if projection.first_round_epsilon > d.max_epsilon:
                    verdict = "; round 1 alone exceeds the budget: refused"
                elif projection.planned_epsilon > d.max_epsilon:
                    verdict = "; the budget runs out before the last round (clients stop then)"
                else:
                    verdict = "; within the budget"
            lines.append(
                f"record-level projection ({len(projection.train_sizes)} institutions, "
                f"{lo}..{hi} training records): largest epsilon "
                f"{projection.first_round_epsilon:.3f} after round 1, "
                f"{projection.planned_epsilon:.3f} after {cfg.num_rounds} planned rounds"
                f"{verdict}"
            )
    # No "nothing to project" line: the guarantee's lines always say it
    # ("epsilon per party: none (no differential privacy)").
    return lines


@dataclass(frozen=True)
class RecordLevelProjection:
    """What DP-SGD will spend in each simulated institution, computed before round 1.

    Each client accounts its own ε (its training-set size fixes the Poisson rate ``q``
    and the steps per round, exactly as :func:`fl_app.privacy.dpsgd.planned_steps`
    gives them to Opacus); this is the same arithmetic done by the server for every
    partition of the simulated federation, so a budget that round 1 alone exceeds is
    refused before anything trains instead of by every client in round 1.
    """

    train_sizes: tuple[int, ...]
    noise_multiplier: float
    first_round_epsilon: float  # the largest over institutions
    planned_epsilon: float  # after every planned round, the largest over institutions


def record_level_projection(cfg: Any) -> RecordLevelProjection | None:
    """Per-institution record-level ε of ``cfg`` (``None`` when it cannot be projected:
    no DP-SGD, a noise multiplier calibrated by each client to ``target_epsilon``, or
    data the server cannot size, whose clients then say why themselves)."""
    from fl_app.data import DataError, partition_sizes
    from fl_app.data.partition import train_val_split
    from fl_app.privacy.dpsgd_plan import project_sizes

    d = cfg.privacy.dpsgd
    if not cfg.privacy.record_level or d.noise_multiplier is None:
        return None
    try:
        pools = partition_sizes(cfg.dataset, cfg.seed)
    except (DataError, OSError):
        return None
    sizes = tuple(
        len(train_val_split(n, cfg.dataset.val_fraction, cfg.seed, pid)[0])
        for pid, n in enumerate(pools)
    )
    z = float(d.noise_multiplier)
    first, planned = project_sizes(
        sizes,
        noise_multiplier=z,
        batch_size=cfg.train.batch_size,
        local_epochs=cfg.train.local_epochs,
        num_rounds=cfg.num_rounds,
        delta=d.delta,
        accountant=d.accountant.value,
    )
    return RecordLevelProjection(sizes, z, first, planned)


def check_record_level_budget(cfg: Any, projection: RecordLevelProjection | None) -> None:
    """Raise :class:`~fl_app.config.validate.ConfigError` when round 1 alone would take
    some institution past ``privacy.dpsgd.max_epsilon`` (every client would refuse it)."""
    from fl_app.config.errors import ConfigError

    d = cfg.privacy.dpsgd
    if projection is None or d.max_epsilon is None:
        return
    if projection.first_round_epsilon > d.max_epsilon:
        raise ConfigError(
            "privacy.dpsgd.max_epsilon",
            d.max_epsilon,
            f"round 1 alone takes the largest institution to record-level epsilon "
            f"{projection.first_round_epsilon:.3g} (z={projection.noise_multiplier:g}, "
            f"delta={d.delta:g}, {d.accountant.value}), so every client would refuse to "
            "train; raise privacy.dpsgd.noise_multiplier, lower train.local_epochs, or "
            "raise privacy.dpsgd.max_epsilon",
        )


def over_budget(plan: RunPlan) -> str | None:
    """Why the planned rounds would exceed ``privacy.max_epsilon``, or ``None``."""
    from strategies.dp_projection import rounds_within_budget, server_budget_refusal

    settings = plan.client_dp
    if settings is None or settings.max_epsilon is None:
        return None
    if settings.distributed is not None:
        # privacy.threat_model=distributed_dp: the budget (and the guard) is against the
        # server, which knows the cohorts; the outsider figure would pass such jobs.
        return server_budget_refusal(settings)
    k = rounds_within_budget(settings)
    if k >= settings.num_rounds:
        return None
    if k == 0:
        return (
            f"round 1 alone exceeds privacy.max_epsilon={settings.max_epsilon:g}; raise the "
            "noise (privacy.noise_multiplier) or the budget"
        )
    return (
        f"its {settings.num_rounds} planned rounds exceed privacy.max_epsilon="
        f"{settings.max_epsilon:g} after round {k}; lower num_rounds, raise the noise or the budget"
    )


class JobFailed(Exception):
    """A sweep job failed or was refused.

    Raised (not ``SystemExit``) inside a Hydra multirun so the launcher records the job
    as failed, runs the sweep's other jobs, and the multirun exits non-zero at the end.
    """


def _write_refusal(run_dir: Any, cfg: Any, reason: str) -> None:
    """Leave a refused job's verdict in its directory, for ``fl-app report``."""
    import json
    from pathlib import Path

    from fl_app.server.layout import RUN_MANIFEST_FILE, SUMMARY_FILE
    from fl_app.server.rundir import STATUS_REFUSED

    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    verdict = {
        "status": STATUS_REFUSED,
        "status_reason": reason,
        "experiment_name": cfg.experiment_name,
        "rounds": 0,
        "rounds_planned": cfg.num_rounds,
    }
    for name in (SUMMARY_FILE, RUN_MANIFEST_FILE):
        (path / name).write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n")


def _job_failed(message: str) -> None:
    """End this job with a non-zero exit: at once for a single run, at the sweep's end in
    a multirun (the other jobs still run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    print(f"fl-app: {message}", file=sys.stderr, flush=True)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(message)
    raise SystemExit(1)


def _config_failed(reason: str) -> None:
    """End a job whose config (or local data) is unusable: exit 2 for a single run (the
    pre-flight check normally catches it before Hydra makes a directory); in a sweep,
    mark the job's directory failed with the reason, for ``fl-app report``, and let the
    other jobs run (the multirun exits non-zero at the end). Never returns."""
    import json
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fl_app.server.layout import RUN_MANIFEST_FILE, SUMMARY_FILE
    from fl_app.server.rundir import STATUS_FAILED

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        print(f"fl-app: {reason}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    if not _DRY_RUN:
        job = Path(HydraConfig.get().runtime.output_dir)
        job.mkdir(parents=True, exist_ok=True)
        verdict = {"status": STATUS_FAILED, "status_reason": reason, "rounds": 0}
        for name in (SUMMARY_FILE, RUN_MANIFEST_FILE):
            (job / name).write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n")
    _job_failed(f"job {HydraConfig.get().job.num} failed: {reason}")


def _print_plan(plan: RunPlan) -> RecordLevelProjection | None:
    """Print a job's plan (always in a dry run; with DP-SGD before it trains)."""
    projection = record_level_projection(plan.cfg)
    if _DRY_RUN or projection is not None:
        print(f"[{'dry run' if _DRY_RUN else 'plan'}] {plan.cfg.experiment_name}:")
        for line in privacy_plan(plan, projection):
            print(f"  {line}", flush=True)
    return projection


def _plan_of(raw: Any) -> RunPlan:
    """The job's plan: preflight's when the job runs the config preflight checked (a
    single run), else resolved here (a sweep's job): one resolve per run either way."""
    from fl_app.config.compose import to_typed_config
    from fl_app.config.plan import resolve

    cfg = to_typed_config(raw)
    if _PREFLIGHT is not None and _PREFLIGHT.cfg == cfg:
        return _PREFLIGHT
    return resolve(cfg)


def _simulate_task(raw: Any) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from fl_app.config.errors import ConfigError
    from fl_app.data.errors import DataError
    from fl_app.runtime.simulation import run_simulation_experiment
    from fl_app.server.checkpoint import CheckpointError
    from fl_app.server.resume import check_resume

    try:
        plan = _plan_of(raw)
        cfg = plan.cfg
        if cfg.resume is not None:
            check_resume(cfg)
        projection = _print_plan(plan)
    except ConfigError as err:
        _config_failed(str(err))
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if cfg.resume is None:
        try:
            check_record_level_budget(cfg, projection)
        except ConfigError as err:
            if not multirun:
                print(f"fl-app: {err}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            # One sweep job's impossible budget must not stop the others.
            if not _DRY_RUN:
                _write_refusal(HydraConfig.get().runtime.output_dir, cfg, str(err))
            _job_failed(f"job {HydraConfig.get().job.num} refused: {err}")
    if _DRY_RUN:
        return None
    if multirun:
        refusal = over_budget(plan)
        if refusal:
            # A sweep job that cannot finish its planned rounds within the budget is
            # refused before it trains (a single run would stop early instead); its
            # directory says so and the multirun exits non-zero once the others ran.
            _write_refusal(HydraConfig.get().runtime.output_dir, cfg, refusal)
            _job_failed(f"job {HydraConfig.get().job.num} refused: {refusal}")
    run_dir = cfg.resume or HydraConfig.get().runtime.output_dir
    try:
        summary = run_simulation_experiment(plan, run_dir)
    except CheckpointError as err:
        print(f"fl-app: cannot resume: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (DataError, ConfigError) as err:
        # A local data file failed its check before round 1 (fl_app.data.sites), or a
        # sweep job's train.device / GPU share is not on this machine (fl_app.device).
        _config_failed(str(err))
    if summary.get("status") == "failed":
        _job_failed(
            f"run FAILED in {run_dir}: {summary.get('status_reason') or 'see its summary.json'}"
        )
    acc = summary.get("accuracy")
    return float(acc) if acc is not None else None


def _run_hydra(argv: list[str]) -> None:
    import hydra

    from fl_app.config.compose import config_dir, preflight, register_schemas
    from fl_app.config.errors import ConfigError
    from fl_app.data.errors import DataError

    global _PREFLIGHT
    _PREFLIGHT = None
    try:
        # Typos, bad values and bad local files end here, before Hydra makes a run dir.
        _PREFLIGHT = preflight(argv)
    except (ConfigError, DataError) as err:
        print(f"fl-app: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    register_schemas()
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if resume and not any(a.startswith("hydra.run.dir=") for a in argv):
        # A resumed run continues in its own directory; Hydra's record of this
        # invocation goes beside the original one instead of over it.
        argv = [
            *argv,
            f"hydra.run.dir={resume[-1]}",
            "hydra.output_subdir=.hydra/resume-${now:%Y-%m-%d_%H-%M-%S}",
        ]
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(
        _simulate_task
    )()


def _compose_or_exit(argv: list[str]) -> Any:
    """The validated config for ``argv``, or exit 2 naming the field to fix."""
    from fl_app.config.compose import compose_config
    from fl_app.config.errors import ConfigError

    try:
        return compose_config("config", argv)
    except ConfigError as err:
        print(f"fl-app: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def print_config(argv: list[str]) -> None:
    import yaml

    from fl_app.config.compose import config_to_dict, run_config_hash

    cfg = _compose_or_exit(argv)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    # The hash the run will record (summary.json config_hash): how-to-run keys excluded.
    print(f"# config hash: {run_config_hash(cfg)}")


def _dry_run(argv: list[str]) -> None:
    from fl_app.config.compose import compose_plan
    from fl_app.config.errors import ConfigError

    try:
        plan = compose_plan("config", argv)
    except ConfigError as err:
        print(f"fl-app: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg = plan.cfg
    projection = record_level_projection(cfg)
    print(f"[dry run] {cfg.experiment_name}: config valid, nothing trained")
    for line in privacy_plan(plan, projection):
        print(f"  {line}", flush=True)
    try:
        check_record_level_budget(cfg, projection)
    except ConfigError as err:
        print(f"fl-app: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def simulate_main(argv: list[str]) -> None:
    """``fl-app simulate [--dry-run] [hydra overrides...]``; exits through Hydra or
    ``SystemExit`` (2 for a config error)."""
    global _DRY_RUN
    # Set for this call only: a dry-run sweep must not leave a later in-process
    # call (tests, notebooks) printing projections instead of training.
    _DRY_RUN = False
    if "--dry-run" in argv:
        rest = [a for a in argv if a != "--dry-run"]
        if "-m" in rest or "--multirun" in rest:
            _DRY_RUN = True  # every job of the sweep prints its own projection
            try:
                _run_hydra(rest)
            finally:
                _DRY_RUN = False
        else:
            _dry_run(rest)
        return
    _run_hydra(argv)
