"""``summary.json``'s ``fairness`` block and the server's per-class evaluation.

Two kinds of fairness indicator (pure math: :mod:`fl_app.fairness`):

* **per class**, on the server's own held-out test set: the final model's accuracy on
  each true class and the worst class. The test set is the server's and the model is
  what the run releases, so this is post-processing of the release: allowed under every
  threat model, reported whenever ``server_eval=true`` (per round too, in
  ``metrics.jsonl`` as ``server_class_accuracy_<c>`` and ``server_worst_class_accuracy``).
* **per site**, from federated evaluation: each site's accuracy on its own validation
  split (the mean over sites, std, range, the worst site), from the last round that
  evaluated. A per-site accuracy is an un-noised function of that site's data, covered
  by no ε. It is reported only where the threat model already lets the server see
  each client's numbers (``none``, ``trusted_server`` without secure aggregation,
  local DP or DP-SGD); elsewhere federated evaluation never runs
  (:func:`~fl_app.config.validate_privacy.check_metrics_stay_hidden`) and the block
  says ``"withheld: <the setting that hides them>"``. A secure-aggregation sum of
  correct/total counts would give the mean over sites but neither the spread nor the
  worst site; it is not implemented, so nothing per site is reported there.

Per-site numbers stay in the run directory (the operator's): the export's restricted
tier drops every ``*site*`` metric and the public tier has none (docs/architecture.md,
Fairness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fl_app.config.schema import AppConfig, federated_eval_interval
from fl_app.config.validate_privacy import evaluation_hidden_reason
from fl_app.fairness import class_accuracy, site_spread, worst_class

__all__ = [
    "CLASS_ACCURACY_PREFIX",
    "WORST_CLASS_ACCURACY",
    "class_metrics",
    "fairness_summary",
    "per_class_summary",
    "per_site_summary",
]


class _EvalStage(Protocol):
    """What this module reads of an evaluate stage (strategies.driver_types.StageReport;
    structural, so the run-directory side imports nothing of the round driver here)."""

    @property
    def client_eval(self) -> Mapping[int, tuple[float, float]]: ...


class _Round(Protocol):
    @property
    def server_round(self) -> int: ...
    @property
    def evaluate(self) -> _EvalStage | None: ...
    @property
    def server_metrics(self) -> Mapping[str, float]: ...


class _Result(Protocol):
    """strategies.driver_types.DriverResult, as far as the fairness block reads it."""

    @property
    def reports(self) -> Sequence[_Round]: ...
    @property
    def initial_server_metrics(self) -> Mapping[str, float]: ...


#: Server-metric keys of the per-class evaluation (``metrics.jsonl``: ``server_`` + key
#: with ``_`` for ``-``).
CLASS_ACCURACY_PREFIX = "class-accuracy-"
WORST_CLASS_ACCURACY = "worst-class-accuracy"


def class_metrics(model: Any, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    """The model's per-class accuracy on ``(x, y)`` as server metrics.

    ``class-accuracy-<c>`` for each class with an example (a class without one has no
    key) and ``worst-class-accuracy``. One forward pass in eval mode, batch by batch;
    the model's train/eval mode is restored.
    """
    import torch

    from fl_app.training import as_tensors

    xt, _ = as_tensors(x, y, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            preds = [model(xt[i : i + 256]).argmax(dim=1).cpu() for i in range(0, len(xt), 256)]
    finally:
        model.train(was_training)
    predicted = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    per_class = class_accuracy(np.asarray(y), predicted, num_classes)
    out = {f"{CLASS_ACCURACY_PREFIX}{c}": a for c, a in enumerate(per_class) if a is not None}
    worst = worst_class(per_class)
    if worst is not None:
        out[WORST_CLASS_ACCURACY] = worst[1]
    return out


def per_class_summary(cfg: AppConfig, result: _Result) -> dict[str, Any] | str:
    """The final model's accuracy per class on the server's test set, or why there is none."""
    if not cfg.server_eval:
        return "not measured: server_eval=false (set server_eval=true to evaluate per class)"
    last = result.reports[-1] if result.reports else None
    metrics = last.server_metrics if last is not None else result.initial_server_metrics
    per_class = _per_class_from(metrics, cfg.dataset.num_classes)
    worst = worst_class(per_class)
    if worst is None:
        return "not measured: no per-class server evaluation recorded"
    return {
        "source": "the server's held-out test set (dataset.test_fraction), final model",
        "round": last.server_round if last is not None else 0,
        "accuracy": per_class,
        "worst_class": worst[0],
        "worst_accuracy": worst[1],
        "range": max(a for a in per_class if a is not None) - worst[1],
    }


def _per_class_from(metrics: Mapping[str, float], num_classes: int) -> list[float | None]:
    found = [metrics.get(f"{CLASS_ACCURACY_PREFIX}{c}") for c in range(num_classes)]
    return [None if a is None else float(a) for a in found]


def per_site_summary(cfg: AppConfig, result: _Result) -> dict[str, Any] | str:
    """Each site's accuracy from the last round that evaluated, or why there is none.

    Sites are named ``node-<node id>``: the server knows no other name for them, and
    only where it may see every client's numbers anyway.
    """
    hidden = evaluation_hidden_reason(cfg)
    if hidden is not None:
        return (
            f"withheld: under {hidden} the server must not see any client's un-noised "
            "numbers, and a site's accuracy is one (federated evaluation is off; a "
            "secure sum would give the mean over sites only)"
        )
    if federated_eval_interval(cfg) == 0 or cfg.strategy.fraction_evaluate == 0:
        return (
            "not measured: federated evaluation is off (set federated_eval_every >= 1 and "
            "strategy.fraction_evaluate > 0)"
        )
    for report in reversed(result.reports):
        if report.evaluate is not None and report.evaluate.client_eval:
            sites = {f"node-{n}": v for n, v in sorted(report.evaluate.client_eval.items())}
            spread = site_spread({site: acc for site, (acc, _) in sites.items()})
            return {
                "source": "federated evaluation: each site's validation split",
                "round": report.server_round,
                "weighting": "unweighted: each site counts once",
                **spread.as_dict(),
                "accuracy": {site: acc for site, (acc, _) in sites.items()},
                "examples": {site: int(n) for site, (_, n) in sites.items()},
            }
    return "not measured: no federated evaluation reply was accepted"


def fairness_summary(cfg: AppConfig, result: _Result) -> dict[str, Any]:
    """``summary.json``'s ``fairness`` block: ``per_site`` and ``per_class``, each a
    block of numbers or a string saying why it is withheld or not measured."""
    return {
        "per_site": per_site_summary(cfg, result),
        "per_class": per_class_summary(cfg, result),
        "note": "per-site accuracies are un-noised functions of each site's data, covered "
        "by no epsilon: reported only where the threat model lets the server see each "
        "client's numbers, and never exported; per-class accuracy is the released model "
        "on the server's own test set",
    }
