"""``fl-app audit-privacy <run dir>``: empirical attacks on a release, beside its ε.

Reads the run directory a simulation leaves (``config.yaml``, ``summary.json``,
``model.safetensors``), rebuilds the data split from the config and seed, and runs

1. membership inference on the released model: loss threshold and LiRA (online and
   offline) with shadow models (:mod:`~fl_app.privacy_audit.membership`);
2. gradient inversion of one client's single-step update as a server without SecAgg
   would see it, unprotected and protected (:mod:`~fl_app.privacy_audit.inversion`);
3. with ``--canaries K``, the one-run audit: K canaries planted in a re-run of the
   run's config, and a lower bound on ε beside the accounted one
   (:mod:`~fl_app.privacy_audit.canaries`, ``audit.json``'s ``one_run``);
4. with ``--client-canaries K``, client-level canaries replayed through the run's
   recorded client-level mechanism, bounds from the released model and from the
   server's view (:mod:`~fl_app.privacy_audit.client_canaries`, ``client_one_run``).

Members are the records the federation trained on: the union of every partition's
train split (``load_client_data`` for every partition id; validation splits are
never trained on and are left out). Clients never sampled by the strategy are
counted as members too, which can only make the attacks look weaker. Non-members
are the server's held-out test split, which no client holds. The attacked sample is
balanced (equal numbers drawn without replacement, seeded).

Output, in ``--out`` (default ``<run dir>/privacy_audit/``):

* ``audit.json``: every number, the theoretical ε/δ/mechanism from ``summary.json``,
  seeds, sample sizes, attack settings and approximations;
* ``roc.png``: ROC curves of the membership attacks, log-log;
* ``inversion.png``: true records of one client beside their reconstructions. These
  images *are* client data: the attack's point is to show what leaks. Nothing else
  per record is written (no labels, no pixels in JSON); ``--no-images`` omits the
  plot. ``audit.json`` says whether it was written.

The theoretical ε is client-level (``privacy.epsilon``) or record-level
(``privacy.record_level_epsilon_max``); membership here is record-level, so against
a client-level guarantee the empirical numbers are compared with a bound for a
larger unit (a whole client's data) and should lie well inside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fl_app.config.schema import AppConfig
from fl_app.privacy.dpsgd_settings import DpSgdSettings
from fl_app.privacy_audit.canaries import Rerun, one_run_audit
from fl_app.privacy_audit.client_canaries import client_canary_audit
from fl_app.privacy_audit.inversion import (
    InversionResult,
    InversionSettings,
    Protection,
    run_inversion,
)
from fl_app.privacy_audit.membership import (
    LiraResult,
    ShadowSettings,
    lira_attack,
    loss_threshold_attack,
    model_factory,
)
from fl_app.privacy_audit.metrics import DEFAULT_FPRS, RocSummary
from fl_app.privacy_audit.one_run import OneRunBound, check_against_accounted
from fl_app.privacy_audit.report import inversion_plot, roc_plot

__all__ = ["AuditError", "AuditSettings", "audit_run", "audit_run_dir"]

SCHEMA_VERSION = 1
_DEFAULT_Z = 1.0
_DEFAULT_CLIP = 1.0


@dataclass(frozen=True)
class AuditSettings:
    """Sizes of the audit; :meth:`quick` for tests and smoke runs."""

    max_per_side: int = 500
    num_shadows: int = 16
    max_shadow_epochs: int = 100
    inversion_batch_sizes: tuple[int, ...] = (1, 4)
    protections: tuple[Protection, ...] = (
        Protection.none,
        Protection.clip,
        Protection.dpsgd,
        Protection.local_dp,
    )
    inversion: InversionSettings = field(default_factory=InversionSettings)

    @classmethod
    def quick(cls, seed: int) -> AuditSettings:
        """Small settings: 4 shadows, batch of one, unprotected vs DP-SGD."""
        return cls(
            max_per_side=200,
            num_shadows=4,
            max_shadow_epochs=10,
            inversion_batch_sizes=(1,),
            protections=(Protection.none, Protection.dpsgd),
            inversion=InversionSettings(iterations=200, restarts=1, seed=seed),
        )


class AuditError(RuntimeError):
    """The run directory cannot be audited; the message says why and what to do."""


def _load_run(run_dir: Path) -> tuple[AppConfig, dict[str, Any], torch.nn.Module]:
    from fl_app.config.compose import to_app_config
    from fl_app.models import build_model
    from fl_app.server.layout import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
    from fl_app.weights import load_ndarrays, load_safetensors

    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise AuditError(f"{run_dir / name} is missing: audit a finished run directory")
    cfg = to_app_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    _refuse_body_only(cfg, model)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    model_path = run_dir / str(summary.get("model_file") or MODEL_FILE)
    if not model_path.is_file():
        raise AuditError(f"{model_path} is missing: the run released no model")
    blob = model_path.read_bytes()
    expected = summary.get("model_sha256")
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
        raise AuditError(
            f"{model_path.name} does not hash to summary.json model_sha256: this is not the "
            "model the run released; restore it or rerun"
        )
    arrays, _ = load_safetensors(model_path)
    load_ndarrays(model, arrays)
    model.eval()
    return cfg, summary, model


def _refuse_body_only(cfg: AppConfig, model: torch.nn.Module) -> None:
    """Refuse a release that lacks layers the sites kept (``share.layers``).

    Every attack scores the full model's outputs; the layers each site kept (its head)
    were never released, and filling them with their initial values would audit a model
    nobody holds (a random head hides membership, so the audit would understate the
    risk). Sound would be one audit per site with its own personalized model, which the
    run directory does not hold (the sites do).
    """
    from fl_app.share_layers import split_shared

    _shared, kept = split_shared(model.state_dict(), list(cfg.share.layers))
    if kept:
        raise AuditError(
            f"share.layers={list(cfg.share.layers)} released only part of the model: the "
            f"sites kept {sorted(kept)}, so there is no released full model to attack. The "
            "audit needs a full model: audit a run with share.layers=['*'] (share=all), or "
            "each site's personalized model (its kept layers with the released ones), which "
            "only the sites hold (docs/privacy-audit.md)"
        )


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _theory(cfg: AppConfig, summary: dict[str, Any]) -> dict[str, Any]:
    p = summary.get("privacy") or {}
    rl = p.get("record_level") or {}
    return {
        "mode": p.get("mode"),
        "threat_model": p.get("threat_model"),
        "epsilon": p.get("epsilon"),
        "delta": p.get("delta"),
        "record_level_epsilon_max": p.get("record_level_epsilon_max"),
        "record_level_delta": rl.get("delta") if rl else None,
        "record_level_mechanism": rl.get("mechanism") if rl else None,
        "note": p.get("note"),
        "secure_aggregation": summary.get("secure_aggregation"),
        "rounds": summary.get("rounds"),
    }


def _record_level_z(cfg: AppConfig, summary: dict[str, Any]) -> float | None:
    if not cfg.privacy.record_level:
        return None
    if cfg.privacy.dpsgd.noise_multiplier is not None:
        return float(cfg.privacy.dpsgd.noise_multiplier)
    per = ((summary.get("privacy") or {}).get("record_level") or {}).get("per_client") or {}
    zs = [float(v["noise-multiplier"]) for v in per.values() if "noise-multiplier" in v]
    return min(zs) if zs else None


def _protection_params(cfg: AppConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """z and C for the protected inversion scenarios: the run's, else defaults."""
    z_rec = _record_level_z(cfg, summary)
    if z_rec is not None:
        return {
            "noise_multiplier": z_rec,
            "clip": float(cfg.privacy.dpsgd.max_grad_norm),
            "source": "run config (privacy.dpsgd)",
        }
    if cfg.privacy.noise_multiplier is not None and cfg.privacy.clip is not None:
        return {
            "noise_multiplier": float(cfg.privacy.noise_multiplier),
            "clip": float(cfg.privacy.clip),
            "source": "run config (privacy.noise_multiplier, privacy.clip)",
        }
    return {"noise_multiplier": _DEFAULT_Z, "clip": _DEFAULT_CLIP, "source": "default"}


