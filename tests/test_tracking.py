"""Experiment tracking (tracking.mlflow, tracking.tensorboard; docs/tracking.md).

The guarantees: a run's numbers read back with MLflow's and TensorBoard's own readers
equal the run's summary.json and metrics.jsonl; a sweep is one MLflow experiment, each
job a run tagged with its overrides; nothing per client (node ids, per-site numbers)
nor the plain config hash reaches a tracker; off by default, MLflow is never imported;
a tracker that is on but not installed is a config error naming the extra.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fl_app.cli import main as cli_main
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigError, ConfigRangeError
from fl_app.release.redact import aggregate_metrics
from fl_app.server.tracking import (
    HydraJob,
    public_summary,
    round_scalars,
    summary_scalars,
    tracking_scope,
)

NODE = "7312456789012"  # a node id as Flower draws them (long enough to scan for)

# Skipped keys come before kept ones: a loop that stopped at the first skip would lose
# the rest. 99 and 55555 are node ids too (a rejected and a failed node).
_RECORD = {
    "round": 3,
    "client_metrics": {NODE: {"dp_epsilon": 2.0}},
    "rejections": [{"node": 99, "reason": "norm"}],
    "failures": [{"node": 55555, "reason": "timeout"}],
    "odd_count": int(NODE),
    "clients_sampled": 4,
    "rejected_like": 99,
    "failed_like": 55555,
    "clients_accepted": 3,
    "model_updated": True,
    "train_loss": 0.25,
    "server_accuracy": 0.875,
    "dp_epsilon": 1.5,
    "secagg_bytes_up_per_client": 2048,
    "note": "a free-text note",
    "fed_eval_accuracy": None,
    "dp_partition_id_mean": 1.5,
    "site_worst_accuracy": 0.5,
    "max_node": 2,
}


# What a tracker may receive of _RECORD, by hand: its round aggregates only.
_ROUND_SCALARS = {
    "clients_sampled": 4.0,
    "clients_accepted": 3.0,
    "model_updated": 1.0,
    "train_loss": 0.25,
    "server_accuracy": 0.875,
    "dp_epsilon": 1.5,
    "secagg_bytes_up_per_client": 2048.0,
}


def test_round_scalars_are_the_restricted_exports_aggregate_scalars() -> None:
    expected = _ROUND_SCALARS
    assert round_scalars(_RECORD) == expected
    # The same rule as `fl-app export --tier restricted` (less the step and nulls).
    exported = json.loads(aggregate_metrics([_RECORD], {NODE, "99", "55555"}))
    assert {k: float(v) for k, v in exported.items() if v is not None and k != "round"} == (
        expected
    )


_SUMMARY = {
    "status": "completed",
    "accuracy": 0.9,
    "rounds": 2,
    "config_hash": "ab" * 32,
    "contested_site_identities": {"0123456789ab": [int(NODE)]},
    "privacy": {
        "mode": "central",
        "threat_model": "trusted_server",
        "epsilon": 2.5,
        "delta": 1e-5,
        "record_level_epsilon_max": None,
        "record_level": {"epsilon_max": 3.0, "per_client": {NODE: {"epsilon": 3.0}}},
        "client_level": {"releases": {NODE: 2}, "clip": 1.0},
    },
    "fairness": {"per_site": {"worst": 0.5, "accuracy": {f"node-{NODE}": 0.5}}},
    "bandwidth": {"upload_bytes_per_client_round": 1024.0, "bits": 32},
    "release": {"for_release": True, "reasons": []},
}


# _SUMMARY as a tracker may see it (by hand), less the published hash.
_PUBLIC = {
    "status": "completed",
    "accuracy": 0.9,
    "rounds": 2,
    "privacy": {
        "mode": "central",
        "threat_model": "trusted_server",
        "epsilon": 2.5,
        "delta": 1e-5,
        "record_level_epsilon_max": None,
        "record_level": {"epsilon_max": 3.0},
        "client_level": {"clip": 1.0},
    },
    "fairness": {},
    "bandwidth": {"upload_bytes_per_client_round": 1024.0, "bits": 32},
    "release": {"for_release": True, "reasons": []},
}
_SUMMARY_SCALARS = {
    "accuracy": 0.9,
    "rounds": 2.0,
    "privacy.epsilon": 2.5,
    "privacy.delta": 1e-5,
    "privacy.record_level.epsilon_max": 3.0,
    "privacy.client_level.clip": 1.0,
    "bandwidth.upload_bytes_per_client_round": 1024.0,
    "bandwidth.bits": 32.0,
}


def test_public_summary_drops_every_per_client_block_and_the_plain_config_hash() -> None:
    public = public_summary(_SUMMARY, "cd" * 32)
    assert public == {**_PUBLIC, "config_hash_published": "cd" * 32}
    assert summary_scalars(public) == _SUMMARY_SCALARS
    assert public_summary(_SUMMARY, None)["config_hash_published"] == "withheld"
    # A crashed run's summary has no config hash to drop.
    assert public_summary({"status": "failed"}, None) == {
        "status": "failed",
        "config_hash_published": "withheld",
    }


def test_a_sweeps_jobs_share_one_store_and_experiment_tagged_with_their_overrides(
    tmp_path: Path,
) -> None:
    cfg = compose_config("config", ["tracking.mlflow=true"])
    sweep = tmp_path / "multirun" / "sweep"
    overrides = ("seed=2", "strategy=fedadam", "+x=a=b", "~y", "Xz=1")
    job = HydraJob(True, str(sweep), 1, overrides)
    scope = tracking_scope(cfg, sweep / "1", job)
    assert scope.mlflow_uri == (sweep / "mlruns").resolve().as_uri()
    assert (scope.experiment, scope.run_name) == (str(sweep), "job-1")
    assert scope.tags["hydra.overrides"] == "seed=2 strategy=fedadam +x=a=b ~y Xz=1"
    assert (scope.tags["override.seed"], scope.tags["override.strategy"]) == ("2", "fedadam")
    # Hydra's +key= / ~key prefixes are not part of the key; a value may hold "=".
    assert (scope.tags["override.x"], scope.tags["override.y"]) == ("a=b", "~y")
    assert scope.tags["override.Xz"] == "1"  # only + and ~ are stripped
    assert scope.tags["hydra.job.num"] == "1"
    assert scope.tags["fl_app.experiment_name"] == "default"
    assert scope.tags["fl_app.run_dir"] == str((sweep / "1").resolve())
    # A seed that drew DP noise is withheld from the tags too.
    hidden = tracking_scope(cfg, sweep / "1", job, frozenset({"seed"}))
    assert "override.seed" not in hidden.tags and hidden.tags["hydra.overrides"] == (
        "strategy=fedadam +x=a=b ~y Xz=1"
    )
    # Not a sweep: the run directory's own store, experiment_name.
    single = tracking_scope(cfg, tmp_path / "run", HydraJob(False, "", 0, ("seed=2",)))
    assert single.mlflow_uri == (tmp_path / "run" / "mlruns").resolve().as_uri()
    assert (single.experiment, single.run_name) == ("default", "run")
    assert single.tags["override.seed"] == "2" and "hydra.job.num" not in single.tags
    # Outside Hydra (`flwr run`, the Python API): no override tags.
    plain = tracking_scope(cfg, tmp_path / "run", None)
    assert "hydra.overrides" not in plain.tags and plain.experiment == "default"
    # Explicit settings win.
    mine = compose_config(
        "config",
        [
            "tracking.mlflow=true",
            "tracking.mlflow_uri=http://x:5000",
            "tracking.mlflow_experiment=e",
        ],
    )
    given = tracking_scope(mine, sweep / "1", job)
    assert (given.mlflow_uri, given.experiment) == ("http://x:5000", "e")


class _Recorder:
    """A sink double: records every call; ``broken`` ones raise instead."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.calls: list[tuple] = []

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        if self.broken:
            raise OSError("store gone")
        self.calls.append(("round", step, dict(values)))

    def finish(  # a broken sink fails here too
        self,
        step: int,
        values: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: list[Path],
        public: Mapping[str, Any] | None,
        failed: bool,
    ) -> None:
        if self.broken:
            raise OSError("store gone")
        self.calls.append(("finish", step, dict(values), dict(tags), artifacts, public, failed))


