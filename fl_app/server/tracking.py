"""Experiment tracking: a run's public numbers mirrored to MLflow and TensorBoard.

Off by default (``tracking.mlflow``, ``tracking.tensorboard``); when off, nothing here
imports either package (the sinks, :mod:`fl_app.server.tracking_sinks`, import them
when opened). :func:`open_tracker` opens the configured sinks after the run directory
is opened and before round 1, so a tracker that cannot be reached fails the run before
anything trains; :class:`RunTracker` is then a round listener wired after the run's
own files (docs/architecture.md, "Server"), and :meth:`RunTracker.finish` logs the
summary's numbers and the artifacts once ``summary.json`` is written. The MLflow run's
id and URI go to ``tracking.json``, where ``fl-app export`` finds the run to attach the
model card it builds later (:mod:`fl_app.release.tracking_card`).

What leaves the run directory (docs/tracking.md): the aggregate round scalars of
``metrics.jsonl`` under the restricted export's rule (:func:`round_scalars`: no
per-client entry, nothing keyed by a node, partition or site), the summary's numbers
outside its per-client blocks (:func:`summary_scalars`), a summary reduced the same
way with the salted config hash (:func:`public_summary`), the model file, and the
config as parameters without a seed that drew DP noise. The trackers see at most what
the run's operator already reads in its summary and the restricted export; a tracking
server is one more reader of those, never of a client's own numbers.

A multirun's jobs (Hydra ``-m``) share one MLflow experiment named after the sweep
directory, with a file store there by default; each job is one MLflow run tagged with
its overrides (:func:`tracking_scope`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fl_app.config.schema import AppConfig
from fl_app.server.layout import MLFLOW_DIR, TENSORBOARD_DIR, TRACKING_FILE
from fl_app.server.public_metrics import PER_CLIENT_FIELDS, key_names_a_client

if TYPE_CHECKING:
    from fl_app.server.rundir import RunDirectory

__all__ = [
    "HydraJob",
    "RunTracker",
    "TrackingScope",
    "hydra_job",
    "open_tracker",
    "public_summary",
    "round_scalars",
    "summary_scalars",
    "tracking_scope",
]

log = logging.getLogger("fl_app.server")

# Summary blocks keyed by node id or listing nodes (dropped whole).
_PER_CLIENT_BLOCKS = frozenset(
    {"per_client", "releases", "contested_site_identities", "clients_budget_exhausted"}
)
# The summary's words that become tags (the rest of its strings are prose).
_SUMMARY_TAGS = (
    ("status",),
    ("privacy", "mode"),
    ("privacy", "threat_model"),
    ("secure_aggregation",),
)


class _Report(Protocol):
    """What the tracker reads of a round (strategies.driver_types.RoundReport)."""

    server_round: int

    def to_record(self) -> dict[str, Any]: ...


def _names_a_client(key: str) -> bool:
    return key.isdigit() or key_names_a_client(key)


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record's aggregate scalars, as floats (booleans 0/1).

    Kept: numbers and booleans under keys naming no node, partition or site, never an
    integer equal to one of the record's node ids. Dropped: per-client fields, lists,
    objects, strings (a round's note can quote a protocol error) and nulls.
    """
    nodes = {str(n) for n in record.get("client_metrics") or {}}
    for name in ("rejections", "failures"):
        nodes.update(str(x.get("node")) for x in record.get(name) or [] if isinstance(x, dict))
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "round":  # the step itself
            continue
        if key in PER_CLIENT_FIELDS or _names_a_client(key) or any(n in key for n in nodes):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in nodes:
            continue
        if isinstance(value, (int, float)):  # booleans are ints: 0.0 or 1.0
            out[key] = float(value)
    return out


def _public_tree(value: Any) -> Any:
    """``value`` without per-client blocks and keys naming a client (recursively)."""
    if isinstance(value, Mapping):
        return {
            k: _public_tree(v)
            for k, v in value.items()
            if k not in _PER_CLIENT_BLOCKS and not _names_a_client(str(k))
        }
    return value


