"""What an audit shows: its plots and the summary ``fl-app audit-privacy`` prints.

:mod:`fl_app.privacy_audit.run` runs the attacks and writes ``audit.json``; this module
draws ``roc.png`` and ``inversion.png`` from the results and prints every number of
the document beside the run's theoretical ε.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.privacy_audit.inversion import InversionResult
from fl_app.privacy_audit.metrics import RocSummary

__all__ = ["eps_text", "inversion_plot", "print_audit", "roc_plot"]


def roc_plot(
    path: Path, loss: RocSummary, online: RocSummary, offline: RocSummary, theory: dict[str, Any]
) -> Path:
    """ROC curves of the three membership attacks, log-log, titled with the run's ε."""
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
    ax.set_title(f"membership inference ({eps_text(theory)})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def inversion_plot(path: Path, results: list[InversionResult]) -> Path:
    """True records beside their reconstructions, one row per protection (client data)."""
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


def eps_text(theory: dict[str, Any]) -> str:
    """The run's theoretical guarantee in words (client- and record-level)."""
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
    eps = eps_text(doc["theoretical"])
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
    one = doc.get("one_run")
    if one:
        acc = one["accounted_epsilon"]
        print(
            f"one-run audit ({one['canaries']} canaries, {one['guesses']} guesses, "
            f"{one['correct']} correct): epsilon >= {one['epsilon_lower_bound']:.3f} at "
            f"{one['confidence']:.0%} confidence, delta={one['delta']:g}   | accounted "
            f"epsilon {'none (no DP)' if acc is None else f'{acc:.3f}'}"
        )
        exp = one.get("exposure")
        if exp:
            print(
                f"  exposure of the inserted secret: {exp['exposure_bits']:.2f} bits of "
                f"{exp['max_exposure_bits']:.2f} (rank {exp['rank']} of {exp['candidates']})"
            )
    client = doc.get("client_one_run") or {}
    for view in ("released_model", "server_view") if client else ():
        b = client[view]
        acc = b["accounted_epsilon"]
        print(
            f"client canaries, {view.replace('_', ' ')} ({b['canaries']} canary clients, "
            f"{b['correct']}/{b['guesses']} correct): epsilon >= "
            f"{b['epsilon_lower_bound']:.3f} at {b['confidence']:.0%}   | compared with "
            f"{'nothing' if acc is None else f'epsilon {acc:.3f}'}"
        )
    print(f"wrote {out_dir / 'audit.json'} and {', '.join(doc['plots'])}")