class _Report:
    server_round = 3

    def to_record(self) -> dict:
        # A client without a record-level epsilon (no DP-SGD there) counts for nothing.
        clients = {NODE: {"dp_epsilon": 2.0}, "42": {"dp_epsilon": 0.5}, "43": {"n": 1}}
        return dict(_RECORD, client_metrics=clients)


# HMAC-SHA256 of the plain hash under the run's salt (rundir.published_config_hash's
# definition), computed here with the standard library.
_SALTED = (
    __import__("hmac")
    .new(
        bytes.fromhex("11" * 32),
        b"fl-app published config hash v1\x00" + ("ab" * 32).encode(),
        "sha256",
    )
    .hexdigest()
)


class _RunDir:
    def __init__(self) -> None:
        self.config_hash = "ab" * 32
        self.manifest = {"config_hash_salt": "11" * 32}


def test_the_listener_sends_each_sink_the_rounds_and_the_public_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from fl_app.server.tracking import RunTracker

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    sink, broken = _Recorder(), _Recorder(broken=True)
    tracker = RunTracker({"a": sink, "b": broken}, [model, tmp_path / "absent.json"])
    assert tracker.listeners == (tracker,)
    tracker.on_round_end(_Report(), {})
    scalars = {**_ROUND_SCALARS, "record_level_epsilon_max": 2.0}
    assert sink.calls == [("round", 3, scalars)]
    assert list(tracker.sinks) == ["a"]  # the failing sink was dropped, the run goes on
    assert "tracking: b dropped: OSError: store gone" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records] == [
        "tracking: b failed to log a round (OSError: store gone); dropped"
    ]

    tracker.finish(_SUMMARY, _RunDir())  # type: ignore[arg-type]
    salted = _SALTED
    ((kind, step, values, tags, files, public, failed),) = sink.calls[1:]
    assert (kind, step, files, failed) == ("finish", 2, [model], False)
    assert public == {**_PUBLIC, "config_hash_published": salted}
    assert values == _SUMMARY_SCALARS
    assert tags == {
        "fl_app.status": "completed",
        "fl_app.privacy.mode": "central",
        "fl_app.privacy.threat_model": "trusted_server",
        "fl_app.for_release": "true",
    }
    tracker.crash()
    assert sink.calls[-1] == ("finish", 3, {}, {}, [], None, True)


