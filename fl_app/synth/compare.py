"""How far a sandbox result carries: the real run and the surrogate run, on real rows.

``fl-app synth --compare REAL_RUN SURROGATE_RUN`` reads two finished run directories of
the same experiment, one on the real data and one with ``dataset=synthetic``, and
evaluates both released models on the *real* run's held-out test set (rebuilt from its
config and seed, :func:`fl_app.data.load_server_test_set`). It reports

* ``real_on_real``: the real run's model on real test rows (what the study would find);
* ``surrogate_on_surrogate``: the surrogate run's model on the surrogate's own held-out
  rows (what a researcher in the sandbox sees, from its ``summary.json``);
* ``surrogate_on_real``: the surrogate run's model on real test rows (what the sandbox
  result is worth on real data).

The real test rows never reached the synthesizer when the surrogate was made from the
same config and seed (``fl-app synth`` with the real run's overrides leaves the server's
holdout out); with another seed they may have, and the comparison flatters the
surrogate. Run by the data custodian (it needs the real test rows); the numbers it
prints are aggregate accuracies, nothing per record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from fl_app.synth.mechanism import SynthError

__all__ = ["compare_markdown", "compare_runs"]


def _load(run_dir: Path) -> tuple[Any, dict[str, Any], Any]:
    from fl_app.config.compose import to_app_config
    from fl_app.models import build_model
    from fl_app.server.layout import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
    from fl_app.weights import load_ndarrays, load_safetensors

    for name in (CONFIG_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise SynthError(f"{run_dir / name} is missing: compare two finished run directories")
    cfg = to_app_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    model_path = run_dir / str(summary.get("model_file") or MODEL_FILE)
    if not model_path.is_file():
        raise SynthError(f"{model_path} is missing: the run released no model")
    expected = summary.get("model_sha256")
    if expected is not None and hashlib.sha256(model_path.read_bytes()).hexdigest() != expected:
        raise SynthError(f"{model_path} does not hash to its summary.json model_sha256")
    arrays, _ = load_safetensors(model_path)
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    _refuse_body_only(run_dir, cfg, model)
    load_ndarrays(model, arrays)
    model.eval()
    return cfg, summary, model


def _refuse_body_only(run_dir: Path, cfg: Any, model: Any) -> None:
    """A run whose sites kept layers (``share.layers``) released no full model to score:
    filling the kept layers with initial values would compare a model nobody holds."""
    from fl_app.share_layers import split_shared

    _shared, kept = split_shared(model.state_dict(), list(cfg.share.layers))
    if kept:
        raise SynthError(
            f"{run_dir} ran with share.layers={list(cfg.share.layers)}: the sites kept "
            f"{sorted(kept)}, so its released model is partial and cannot be scored on the "
            "test set; compare runs with share.layers=['*'] (share=all)"
        )


def _accuracy(model: Any, cfg: Any) -> tuple[float, int]:
    from fl_app.data import load_server_test_set
    from fl_app.training import evaluate

    test = load_server_test_set(cfg.dataset, cfg.seed)
    if test is None or len(test.y) == 0:
        raise SynthError(
            f"the run's dataset ({cfg.dataset.kind.value}) leaves no server test set: compare "
            "runs with dataset.test_fraction > 0"
        )
    stats = evaluate(model, test.x, test.y)
    return float(stats.accuracy), int(stats.num_examples)


def compare_runs(real_dir: Path, surrogate_dir: Path) -> dict[str, Any]:
    """The three accuracies of the module docstring, and what each run was."""
    from fl_app.config.schema import DatasetKind

    real_cfg, _, real_model = _load(real_dir)
    sur_cfg, _, sur_model = _load(surrogate_dir)
    if real_cfg.dataset.kind is DatasetKind.synthetic:
        raise SynthError(f"{real_dir} ran on a surrogate: give the real-data run first")
    if sur_cfg.dataset.kind is not DatasetKind.synthetic:
        raise SynthError(f"{surrogate_dir} did not run with dataset=synthetic")
    real_acc, n_real = _accuracy(real_model, real_cfg)
    sur_own, n_sur = _accuracy(sur_model, sur_cfg)
    sur_real, _ = _accuracy(sur_model, real_cfg)
    from fl_app.data.synthetic import read_card

    card = read_card(str(sur_cfg.dataset.synthetic_path))
    return {
        "real_run": str(real_dir),
        "surrogate_run": str(surrogate_dir),
        "surrogate": {
            "release_id": card.get("release_id"),
            "epsilon": card.get("privacy", {}).get("epsilon"),
            "delta": card.get("privacy", {}).get("delta"),
            "synthesizer": card.get("method", {}).get("synthesizer"),
            "levels": card.get("preprocessing", {}).get("levels"),
        },
        "real_test_rows": n_real,
        "surrogate_test_rows": n_sur,
        "accuracy": {
            "real_on_real": real_acc,
            "surrogate_on_surrogate": sur_own,
            "surrogate_on_real": sur_real,
        },
        "gap_real_minus_surrogate_on_real": real_acc - sur_real,
    }


def compare_markdown(doc: dict[str, Any]) -> str:
    acc, s = doc["accuracy"], doc["surrogate"]
    return "\n".join(
        [
            f"surrogate {s['release_id']}: {s['synthesizer']}, epsilon {s['epsilon']}, "
            f"delta {s['delta']}, {s['levels']} levels",
            "",
            "| model | test rows | accuracy |",
            "|---|---|---|",
            f"| real run, real test set | {doc['real_test_rows']} | {acc['real_on_real']:.3f} |",
            f"| surrogate run, surrogate test set (the sandbox's view) | "
            f"{doc['surrogate_test_rows']} | {acc['surrogate_on_surrogate']:.3f} |",
            f"| surrogate run, real test set | {doc['real_test_rows']} | "
            f"{acc['surrogate_on_real']:.3f} |",
            "",
        ]
    )
