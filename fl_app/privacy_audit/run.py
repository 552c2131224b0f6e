"""``fl-app audit-privacy <run dir>``: empirical attacks on a release, beside its ε.

Reads the run directory a simulation leaves (``config.yaml``, ``summary.json``,
``model.safetensors``), rebuilds the data split from the config and seed, and runs

1. membership inference on the released model: loss threshold and LiRA (online and
   offline) with shadow models (:mod:`~fl_app.privacy_audit.membership`);
2. gradient inversion of one client's single-step update as a server without SecAgg
   would see it, unprotected and protected (:mod:`~fl_app.privacy_audit.inversion`).

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
from fl_app.privacy.dpsgd import DpSgdSettings
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

__all__ = ["AuditError", "AuditSettings", "audit_run", "audit_run_dir", "print_audit"]

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
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    load_ndarrays(model, arrays)
    model.eval()
    return cfg, summary, model


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


def audit_run(
    run_dir: Path, out_dir: Path, settings: AuditSettings, *, seed: int, images: bool = True
) -> dict[str, Any]:
    """Run every attack on ``run_dir``'s release and write ``audit.json`` and plots.

    Returns the JSON document that was written.
    """
    t0 = time.perf_counter()
    cfg, summary, model = _load_run(run_dir)
    theory = _theory(cfg, summary)
    membership, loss_res, lira = _membership_section(cfg, summary, model, settings, seed)
    inversion, results = _inversion_section(cfg, summary, model, settings, seed, images)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [_roc_plot(out_dir / "roc.png", loss_res, lira.online, lira.offline, theory)]
    if images:
        plots.append(_inversion_plot(out_dir / "inversion.png", results))
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
        "canaries": None,
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
    return doc


def _roc_plot(
    path: Path, loss: RocSummary, online: RocSummary, offline: RocSummary, theory: dict[str, Any]
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = 1.0 / max(loss.n_nonmembers, 1) / 2
    for name, r in (("loss threshold", loss), ("LiRA online", online), ("LiRA offline", offline)):
        ax.plot(
            np.maximum(r.fpr, floor), np.maximum(r.tpr, floor), label=f"{name} (AUC {r.auc:.3f})"
        )
    grid = np.logspace(math.log10(floor), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"membership inference ({_eps_text(theory)})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _inversion_plot(path: Path, results: list[InversionResult]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: list[tuple[str, np.ndarray]] = []
    seen_batches: set[int] = set()
    for r in results:
        if r.batch_size not in seen_batches:
            seen_batches.add(r.batch_size)
            rows.append((f"true (B={r.batch_size})", r.true))
        rows.append((f"{r.protection}\nPSNR {r.psnr_db:.1f} dB", r.reconstruction))
    cols = max(len(img) for _, img in rows)
    fig = Figure(figsize=(1.2 * cols + 1.4, 1.2 * len(rows)))
    FigureCanvasAgg(fig)
    for i, (label, imgs) in enumerate(rows):
        for j in range(cols):
            ax = fig.add_subplot(len(rows), cols, i * cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(imgs):
                ax.set_axis_off()
            else:
                img = np.asarray(imgs[j])
                ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1), cmap="gray")
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _eps_text(theory: dict[str, Any]) -> str:
    parts = []
    if theory.get("epsilon") is not None:
        parts.append(f"client-level ε={theory['epsilon']:.3g}, δ={theory.get('delta')}")
    if theory.get("record_level_epsilon_max") is not None:
        parts.append(
            f"record-level ε_max={theory['record_level_epsilon_max']:.3g}, "
            f"δ={theory.get('record_level_delta')}"
        )
    return "; ".join(parts) if parts else "no DP: ε=∞"


def print_audit(doc: dict[str, Any], out_dir: Path) -> None:
    """Every number of ``doc`` beside the run's theoretical ε, as the CLI prints it."""
    eps = _eps_text(doc["theoretical"])
    mi = doc["membership_inference"]
    print(f"privacy audit of {doc['run_dir']}   [theoretical: {eps}]")
    print(
        f"membership inference ({mi['loss_threshold']['n_members']} members vs "
        f"{mi['loss_threshold']['n_nonmembers']} non-members):"
    )
    for key, name in (
        ("loss_threshold", "loss threshold"),
        ("lira_online", "LiRA online"),
        ("lira_offline", "LiRA offline"),
    ):
        r = mi[key]
        tprs = "  ".join(f"TPR@{float(f):.1%}FPR {v:.3f}" for f, v in r["tpr_at_fpr"].items())
        print(f"  {name:<15} AUC {r['auc']:.3f}  {tprs}   | {eps}")
    gi = doc["gradient_inversion"]
    print(
        f"gradient inversion of client 0's one-step update (baseline mean-image PSNR "
        f"{gi['baseline_psnr_db_mean_image']:.1f} dB):"
    )
    for r in gi["results"]:
        zc = (
            f" z={r['noise_multiplier']} C={r['clip']}" if r["noise_multiplier"] is not None else ""
        )
        print(
            f"  B={r['batch_size']} {r['protection']:<9}{zc:<14} MSE {r['mse']:.4f}  "
            f"PSNR {r['psnr_db']:.1f} dB   | {eps}"
        )
    print(f"wrote {out_dir / 'audit.json'} and {', '.join(doc['plots'])}")


def audit_run_dir(
    run_dir: Path,
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int | None = None,
    images: bool = True,
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
        return audit_run(run_dir, out_dir, settings, seed=seed, images=images)
    finally:
        torch.set_num_threads(threads)