def test_the_listener_reports_a_failed_run_and_each_failing_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fl_app.server.tracking import RunTracker

    sink = _Recorder()
    tracker = RunTracker({"a": sink, "b": _Recorder(broken=True)}, [])
    tracker.finish({"status": "failed", "rounds": 0}, _RunDir())  # type: ignore[arg-type]
    assert "tracking: b failed to finish (OSError: store gone)" in caplog.text
    ((_, _, _, tags, _, public, failed),) = sink.calls
    assert failed and tags == {"fl_app.status": "failed"}  # a crash's summary: no privacy
    assert public == {"status": "failed", "rounds": 0, "config_hash_published": _SALTED}
    # Before any round: the run is closed at step 0.
    fresh = RunTracker({"a": _Recorder(), "b": _Recorder(broken=True)}, [])
    fresh.crash()
    assert fresh.sinks["a"].calls == [("finish", 0, {}, {}, [], None, True)]  # type: ignore[attr-defined]
    assert "tracking: b failed to close (OSError: store gone)" in caplog.text
    # A run directory without a salt publishes no config hash.
    bare = _RunDir()
    bare.manifest = {}
    other = _Recorder()
    RunTracker({"a": other}, []).finish({"status": "completed"}, bare)  # type: ignore[arg-type]
    assert other.calls[0][5] == {"status": "completed", "config_hash_published": "withheld"}


