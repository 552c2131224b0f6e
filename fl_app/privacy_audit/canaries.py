"""Record-level canaries: plant them in one re-run of a run's config, guess, bound ε.

``fl-app audit-privacy <run dir> --canaries K`` (:mod:`fl_app.cli.audit_privacy`):

1. **Canaries.** ``K`` records drawn without replacement from the server's held-out
   test split (no client trains on it), each given a wrong label drawn uniformly from
   the other classes: mislabeled points are learnt only by memorising them, so their
   loss separates "trained on" from "not" as sharply as a record can.
2. **Inclusion.** Each canary is included independently with probability ½, in
   client 0's training data only (one site holding a record is the record-level unit).
3. **Re-run.** The run's own ``config.yaml`` is trained again in this process
   (``runtime.backend=inprocess``) on per-site files (``dataset.kind=local``,
   ``dataset.site_files``): site ``k`` holds exactly partition ``k``'s original train
   split, site 0 also the included canaries; ``dataset.val_fraction=0`` so every
   record in a site file is trained on, and ``server_eval`` and federated evaluation
   are off (sites' files carry no server test split, and no validation split is
   left). Everything else (model, optimizer, rounds, sampling, DP-SGD or central DP,
   SecAgg) is the run's. The re-run writes its own run directory
   (``<out>/canary_run``, replaced by each audit) whose ``summary.json`` gives the
   accounted ε.
4. **Guesses and bound.** Score = ``-loss`` of each canary under the re-run's released
   model; guess "in" for the ``K/4`` highest, "out" for the ``K/4`` lowest, abstain on
   the rest (fixed before any score is seen); turn the guesses into a lower bound on ε
   at the accounted δ with 95 % confidence (:mod:`~fl_app.privacy_audit.one_run`).
5. **Exposure.** One secret (a random pattern with a random label, one of 1000
   candidates) is inserted once into site 0's file too, and its exposure under the
   re-run's model is reported (:mod:`~fl_app.privacy_audit.exposure`, Carlini et al.
   2019). The secret is the same in every draw of the inclusion bits, so it is part of
   the fixed dataset the one-run bound conditions on.

The ε compared against is the record-level one (``record_level_epsilon_max``) when
the run used DP-SGD, else the client-level ε: a client-level guarantee covers any
change inside one client's data, so it bounds a record's too. A bound above it fails
the audit (:class:`~fl_app.privacy_audit.one_run.AccountingBugSuspected`).

Randomness: every draw (canaries, labels, inclusion bits) comes from one explicit
generator seeded by the audit seed. The audit is a test tool whose result must be
reproducible from ``audit.json``; seeded randomness is deliberate here, unlike in
training (where DP noise comes from OS-keyed keystreams).

Client-level canaries and the server's view: :mod:`~fl_app.privacy_audit.
client_canaries`. See docs/architecture.md (privacy audit).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fl_app.config.plan import RunPlan
from fl_app.privacy_audit.exposure import draw_secret, secret_exposure
from fl_app.privacy_audit.membership import per_example_loss
from fl_app.privacy_audit.one_run import OneRunBound, guess_from_scores

__all__ = [
    "CONFIDENCE",
    "CanarySet",
    "Rerun",
    "accounted_guarantee",
    "canary_scores",
    "draw_canaries",
    "one_run_audit",
]

CONFIDENCE = 0.95
# δ of the bound when the run accounts none (non-private): the config default's.
_DEFAULT_DELTA = 1e-5
_SEED_TAG = 0xCA7A

# Trains a resolved config (its plan, resolved once here) into a run directory and
# returns its summary.json document.
Rerun = Callable[[RunPlan, str], dict[str, Any]]


@dataclass(frozen=True)
class CanarySet:
    """``K`` canary records, their (wrong) labels and which ones are included."""

    x: np.ndarray
    y: np.ndarray
    included: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def draw_canaries(
    x: np.ndarray, y: np.ndarray, k: int, num_classes: int, rng: np.random.Generator
) -> CanarySet:
    """``k`` mislabeled records from ``(x, y)``, each included with probability ½.

    Parameters
    ----------
    x, y : numpy.ndarray
        Records no client trains on (the server's held-out test split).
    k : int
        Number of canaries, ``1 <= k <= len(y)``.
    num_classes : int
        Labels are ``y + U{1..num_classes-1} mod num_classes``: never the true one.
    rng : numpy.random.Generator
        Explicit generator (module docstring: seeded on purpose).
    """
    if not 1 <= k <= len(y):
        raise ValueError(
            f"--canaries must lie in [1, {len(y)}] (the server test split's size), found {k}"
        )
    if num_classes < 2:
        raise ValueError("canaries need dataset.num_classes >= 2 to mislabel a record")
    idx = rng.choice(len(y), k, replace=False)
    shift = rng.integers(1, num_classes, size=k)
    labels = (np.asarray(y)[idx].astype(np.int64) + shift) % num_classes
    included = rng.random(k) < 0.5
    return CanarySet(x=np.asarray(x)[idx], y=labels, included=included)


def canary_scores(model: torch.nn.Module, canaries: CanarySet) -> np.ndarray:
    """Membership score of each canary: ``-loss`` on its (wrong) label; higher = "in"."""
    return -per_example_loss(model, canaries.x, canaries.y)


def accounted_guarantee(summary: dict[str, Any]) -> tuple[float | None, float]:
    """The (ε, δ) a record is protected by according to ``summary.json``.

    Record-level DP-SGD's ``record_level_epsilon_max`` (its δ) first, else the
    client-level ε and δ, else ``(None, 1e-5)``: no DP, ε unbounded, and the bound is
    stated at the config default δ.
    """
    p = summary.get("privacy") or {}
    rl = p.get("record_level") or {}
    if p.get("record_level_epsilon_max") is not None:
        return float(p["record_level_epsilon_max"]), float(rl.get("delta") or _DEFAULT_DELTA)
    if p.get("epsilon") is not None:
        return float(p["epsilon"]), float(p.get("delta") or _DEFAULT_DELTA)
    return None, _DEFAULT_DELTA


def _site_files(
    raw_cfg: dict[str, Any],
    canaries: CanarySet,
    out: Path,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[str]:
    """Write one ``.npz`` per site: its original train split, site 0 plus the canaries
    (and the ``extra`` records: the exposure audit's secret)."""
    from fl_app.config.compose import to_app_config
    from fl_app.data import load_client_data

    cfg = to_app_config(raw_cfg)
    scale = float(cfg.dataset.pixel_scale)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for pid in range(int(cfg.dataset.num_partitions)):
        train = load_client_data(cfg.dataset, pid, cfg.dataset.num_partitions, cfg.seed).train
        x, y = train.x, train.y
        if pid == 0:
            x = np.concatenate([x, canaries.x[canaries.included]])
            y = np.concatenate([y, canaries.y[canaries.included]])
            if extra is not None:
                x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
        path = out / f"site{pid}.npz"
        # Files hold raw values, as a site's would: the loader divides by pixel_scale.
        np.savez(path, x=(x * scale).astype(np.float32), y=y.astype(np.int64))
        paths.append(str(path))
    return paths


def _rerun_config(raw_cfg: dict[str, Any], site_files: list[str]) -> dict[str, Any]:
    rerun = copy.deepcopy(raw_cfg)
    rerun.pop("hydra", None)
    ds = rerun["dataset"]
    ds.update(kind="local", local_path=None, site_files=site_files, val_fraction=0.0)
    ds["local_format"] = "npz"
    rerun["server_eval"] = False
    rerun["strategy"]["fraction_evaluate"] = 0.0
    rerun.setdefault("runtime", {})["backend"] = "inprocess"
    return rerun


def one_run_audit(
    run_dir: Path, out_dir: Path, k: int, seed: int, rerun: Rerun
) -> tuple[OneRunBound, dict[str, Any]]:
    """Plant ``k`` canaries, re-run the run's config, guess, and bound ε (module doc).

    ``rerun`` trains a config into a run directory and returns its summary:
    :func:`fl_app.runtime.simulation.run_simulation_experiment`, passed in by the CLI
    (the runtime sits above this layer; docs/architecture.md).

    Returns the bound and ``audit.json``'s ``one_run`` section. The caller checks the
    bound against the accounted ε once the section is written
    (:func:`~fl_app.privacy_audit.one_run.check_against_accounted`).
    """
    from fl_app.config.compose import to_app_config, to_app_plan
    from fl_app.data import load_server_test_set
    from fl_app.models import build_model
    from fl_app.server.layout import CONFIG_FILE, MODEL_FILE
    from fl_app.weights import load_ndarrays, load_safetensors

    raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    cfg = to_app_config(raw)
    test = load_server_test_set(cfg.dataset, cfg.seed)
    if test is None or len(test.y) == 0:
        raise ValueError(
            "--canaries draws its canaries from the server test split, and this run has "
            "none (dataset.kind=local or dataset.test_fraction=0): audit a run with one"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SEED_TAG]))
    canaries = draw_canaries(test.x, test.y, int(k), int(cfg.dataset.num_classes), rng)
    bounds = (float(test.x.min()), float(test.x.max()))
    secret = draw_secret(tuple(test.x.shape[1:]), int(cfg.dataset.num_classes), bounds, rng)
    work = out_dir / "canary_run"
    if work.exists():
        # The audit's own scratch from an earlier audit into the same --out: a run
        # directory never overwrites its checkpoints, so the re-run starts afresh.
        shutil.rmtree(work)
    files = _site_files(raw, canaries, work / "sites", secret.secret_record)
    rerun_plan = to_app_plan(_rerun_config(raw, files))
    rerun_cfg = rerun_plan.cfg
    summary = rerun(rerun_plan, str(work / "run"))
    if summary.get("status") == "failed":
        raise ValueError(f"the canary re-run failed: {summary.get('status_reason')}")
    ds = rerun_cfg.dataset
    model = build_model(rerun_cfg.model, ds.input_shape, ds.num_classes, seed=0)
    model_path = work / "run" / str(summary.get("model_file") or MODEL_FILE)
    load_ndarrays(model, load_safetensors(model_path)[0])
    guesses = guess_from_scores(canary_scores(model, canaries), canaries.included, k // 4, k // 4)
    accounted, delta = accounted_guarantee(summary)
    bound = OneRunBound.of(guesses, delta, CONFIDENCE, accounted)
    return bound, {
        **bound.to_json(),
        "included": int(canaries.included.sum()),
        "canary_records": "server test split records with a wrong label, drawn with the "
        "audit seed; included ones added to site 0's training data",
        "guess_rule": "top K//4 of -loss guessed in, bottom K//4 out, rest abstain",
        "rerun_dir": str(work / "run"),
        "rerun_changes": "dataset.kind=local with per-site files (original train splits), "
        "val_fraction=0, server_eval=false, strategy.fraction_evaluate=0, "
        "runtime.backend=inprocess",
        "rerun_status": summary.get("status"),
        "reference": "Steinke, Nasr & Jagielski, Privacy Auditing with One (1) Training "
        "Run, NeurIPS 2023",
        "exposure": secret_exposure(model, secret, accounted, delta),
    }
