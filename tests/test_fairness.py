"""Fairness indicators (issue 20): per-site and per-class accuracy, and when per-site
numbers are withheld.

The end-to-end test recomputes every number of ``summary.json``'s ``fairness`` block
from the saved model (``model.safetensors``, read with safetensors' numpy API, forward
pass in numpy) and the partitions (scored with scikit-learn), never through the code
under test. The unit tests pin the math to values worked out by hand.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.metrics import accuracy_score, recall_score

from fl_app.client.app import app as client_app
from fl_app.config.compose import compose_config
from fl_app.data import load_client_data, load_server_test_set
from fl_app.fairness import class_accuracy, site_spread, worst_class
from fl_app.release.redact import aggregate_metrics
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import run_experiment
from fl_app.server.fairness import (
    class_metrics,
    fairness_summary,
    per_class_summary,
    per_site_summary,
)
from strategies.driver_types import DriverResult, RoundReport, StageReport
from strategies.site_eval import site_accuracies
from strategies.validation import EvalReply

FAST = ["runtime=inprocess", "dataset.num_partitions=3", "train.local_epochs=1"]


# ---- the math, by hand ---------------------------------------------------------------


def test_site_spread_is_the_unweighted_mean_population_std_range_and_worst_site() -> None:
    s = site_spread({"b": 1.0, "a": 0.5, "c": 0.75})
    assert s.mean == pytest.approx(0.75)
    # deviations 0.25, -0.25, 0: population variance 0.125 / 3
    assert s.std == pytest.approx(math.sqrt(0.125 / 3))
    assert s.range == pytest.approx(0.5)
    assert (s.worst_site, s.worst_accuracy, s.sites) == ("a", 0.5, 3)
    one = site_spread({"only": 0.25})
    assert (one.mean, one.std, one.range, one.worst_site) == (0.25, 0.0, 0.0, "only")


def test_site_spread_breaks_ties_by_name_and_refuses_bad_input() -> None:
    assert site_spread({"z": 0.5, "m": 0.5, "q": 0.9}).worst_site == "m"
    with pytest.raises(ValueError, match=r"^site_spread needs at least one site.s accuracy"):
        site_spread({})
    assert site_spread({"zero": 0.0, "one": 1.0}).worst_accuracy == 0.0  # both ends valid
    for bad in (float("nan"), 1.5, -0.1):
        with pytest.raises(ValueError, match="site 'x'"):
            site_spread({"x": bad})


def test_class_accuracy_is_per_class_recall_and_none_without_examples() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0, 0])
    # class 0: 1 of 2; class 1: 2 of 3; class 2: 0 of 1; class 3: no example.
    assert class_accuracy(labels, preds, 4) == [0.5, pytest.approx(2 / 3), 0.0, None]
    assert worst_class([0.5, 0.9, None, 0.5]) == (0, 0.5)
    assert worst_class([None, None]) is None
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        class_accuracy(np.array([0, 2]), np.array([0, 0]), 2)
    with pytest.raises(ValueError, match="one length"):
        class_accuracy(np.array([0, 1]), np.array([0]), 2)
    assert class_accuracy(np.array([0, 0]), np.array([0, 0]), 1) == [1.0]  # one class is valid
    with pytest.raises(ValueError, match=r"^num_classes must be >= 1, found 0$"):
        class_accuracy(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 0)


def test_driver_keeps_each_valid_evaluate_reply_and_leaves_out_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies = [
        EvalReply(11, 30.0, {"eval-accuracy": 0.8, "eval-loss": 0.5}),
        EvalReply(12, 10.0, {"eval-accuracy": 1.5}),
        EvalReply(13, 5.0, {"eval-loss": 0.1}),
        EvalReply(14, 7.0, {"eval-accuracy": 0.0}),
        EvalReply(15, 2.0, {"eval-accuracy": 1.0}),
    ]
    assert site_accuracies(replies, 3) == {11: (0.8, 30.0), 14: (0.0, 7.0), 15: (1.0, 2.0)}
    assert (
        "round 3 evaluate: node 12's eval-accuracy 1.5 is not in [0, 1]: left out of the "
        "per-site accuracies" in caplog.text
    )
    assert "node 13's eval-accuracy None" in caplog.text


def test_round_record_has_the_site_spread_and_the_export_drops_it() -> None:
    evaluate = StageReport(sampled=2, accepted=2, client_eval={7: (0.6, 10.0), 9: (0.9, 30.0)})
    report = RoundReport(1, StageReport(), evaluate, True, server_metrics={"accuracy": 0.7})
    rec = report.to_record()
    assert rec["fed_site_accuracy_mean"] == pytest.approx(0.75)
    assert rec["fed_site_accuracy_std"] == pytest.approx(0.15)
    assert rec["fed_site_accuracy_range"] == pytest.approx(0.3)
    assert rec["fed_site_accuracy_min"] == pytest.approx(0.6)
    exported = json.loads(aggregate_metrics([rec], set()))
    assert "server_accuracy" in exported
    assert not [k for k in exported if "site" in k]


# ---- who may see per-site numbers ------------------------------------------------------

HIDDEN = {
    "secagg": (["secagg=secaggplus", "secagg.clip=5.0"], "secagg=secaggplus"),
    "honest_but_curious": (
        [
            "privacy=central",
            "privacy.threat_model=honest_but_curious",
            "privacy.clip_side=client",
            "secagg=secaggplus",
        ],
        "privacy.threat_model=honest_but_curious",
    ),
    "distributed_dp": (
        ["privacy=distributed", "secagg=secaggplus", "secagg.bits=16"],
        "privacy.threat_model=distributed_dp",
    ),
    "local": (["privacy=local"], "privacy.mode=local"),
    "dpsgd": (
        ["privacy.record_level=true", "privacy.dpsgd.noise_multiplier=1.0"],
        "privacy.record_level=true",
    ),
}


def _evaluated_result() -> DriverResult:
    evaluate = StageReport(client_eval={5: (0.5, 10.0), 3: (0.75, 20.0)})
    metrics = {"accuracy": 0.6, "class-accuracy-0": 0.9, "class-accuracy-1": 0.4}
    report = RoundReport(2, StageReport(), evaluate, True, server_metrics=metrics)
    return DriverResult(arrays={}, reports=[report])


@pytest.mark.parametrize("name", list(HIDDEN))
def test_per_site_accuracy_is_withheld_where_the_server_may_not_see_client_numbers(
    name: str,
) -> None:
    overrides, why = HIDDEN[name]
    cfg = compose_config("config", [*FAST, *overrides])
    # Even if the result held per-site numbers, the block would not show them.
    per_site = per_site_summary(cfg, _evaluated_result())
    assert isinstance(per_site, str) and per_site.startswith("withheld: ")
    assert why in per_site
    assert per_site.endswith(
        "the server must not see any client's un-noised numbers, and a site's accuracy is "
        "one (federated evaluation is off; a secure sum would give the mean over sites only)"
    )
    # Per class stays: the released model on the server's own test set.
    assert isinstance(per_class_summary(cfg, _evaluated_result()), dict)


def test_per_site_accuracy_is_shown_under_trusted_server_and_not_measured_when_off() -> None:
    cfg = compose_config("config", [*FAST, "privacy=central"])
    block = per_site_summary(cfg, _evaluated_result())
    assert isinstance(block, dict)
    assert block["accuracy"] == {"node-3": 0.75, "node-5": 0.5}
    assert block["examples"] == {"node-3": 20, "node-5": 10}
    assert (block["worst_site"], block["worst_accuracy"], block["round"]) == ("node-5", 0.5, 2)
    assert block["mean"] == pytest.approx(0.625) and block["range"] == pytest.approx(0.25)
    per_class = per_class_summary(cfg, _evaluated_result())
    assert isinstance(per_class, dict)
    assert per_class["accuracy"] == [0.9, 0.4] + [None] * 8
    assert (per_class["worst_class"], per_class["worst_accuracy"]) == (1, 0.4)
    assert per_class["range"] == pytest.approx(0.5) and per_class["round"] == 2
    off = compose_config("config", [*FAST, "federated_eval_every=0"])
    assert per_site_summary(off, _evaluated_result()) == (
        "not measured: federated evaluation is off (set federated_eval_every >= 1 and "
        "strategy.fraction_evaluate > 0)"
    )
    no_eval = compose_config("config", [*FAST, "server_eval=false"])
    assert per_class_summary(no_eval, _evaluated_result()) == (
        "not measured: server_eval=false (set server_eval=true to evaluate per class)"
    )


def test_summary_blocks_take_the_last_evaluated_round_and_name_their_source() -> None:
    cfg = compose_config("config", FAST)
    earlier = RoundReport(1, StageReport(), StageReport(client_eval={4: (0.25, 8.0)}), True)
    # Round 2 evaluated but accepted no reply: round 1's numbers are the last per-site ones.
    last = RoundReport(2, StageReport(), StageReport(), True, server_metrics={"accuracy": 0.5})
    result = DriverResult(arrays={}, reports=[earlier, last])
    block = fairness_summary(cfg, result)
    site = block["per_site"]
    assert (site["round"], site["accuracy"], site["examples"]) == (
        1,
        {"node-4": 0.25},
        {"node-4": 8},
    )
    assert site["source"] == "federated evaluation: each site's validation split"
    assert site["weighting"] == "unweighted: each site counts once"
    assert block["per_class"] == "not measured: no per-class server evaluation recorded"
    assert block["note"].startswith("per-site accuracies are un-noised functions of each site")
    assert (
        "covered by no epsilon: reported only where the threat model lets the server"
        in (block["note"])
    )
    assert block["note"].endswith(
        "per-class accuracy is the released model on the server's own test set"
    )
    none = DriverResult(arrays={}, reports=[RoundReport(1, StageReport(), None, True)])
    assert per_site_summary(cfg, none) == "not measured: no federated evaluation reply was accepted"
    # Stopped before round 1: the initial model's per-class evaluation, round 0.
    initial = DriverResult(arrays={}, reports=[], initial_server_metrics={"class-accuracy-3": 0.5})
    per_class = per_class_summary(cfg, initial)
    assert isinstance(per_class, dict)
    assert (per_class["round"], per_class["worst_class"], per_class["range"]) == (3 - 3, 3, 0.0)
    assert (
        per_class["source"] == "the server's held-out test set (dataset.test_fraction), final model"
    )


def test_class_metrics_of_an_empty_test_set_is_empty() -> None:
    import torch

    linear = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), linear)
    empty_x = np.zeros((0, 1, 2, 2), dtype=np.float32)
    assert class_metrics(model, empty_x, np.zeros(0, dtype=np.int64), 3) == {}
    x = np.zeros((2, 1, 2, 2), dtype=np.float32)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))  # always predicts class 1
    out = class_metrics(model, x, np.array([1, 2]), 3)
    assert out == {"class-accuracy-1": 1.0, "class-accuracy-2": 0.0, "worst-class-accuracy": 0.0}
    assert model.training  # mode restored


# ---- end to end: the numbers are the saved model's on the partitions ----------------------


def _logits(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The MLP (Flatten -> Linear -> ReLU -> Linear) in numpy, float64."""
    h = x.reshape(len(x), -1).astype(np.float64)
    h = np.maximum(h @ weights["net.1.weight"].T.astype(np.float64) + weights["net.1.bias"], 0.0)
    return h @ weights["net.3.weight"].T.astype(np.float64) + weights["net.3.bias"]