def test_tracking_off_is_a_tracker_with_no_sink(tmp_path: Path) -> None:
    from fl_app.server.tracking import open_tracker

    tracker = open_tracker(compose_config("config", []), tmp_path, tmp_path / "m")
    assert tracker.sinks == {} and tracker.listeners == () and tracker.artifacts == []
    tracker.finish(_SUMMARY, _RunDir())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_params_withhold_a_seed_that_drew_dp_noise_and_the_signing_key() -> None:
    from fl_app.server.tracking import _params, _withheld

    secure = compose_config("config", ["privacy=central", "audit_signing_key=/k.pem"])
    params = _params(secure, _withheld(secure))
    assert params["seed"] == "42" and params["privacy.mode"] == "central"
    assert params["privacy.noise_multiplier"] == "1.0" and params["resume"] == "null"
    assert "audit_signing_key" not in params
    seeded = compose_config("config", ["privacy=central", "privacy.secure_mode=false"])
    assert "seed" not in _params(seeded, _withheld(seeded))
    assert _withheld(seeded) == frozenset({"seed", "audit_signing_key"})
    # MLflow refuses values over 500 characters: a longer one is cut to 500, marked.
    from dataclasses import replace

    exact = _params(replace(secure, experiment_name="e" * 500), frozenset())
    assert exact["experiment_name"] == "e" * 500
    long = _params(replace(secure, experiment_name="e" * 501), frozenset())
    assert long["experiment_name"] == "e" * 499 + "…"


@pytest.mark.parametrize(
    ("overrides", "field", "kind"),
    [
        (["tracking.mlflow_uri=./mlruns"], "tracking.mlflow_uri", ConfigConflictError),
        (["tracking.mlflow_experiment=x"], "tracking.mlflow_experiment", ConfigConflictError),
        (
            ["tracking.mlflow=true", "tracking.mlflow_uri=' '"],
            "tracking.mlflow_uri",
            ConfigRangeError,
        ),
    ],
)
def test_tracking_settings_that_would_do_nothing_are_refused(
    overrides: list[str], field: str, kind: type[ConfigError]
) -> None:
    with pytest.raises(kind) as err:
        compose_config("config", overrides)
    assert err.value.field == field
    assert err.value.found == overrides[-1].split("=", 1)[1].strip("'")
    assert err.value.fix == (
        "only MLflow uses it: set tracking.mlflow=true, or leave it null"
        if kind is ConfigConflictError
        else "must not be empty: give a value, or null for the default"
    )