def public_summary(summary: Mapping[str, Any], published_hash: str | None) -> dict[str, Any]:
    """``summary.json`` reduced for a tracker: no per-client block, no key naming a
    client, and the salted config hash in place of the plain one (which would let a
    reader test guessed seeds against it)."""
    out = _public_tree(summary)
    out.pop("config_hash", None)
    out["config_hash_published"] = published_hash or "withheld"
    return dict(out)


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The public summary's numbers by dotted path (``accuracy``, ``privacy.epsilon``,
    ``bandwidth.upload_bytes_per_client_round``...); booleans, strings, lists, nulls
    and non-finite values left out."""
    out: dict[str, float] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and np.isfinite(value)
            ):
                out[f"{prefix}{key}"] = float(value)

    walk(_public_tree(summary), "")
    return out


def summary_tags(summary: Mapping[str, Any]) -> dict[str, str]:
    """The summary's status, privacy mode, threat model and secure aggregation."""
    tags: dict[str, str] = {}
    for path in _SUMMARY_TAGS:
        value: Any = summary
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            tags["fl_app." + ".".join(path)] = str(value)
    release = summary.get("release")
    if isinstance(release, Mapping) and "for_release" in release:
        tags["fl_app.for_release"] = str(bool(release["for_release"])).lower()
    return tags


# ---- where a run is tracked ----------------------------------------------------------


@dataclass(frozen=True)
class HydraJob:
    """What this process's Hydra job says about the run (a sweep's job, or not)."""

    multirun: bool
    sweep_dir: str
    num: int
    overrides: tuple[str, ...]


def hydra_job() -> HydraJob | None:
    """This process's Hydra job, or None outside Hydra (``flwr run``, the API)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return HydraJob(
        multirun=multirun,
        sweep_dir=str(hc.sweep.dir) if multirun else "",
        num=int(hc.job.num) if multirun else 0,  # a single run has no job number
        overrides=tuple(str(o) for o in hc.overrides.task),
    )


@dataclass(frozen=True)
class TrackingScope:
    """Where one run is tracked: MLflow's store and experiment, the run's name and tags."""

    mlflow_uri: str
    experiment: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def tracking_scope(
    cfg: AppConfig, run_dir: Path, job: HydraJob | None, withhold: frozenset[str] = frozenset()
) -> TrackingScope:
    """The store, experiment, run name and tags of a run in ``run_dir``.

    A multirun's job: experiment = the sweep directory (one experiment per sweep), store
    ``<sweep dir>/mlruns``, run ``job-<n>``. Otherwise: experiment = ``experiment_name``,
    store ``<run dir>/mlruns``, run named after the run directory.
    ``tracking.mlflow_uri`` and ``tracking.mlflow_experiment`` replace the defaults. A
    Hydra job's run is tagged ``hydra.overrides`` and ``override.<key>`` for each of its
    overrides, less those of a key in ``withhold`` (a seed that drew DP noise).
    """
    t = cfg.tracking
    run_dir = Path(run_dir).resolve()
    tags = {"fl_app.run_dir": str(run_dir), "fl_app.experiment_name": cfg.experiment_name}
    store, experiment, name = run_dir / MLFLOW_DIR, cfg.experiment_name, run_dir.name
    if job is not None and job.multirun:
        sweep = Path(job.sweep_dir)
        store, experiment, name = sweep.resolve() / MLFLOW_DIR, job.sweep_dir, f"job-{job.num}"
        tags["hydra.job.num"] = str(job.num)
    if job is not None:
        shown = [o for o in job.overrides if _override_key(o) not in withhold]
        tags["hydra.overrides"] = " ".join(shown)
        tags.update({f"override.{_override_key(o)}": o.split("=", 1)[-1] for o in shown})
    return TrackingScope(
        mlflow_uri=t.mlflow_uri if t.mlflow_uri is not None else store.as_uri(),
        experiment=t.mlflow_experiment or experiment,
        run_name=name,
        tags=tags,
    )


def _params(cfg: AppConfig, withhold: frozenset[str]) -> dict[str, str]:
    """The config as flat ``section.key`` parameters, less the withheld keys."""
    from fl_app.config.compose import config_to_dict

    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, f"{name}.")
            elif name not in withhold:
                text = value if isinstance(value, str) else json.dumps(value)
                # MLflow refuses longer values; a long list of site files is cut, marked.
                out[name] = text if len(text) <= 500 else text[:499] + "…"

    walk(config_to_dict(cfg), "")
    return out


def _withheld(cfg: AppConfig) -> frozenset[str]:
    """Config keys no tracker receives: a seed that drew DP noise (the card withholds it
    from a public release too) and the audit signing key's path."""
    from fl_app.privacy.noise import release_status

    seeded = not release_status(cfg)["for_release"]
    return frozenset({"audit_signing_key", *(["seed"] if seeded else [])})


# ---- the listener --------------------------------------------------------------------


class _Sink(Protocol):
    def log_metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def finish(
        self,
        step: int,
        values: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: list[Path],
        public: Mapping[str, Any] | None,
        failed: bool,
    ) -> None: ...


