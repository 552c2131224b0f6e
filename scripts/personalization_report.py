"""Per-site accuracy of the personalized model beside the global model's (docs/personalization.md).

For each Dirichlet alpha and seed, two in-process runs of ``experiment=digits_personalized``:
``share=all`` (FedAvg, one global model) and ``share=body`` (FedPer: the first layer is
averaged, each site keeps its head). Each site's validation split is then scored with the
model that site would use: the global model, or the final global body with that site's own
head read from the run's ``client-state/`` (the file its ClientApp wrote). Prints a
markdown table per alpha and the mean over sites and seeds.

    .venv/bin/python scripts/personalization_report.py --alphas 0.1 1.0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fl_app.client.app import app as client_app
from fl_app.client.personal import kept_layers_path
from fl_app.config.compose import compose_config
from fl_app.data import load_client_data
from fl_app.models import build_model
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import initial_model, run_experiment
from fl_app.server.layout import RunLayout
from fl_app.training import evaluate
from fl_app.weights import load_ndarrays, load_safetensors


def site_accuracies(run_dir: Path, overrides: list[str]) -> list[float]:
    """Each site's validation accuracy with the model it uses after the run."""
    cfg = compose_config("config", overrides)
    layout = RunLayout(run_dir)
    run_key = json.loads(layout.run_manifest.read_text())["run_key"]
    shared, _meta = load_safetensors(layout.model)
    base = initial_model(cfg)
    out = []
    n = cfg.dataset.num_partitions
    for pid in range(n):
        arrays = {**base, **shared}
        path = kept_layers_path(layout.client_state, run_key, f"partition-{pid}")
        if path.exists():
            kept, _ = load_safetensors(path)
            arrays.update(kept)
        model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
        load_ndarrays(model, {k: arrays[k] for k in base})
        data = load_client_data(cfg.dataset, pid, n, cfg.seed)
        out.append(float(evaluate(model, data.val.x, data.val.y).accuracy))
    return out


def run(overrides: list[str], out: Path) -> list[float]:
    cfg = compose_config("config", overrides)
    grid = InProcessGrid(client_app, cfg.dataset.num_partitions, seed=cfg.seed)
    try:
        run_experiment(grid, cfg, out, progress=False)
    finally:
        grid.close()
    return site_accuracies(out, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in args.alphas:
            rows: dict[str, list[list[float]]] = {"all": [], "body": []}
            for seed in args.seeds:
                for share in rows:
                    overrides = [
                        "experiment=digits_personalized",
                        f"share={share}",
                        "runtime=inprocess",
                        f"seed={seed}",
                        f"num_rounds={args.rounds}",
                        f"dataset.dirichlet_alpha={alpha}",
                    ]
                    rows[share].append(run(overrides, Path(tmp) / f"{alpha}-{seed}-{share}"))
            print(f"\n### Dirichlet alpha = {alpha:g} (validation accuracy per site)\n")
            sites = len(rows["all"][0])
            print("| seed | model | " + " | ".join(f"site {i}" for i in range(sites)) + " | mean |")
            print("|---|---|" + "---|" * (sites + 1))
            for i, seed in enumerate(args.seeds):
                for share, label in (("all", "global (FedAvg)"), ("body", "personalized")):
                    acc = rows[share][i]
                    cells = " | ".join(f"{a:.2f}" for a in acc)
                    print(f"| {seed} | {label} | {cells} | {statistics.mean(acc):.3f} |")
            for share in rows:
                flat = [a for accs in rows[share] for a in accs]
                worst = statistics.mean(min(accs) for accs in rows[share])
                print(
                    f"\n{share}: mean over sites and seeds {statistics.mean(flat):.3f}, "
                    f"worst site (mean over seeds) {worst:.3f}"
                )


if __name__ == "__main__":
    main()