@pytest.mark.parametrize("key", ["mlflow", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_refused_naming_the_extra(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fl_app.config.validate_tracking as checks

    monkeypatch.setattr(checks, "_installed", lambda module: module != key)
    with pytest.raises(ConfigConflictError) as err:
        compose_config("config", [f"tracking.{key}=true"])
    assert (err.value.field, err.value.found) == (f"tracking.{key}", True)
    name = {"mlflow": "MLflow", "tensorboard": "TensorBoard"}[key]
    extra = " (mlflow-skinny)" if key == "mlflow" else ""
    assert err.value.fix == (
        f"{name} is not installed: pip install 'fl-app[tracking]'{extra}, or set "
        f"tracking.{key}=false"
    )
    compose_config("config", [])  # off: nothing is looked up


def test_a_package_lookup_that_fails_reads_as_not_installed() -> None:
    from fl_app.config.validate_tracking import _installed

    assert _installed("json") and not _installed("no_such_package_xyz.sub")


def test_a_default_run_imports_neither_mlflow_nor_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_app.runtime.simulation import run_simulation_experiment

    # A None entry makes `import mlflow` raise: the run completing proves nothing of
    # the default path imports them (in this process, where other tests loaded them).
    for module in ("mlflow", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    cfg = compose_config(
        "config",
        ["runtime=inprocess", "num_rounds=1", "dataset.num_partitions=2", "federated_eval_every=0"],
    )
    assert run_simulation_experiment(cfg, tmp_path / "run")["status"] == "completed"
    assert not (tmp_path / "run" / "mlruns").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # end to end: a two-job Hydra sweep, in-process (no Ray)
def test_a_tracked_sweep_reads_back_equal_to_its_run_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    cli_main(
        [
            "simulate",
            "-m",
            "runtime=inprocess",
            "num_rounds=2",
            "dataset.num_partitions=3",
            "federated_eval_every=0",
            "tracking=all",
            "privacy=central,dpsgd",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    client = MlflowClient(tracking_uri=(sweep / "mlruns").as_uri())
    # One experiment for the sweep (beside the file store's own empty "Default").
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert sorted(experiments) == sorted([str(sweep), "Default"])
    assert client.search_runs([experiments["Default"]]) == []
    runs = client.search_runs([experiments[str(sweep)]])
    assert len(runs) == 2
    by_dir = {Path(r.data.tags["fl_app.run_dir"]).name: r for r in runs}
    assert by_dir["1"].data.tags["override.privacy"] == "dpsgd"
    assert "privacy=dpsgd" in by_dir["1"].data.tags["hydra.overrides"]
    for job in ("0", "1"):
        run = by_dir[job]
        summary = json.loads((sweep / job / "summary.json").read_text())
        records = _records(sweep / job)
        m = run.data.metrics
        assert run.info.status == "FINISHED" and run.data.tags["fl_app.status"] == "completed"
        assert m["accuracy"] == summary["accuracy"] and m["loss"] == summary["loss"]
        assert m["rounds"] == summary["rounds"] == 2
        assert m["initial_accuracy"] == summary["initial_accuracy"]
        history = client.get_metric_history(run.info.run_id, "server_accuracy")
        assert [(h.step, h.value) for h in history] == [
            (r["round"], r["server_accuracy"]) for r in records
        ]
        assert run.data.params["privacy.mode"] == ("central" if job == "0" else "none")
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert files == {"model.safetensors", "summary_public.json"}

        events = EventAccumulator(str(sweep / job / "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()

        def tb(tag: str, events: EventAccumulator = events) -> list[tuple[int, float]]:
            return [
                (e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                for e in events.Tensors(tag)
            ]

        assert tb("server_accuracy") == [(r["round"], r["server_accuracy"]) for r in records]
        assert tb("summary/accuracy") == [(2, summary["accuracy"])]

    # Central DP: the ledger's client-level epsilon each round, the summary's at the end.
    central = by_dir["0"]
    eps = json.loads((sweep / "0" / "summary.json").read_text())["privacy"]["epsilon"]
    assert eps is not None and central.data.metrics["privacy.epsilon"] == eps
    history = client.get_metric_history(central.info.run_id, "dp_epsilon")
    assert [h.value for h in history] == [r["dp_epsilon"] for r in _records(sweep / "0")]
    assert history[-1].value == eps
    # DP-SGD: the largest record-level epsilon over the institutions, per round.
    dpsgd = by_dir["1"]
    records = _records(sweep / "1")
    history = client.get_metric_history(dpsgd.info.run_id, "record_level_epsilon_max")
    assert [h.value for h in history] == [
        max(c["dp_epsilon"] for c in r["client_metrics"].values()) for r in records
    ]
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    top = summary["privacy"]["record_level_epsilon_max"]
    assert dpsgd.data.metrics["privacy.record_level_epsilon_max"] == top == history[-1].value

    # Nothing per client and not the plain config hash, anywhere a tracker wrote.
    nodes = {n for r in records for n in r["client_metrics"]}
    assert len(nodes) == 3 and all(len(n) >= 6 for n in nodes)
    secrets = [json.loads((sweep / j / "summary.json").read_text())["config_hash"] for j in "01"]
    written = [p for d in (sweep / "mlruns", sweep / "1" / "tensorboard") for p in d.rglob("*")]
    for path in (p for p in written if p.is_file() and p.suffix != ".safetensors"):
        data = path.read_bytes()
        assert not [s for s in secrets if s[:16].encode() in data], path
        assert not [n for n in nodes if n.encode() in data], path


def test_open_tracker_opens_an_mlflow_run_and_an_event_file_in_the_run_directory(
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    from fl_app.server.tracking import open_tracker

    run_dir = tmp_path / "run"
    cfg = compose_config("config", ["tracking=all", "experiment_name=exp"])
    tracker = open_tracker(cfg, run_dir, run_dir / "model.safetensors")
    assert sorted(tracker.sinks) == ["mlflow", "tensorboard"]
    assert tracker.artifacts == [run_dir / "model.safetensors"]
    (events,) = (run_dir / "tensorboard").iterdir()
    assert events.name.startswith("events.")
    tracker.crash()
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])  # type: ignore[union-attr]
    assert (run.info.run_name, run.info.status) == ("run", "FAILED")
    assert run.data.tags["fl_app.run_dir"] == str(run_dir.resolve())
    assert run.data.params["experiment_name"] == "exp" and run.data.params["seed"] == "42"
    # Where the MLflow run is, for `fl-app export` to attach the card after the run.
    assert json.loads((run_dir / "tracking.json").read_text()) == {
        "mlflow": {
            "run_id": run.info.run_id,
            "tracking_uri": (run_dir / "mlruns").resolve().as_uri(),
            "experiment": "exp",
        }
    }
    # One tracker alone opens only itself.
    only = open_tracker(
        compose_config("config", ["tracking=tensorboard"]), tmp_path / "tb", tmp_path
    )
    assert list(only.sinks) == ["tensorboard"] and not (tmp_path / "tb" / "mlruns").exists()
    assert not (tmp_path / "tb" / "tracking.json").exists()
    only.crash()


def test_hydra_job_reads_this_processs_sweep_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from fl_app.config.compose import config_dir, register_schemas
    from fl_app.server.tracking import hydra_job, open_tracker

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    assert hydra_job() is None  # outside Hydra (flwr run, the Python API)
    register_schemas()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        raw = compose("config", overrides=["seed=3"], return_hydra_config=True)
    OmegaConf.set_readonly(raw, False)
    OmegaConf.set_readonly(raw.hydra, False)
    with open_dict(raw):
        raw.hydra.mode = RunMode.MULTIRUN
        raw.hydra.sweep.dir = str(tmp_path / "s")
        raw.hydra.job.num = 4
    HydraConfig.instance().set_config(raw)
    assert hydra_job() == HydraJob(True, str(tmp_path / "s"), 4, ("seed=3",))
    # open_tracker asks Hydra: the sweep's store and experiment, the seed that drew DP
    # noise (secure_mode=false) withheld from the tags.
    seeded = ["tracking=mlflow", "privacy=central", "privacy.secure_mode=false", "seed=3"]
    tracker = open_tracker(compose_config("config", seeded), tmp_path / "s" / "4", tmp_path)
    tracker.crash()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "s" / "mlruns").as_uri())
    found = client.get_experiment_by_name(str(tmp_path / "s"))
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    assert run.data.tags["hydra.overrides"] == "" and "seed" not in run.data.params
    OmegaConf.set_readonly(raw.hydra, False)  # set_config made it read-only
    with open_dict(raw):
        raw.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(raw)
    assert hydra_job() == HydraJob(False, "", 0, ("seed=3",))