class RunTracker:
    """Round listener: each round's public scalars to every sink (step = the round).

    A sink that fails mid-run is reported (a warning naming it and the error) and
    dropped: the run goes on, its own files are the record.
    """

    def __init__(self, sinks: dict[str, _Sink], artifacts: list[Path]) -> None:
        self.sinks = sinks
        self.artifacts = artifacts
        self.last_round = 0

    @property
    def listeners(self) -> tuple[RunTracker, ...]:
        """What the round driver calls (nothing when no tracker is on)."""
        return (self,) if self.sinks else ()

    def _each(self, what: str, call: Any) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                call(sink)
            except Exception as err:  # a tracker is a reader, never the run's record
                log.warning(
                    "tracking: %s failed to %s (%s: %s); dropped",
                    name,
                    what,
                    type(err).__name__,
                    err,
                )
                print(f"tracking: {name} dropped: {type(err).__name__}: {err}", flush=True)
                del self.sinks[name]

    def on_round_end(self, report: _Report, arrays: Mapping[str, np.ndarray]) -> None:
        record = report.to_record()
        values = round_scalars(record)
        # The largest record-level epsilon this round (the summary's figure, per round).
        eps = [
            float(m["dp_epsilon"])
            for m in (record.get("client_metrics") or {}).values()
            if isinstance(m, Mapping) and "dp_epsilon" in m
        ]
        if eps:
            values["record_level_epsilon_max"] = max(eps)
        self.last_round = report.server_round
        self._each("log a round", lambda s: s.log_metrics(report.server_round, values))

    def finish(self, summary: Mapping[str, Any], rd: RunDirectory) -> None:
        """The summary's numbers (at the last round's step), its tags, the artifacts."""
        if not self.sinks:
            return
        public = public_summary(summary, _published_hash(rd))
        values, tags = summary_scalars(public), summary_tags(public)
        files = [p for p in self.artifacts if p.is_file()]
        step = int(summary.get("rounds") or self.last_round)
        failed = summary.get("status") == "failed"
        self._each("finish", lambda s: s.finish(step, values, tags, files, public, failed))

    def crash(self) -> None:
        """The server stopped mid-run: close every sink, the run marked failed."""
        self._each("close", lambda s: s.finish(self.last_round, {}, {}, [], None, True))


def _published_hash(rd: RunDirectory) -> str | None:
    """The salted config hash the card publishes (None: the run has no salt)."""
    from fl_app.server.rundir import CONFIG_HASH_SALT, published_config_hash

    salt = rd.manifest.get(CONFIG_HASH_SALT)
    return published_config_hash(rd.config_hash, salt) if isinstance(salt, str) else None


def _record_mlflow_run(run_dir: Path, run_id: str, scope: TrackingScope) -> None:
    """``tracking.json``: where this run's MLflow run is. The model card is built by
    ``fl-app export`` after the run, so the export attaches it there
    (:mod:`fl_app.release.tracking_card`). A resumed run opens a new MLflow run and
    overwrites this: the card goes to the MLflow run that finished the run."""
    from fl_app.atomic import write_atomic

    where = {"run_id": run_id, "tracking_uri": scope.mlflow_uri, "experiment": scope.experiment}
    data = json.dumps({"mlflow": where}, indent=2, sort_keys=True) + "\n"
    write_atomic(run_dir / TRACKING_FILE, data.encode())


def open_tracker(cfg: AppConfig, run_dir: Path, model_file: Path) -> RunTracker:
    """The run's tracker with every configured sink open (none: a tracker that does
    nothing and imports nothing). Raises naming ``tracking.<key>`` when a sink cannot
    be opened."""
    t = cfg.tracking
    sinks: dict[str, _Sink] = {}
    if not (t.mlflow or t.tensorboard):
        return RunTracker(sinks, [])
    from fl_app.server.tracking_sinks import MlflowSink, TensorBoardSink

    withhold = _withheld(cfg)
    if t.mlflow:
        scope = tracking_scope(cfg, run_dir, hydra_job(), withhold)
        mlflow_sink = MlflowSink.open(scope, _params(cfg, withhold))
        _record_mlflow_run(Path(run_dir), mlflow_sink.run_id, scope)
        sinks["mlflow"] = mlflow_sink
    if t.tensorboard:
        sinks["tensorboard"] = TensorBoardSink.open(Path(run_dir) / TENSORBOARD_DIR)
    return RunTracker(sinks, [model_file])