def test_fairness_numbers_equal_a_recomputation_from_the_saved_model_and_partitions(
    tmp_path: Path,
) -> None:
    cfg = compose_config("config", [*FAST, "num_rounds=2", "model.hidden=[16]"])
    grid = InProcessGrid(client_app, 3, seed=cfg.seed)
    try:
        summary: dict[str, Any] = run_experiment(grid, cfg, tmp_path, progress=False)
        partition = {n: int(grid.context(n).node_config["partition-id"]) for n in grid.node_ids}
    finally:
        grid.close()
    weights = load_file(str(tmp_path / summary["model_file"]))
    fairness = summary["fairness"]

    site = fairness["per_site"]
    assert site["round"] == 2 and site["sites"] == 3
    expected = {}
    for node, pid in partition.items():
        val = load_client_data(cfg.dataset, pid, 3, cfg.seed).val
        expected[f"node-{node}"] = accuracy_score(val.y, _logits(weights, val.x).argmax(axis=1))
        assert site["examples"][f"node-{node}"] == len(val.y)
    assert site["accuracy"] == pytest.approx(expected)
    values = np.array(list(expected.values()))
    assert site["mean"] == pytest.approx(values.mean())
    assert site["std"] == pytest.approx(values.std())
    assert site["range"] == pytest.approx(values.max() - values.min())
    assert site["worst_accuracy"] == pytest.approx(values.min())
    assert expected[site["worst_site"]] == pytest.approx(values.min())

    test = load_server_test_set(cfg.dataset, cfg.seed)
    assert test is not None
    per_class = recall_score(
        test.y, _logits(weights, test.x).argmax(axis=1), labels=list(range(10)), average=None
    )
    got = fairness["per_class"]
    assert got["round"] == 2
    assert got["accuracy"] == pytest.approx(list(per_class))
    assert got["worst_class"] == int(np.argmin(per_class))
    assert got["worst_accuracy"] == pytest.approx(per_class.min())
    # Per round too: the last line of metrics.jsonl is the final model's.
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["server_worst_class_accuracy"] == pytest.approx(per_class.min())
    assert last["server_class_accuracy_0"] == pytest.approx(per_class[0])
    assert last["fed_site_accuracy_min"] == pytest.approx(values.min())