def _membership_data(
    cfg: AppConfig, rng: np.random.Generator, max_per_side: int
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    from fl_app.data import load_client_data, load_server_test_set

    test = load_server_test_set(cfg.dataset, cfg.seed)
    if test is None or len(test.y) == 0:
        raise AuditError(
            "the run has no server test set (dataset.kind=local or dataset.test_fraction=0): "
            "membership inference needs held-out non-members"
        )
    parts = [
        load_client_data(cfg.dataset, pid, cfg.dataset.num_partitions, cfg.seed).train
        for pid in range(int(cfg.dataset.num_partitions))
    ]
    mx = np.concatenate([p.x for p in parts])
    my = np.concatenate([p.y for p in parts])
    x = np.concatenate([mx, test.x])
    y = np.concatenate([my, test.y])
    is_member = np.concatenate([np.ones(len(my), bool), np.zeros(len(test.y), bool)])
    n = min(len(my), len(test.y), int(max_per_side))
    scored = np.zeros(len(y), bool)
    scored[rng.choice(len(my), n, replace=False)] = True
    scored[len(my) + rng.choice(len(test.y), n, replace=False)] = True
    return (x, y), is_member, scored


def _membership_section(
    cfg: AppConfig,
    summary: dict[str, Any],
    model: torch.nn.Module,
    settings: AuditSettings,
    seed: int,
) -> tuple[dict[str, Any], RocSummary, LiraResult]:
    """Membership inference on the release: loss threshold and LiRA with shadow models.

    Returns the ``membership_inference`` section of ``audit.json`` and both attacks'
    results (for the ROC plot).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA0D17]))
    pool, is_member, scored = _membership_data(cfg, rng, settings.max_per_side)
    x, y = pool
    mem = (x[scored & is_member], y[scored & is_member])
    non = (x[scored & ~is_member], y[scored & ~is_member])
    loss_res = loss_threshold_attack(model, mem, non, DEFAULT_FPRS)
    frac = float(cfg.strategy.fraction_train)
    rounds = int(summary.get("rounds") or cfg.num_rounds)
    passes = max(1, round(rounds * int(cfg.train.local_epochs) * frac))
    epochs = min(passes, settings.max_shadow_epochs)
    z_rec = _record_level_z(cfg, summary)
    shadow = ShadowSettings(
        num_shadows=settings.num_shadows,
        epochs=epochs,
        train=cfg.train,
        dpsgd=None
        if z_rec is None
        else DpSgdSettings(noise_multiplier=z_rec, max_grad_norm=cfg.privacy.dpsgd.max_grad_norm),
        seed=int(seed),
        target_accuracy=_float_or_none(summary.get("accuracy")),
    )
    factory = model_factory(cfg.model, tuple(cfg.dataset.input_shape), cfg.dataset.num_classes)
    lira = lira_attack(model, factory, pool, is_member, scored, shadow, DEFAULT_FPRS)
    membership = {
        "members": "union of every partition's train split (load_client_data, run seed)",
        "nonmembers": "server held-out test split (load_server_test_set, run seed)",
        "pool_size": len(y),
        "pool_members": int(is_member.sum()),
        "fprs": list(DEFAULT_FPRS),
        "loss_threshold": loss_res.to_json(),
        "lira_online": lira.online.to_json(),
        "lira_offline": lira.offline.to_json(),
        "shadows": {
            **shadow.to_json(),
            "passes_per_record_in_run": passes,
            "epochs_capped": epochs < passes,
            "epochs_run": lira.shadow_epochs,
            "variance": "global (pooled) IN and OUT variance, per-example means",
        },
    }
    return membership, loss_res, lira


def _inversion_section(
    cfg: AppConfig,
    summary: dict[str, Any],
    model: torch.nn.Module,
    settings: AuditSettings,
    seed: int,
    images: bool,
) -> tuple[dict[str, Any], list[InversionResult]]:
    """Gradient inversion of client 0's update, under each protection the settings name.

    Returns the ``gradient_inversion`` section of ``audit.json`` and the per-batch
    results (for the image plot).
    """
    # long: one loop over (batch size, protection), then the section's JSON table.
    from fl_app.data import load_client_data

    prot = _protection_params(cfg, summary)
    client = load_client_data(cfg.dataset, 0, cfg.dataset.num_partitions, cfg.seed).train
    inv_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1F7E]))
    lo, hi = float(client.x.min()), float(client.x.max())
    data_range = hi - lo if hi > lo else 1.0
    results: list[InversionResult] = []
    for b in settings.inversion_batch_sizes:
        b = min(int(b), len(client.y))
        idx = inv_rng.choice(len(client.y), b, replace=False)
        xb, yb = client.x[idx], client.y[idx]
        for p in settings.protections:
            results.append(
                run_inversion(
                    model,
                    xb,
                    yb,
                    p,
                    settings.inversion,
                    lr=float(cfg.train.lr),
                    clip=prot["clip"],
                    noise_multiplier=prot["noise_multiplier"],
                    num_classes=cfg.dataset.num_classes,
                    known_labels=b > 1,
                    data_range=data_range,
                    bounds=(lo, hi),
                )
            )
    mean_img = client.x.mean(axis=0, keepdims=True)
    base_mse = float(((client.x - mean_img) ** 2).mean())
    inversion = {
        "client_partition": 0,
        "global_model": "the released model (as the global model of a last round)",
        "update": "one local SGD step on the batch (a scaled gradient)",
        "secure_aggregation_in_run": summary.get("secure_aggregation"),
        "observed_by": "a server without secure aggregation (with it, only the cohort sum)",
        "protection_params": prot,
        "settings": {
            "iterations": settings.inversion.iterations,
            "restarts": settings.inversion.restarts,
            "lr": settings.inversion.lr,
            "tv_weight": settings.inversion.tv_weight,
            "objective": "1 - cosine(gradient, -update) + tv_weight * TV (Geiping et al. 2020)",
            "labels": "inferred from the output-bias gradient (iDLG) for B=1; known for B>1",
        },
        "data_range": data_range,
        "baseline_mse_mean_image": base_mse,
        "baseline_psnr_db_mean_image": 10 * math.log10(data_range**2 / base_mse)
        if base_mse > 0
        else None,
        "results": [r.to_json() for r in results],
        "images_written": bool(images),
    }
    return inversion, results


def _canary_sections(
    run_dir: Path,
    out_dir: Path,
    seed: int,
    canaries: int | None,
    rerun: Rerun | None,
    client_canaries: int | None,
) -> tuple[
    tuple[OneRunBound, dict[str, Any]] | None,
    tuple[dict[str, OneRunBound], dict[str, Any]] | None,
]:
    """The record-level (re-run) and client-level (replay) one-run audits asked for."""
    one_run = None
    if canaries is not None:
        if rerun is None:
            raise ValueError("canaries need a rerun function (the CLI passes the simulation's)")
        one_run = one_run_audit(run_dir, out_dir, int(canaries), int(seed), rerun)
    client_run = (
        None
        if client_canaries is None
        else client_canary_audit(run_dir, int(client_canaries), int(seed))
    )
    return one_run, client_run


def audit_run(
    run_dir: Path,
    out_dir: Path,
    settings: AuditSettings,
    *,
    seed: int,
    images: bool = True,
    canaries: int | None = None,
    rerun: Rerun | None = None,
    client_canaries: int | None = None,
) -> dict[str, Any]:
    """Run every attack on ``run_dir``'s release and write ``audit.json`` and plots.

    With ``canaries``, also the one-run audit (:mod:`~fl_app.privacy_audit.canaries`,
    re-training with ``rerun``):
    its section is written, then :class:`~fl_app.privacy_audit.one_run.
    AccountingBugSuspected` is raised if its lower bound exceeds the accounted ε.
    With ``client_canaries``, the client-level audit too (both of its views checked
    the same way, after ``audit.json`` is written). Returns the JSON document that was written.
    """
    t0 = time.perf_counter()
    cfg, summary, model = _load_run(run_dir)
    theory = _theory(cfg, summary)
    membership, loss_res, lira = _membership_section(cfg, summary, model, settings, seed)
    inversion, results = _inversion_section(cfg, summary, model, settings, seed, images)
    one_run, client_run = _canary_sections(run_dir, out_dir, seed, canaries, rerun, client_canaries)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [roc_plot(out_dir / "roc.png", loss_res, lira.online, lira.offline, theory)]
    if images:
        plots.append(inversion_plot(out_dir / "inversion.png", results))
    doc = {
        "schema_version": SCHEMA_VERSION,
        "run_dir": str(run_dir),
        "config_hash": summary.get("config_hash"),
        "model_sha256": summary.get("model_sha256"),
        "dataset": str(getattr(cfg.dataset.kind, "value", cfg.dataset.kind)),
        "seed": int(seed),
        "run_seed": int(cfg.seed),
        "quick": settings.num_shadows < AuditSettings().num_shadows,
        "theoretical": theory,
        "membership_inference": membership,
        "gradient_inversion": inversion,
        "canaries": None if one_run is None else int(one_run[0].guesses.canaries),
        "one_run": None if one_run is None else one_run[1],
        "client_one_run": None if client_run is None else client_run[1],
        "plots": [p.name for p in plots],
        "raw_data_written": (
            "inversion.png shows the true records of the inversion demo beside their "
            "reconstructions"
            if images
            else "none"
        ),
        "seconds": time.perf_counter() - t0,
    }
    (out_dir / "audit.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if one_run is not None:
        # After audit.json is written: the evidence stays beside the error.
        check_against_accounted(one_run[0])
    for bound in () if client_run is None else client_run[0].values():
        check_against_accounted(bound)
    return doc


def audit_run_dir(
    run_dir: Path,
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int | None = None,
    images: bool = True,
    canaries: int | None = None,
    rerun: Rerun | None = None,
    client_canaries: int | None = None,
) -> dict[str, Any]:
    """:func:`audit_run` with the settings of ``fl-app audit-privacy`` (:mod:`fl_app.cli.
    audit_privacy`): the run's own seed unless ``seed`` is given, quick settings (few
    shadows, batch of one) for tests, torch on one thread (tiny models: more intra-op
    threads only contend)."""
    if seed is None:
        cfg, _, _ = _load_run(run_dir)
        seed = int(cfg.seed)
    settings = (
        AuditSettings.quick(seed)
        if quick
        else AuditSettings(inversion=InversionSettings(seed=seed))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return audit_run(
            run_dir,
            out_dir,
            settings,
            seed=seed,
            images=images,
            canaries=canaries,
            rerun=rerun,
            client_canaries=client_canaries,
        )
    finally:
        torch.set_num_threads(threads)