# ---- fl-app report: per job, and DP's disparate impact ------------------------------------


def _summary(accuracy: float, eps: float | None, site: Any, worst_class_acc: float) -> dict:
    return {
        "status": "completed",
        "accuracy": accuracy,
        "privacy": {"epsilon": eps, "delta": 1e-5 if eps else None},
        "fairness": {
            "per_site": site,
            "per_class": {"worst_class": 8, "worst_accuracy": worst_class_acc},
        },
    }


def _site(worst: float) -> dict[str, float]:
    return {"mean": 0.8, "std": 0.1, "range": 0.3, "worst_accuracy": worst}


def test_report_shows_fairness_per_job_and_dp_disparate_impact(tmp_path: Path) -> None:
    from fl_app.cli.report import report_main
    from fl_app.release.fairness_report import disparate_impact, job_fairness
    from fl_app.release.report import collect_jobs

    jobs_spec = {
        "0": (["privacy=none", "seed=1"], _summary(0.9, None, _site(0.8), 0.7)),
        "1": (["privacy=central", "seed=1"], _summary(0.8, 2.0, _site(0.5), 0.3)),
        "2": (["privacy=dpsgd", "seed=1"], _summary(0.85, 8.0, "withheld: under x", 0.6)),
    }
    for name, (overrides, summary) in jobs_spec.items():
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (job / "summary.json").write_text(json.dumps(summary))
    jobs = collect_jobs(tmp_path)
    assert job_fairness(jobs[2].fairness).per_site_status == "withheld: under x"
    impact = disparate_impact(jobs)
    assert [(i.job, i.baseline, i.epsilon) for i in impact] == [("1", "0", 2.0), ("2", "0", 8.0)]
    # Drops against job 0: overall 0.9-0.8, worst class 0.7-0.3, worst site 0.8-0.5.
    assert impact[0].accuracy_drop == pytest.approx(0.1)
    assert impact[0].worst_class_drop == pytest.approx(0.4)
    assert impact[0].worst_site_drop == pytest.approx(0.3)
    assert impact[1].worst_class_drop == pytest.approx(0.1)
    assert impact[1].worst_site_drop is None  # withheld in the DP-SGD job
    assert report_main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Fairness" in md and "withheld: under x" in md and "disparate impact" in md
    assert (tmp_path / "fairness_vs_dp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "fairness.csv").open() as fh:
        rows = {r["job"]: r for r in csv.DictReader(fh)}
    assert rows["1"]["worst_site_accuracy"] == "0.5" and rows["1"]["worst_class"] == "8"
    assert rows["2"]["worst_site_accuracy"] == ""
