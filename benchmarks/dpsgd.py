"""DP-SGD step time and peak memory vs the non-private step, per model and grad-sample mode.

Reuses ``scripts/bench_dpsgd.py``: for each model it times fl-app's real DP-SGD step
(:class:`fl_app.privacy.dpsgd_opacus._PrivateTrainer`: forward, backward with per-sample
gradients, per-sample clipping, noise, SGD update) in each Opacus grad-sample mode
against a plain step on the same fixed batch, one step of every variant per paired
round in a rotating order, the ratio taken within each round; peak memory is the
most tensor memory live during one step (``torch.profiler``). One torch thread, as
each simulated client gets.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.reuse import load_script
from benchmarks.section import Section, time_left

__all__ = ["run"]

# Seconds of paired timing per model (full run); the runner's deadline can shorten it.
FULL_BUDGET_S = 15.0
QUICK_BUDGET_S = 2.0


def run(quick: bool) -> Section:
    import torch

    bench = load_script("bench_dpsgd")
    from fl_app.privacy.dpsgd_opacus import _expected_opacus_warnings

    torch.set_num_threads(1)
    # MLP digits, MLP 28x28, SmallCNN 28x28, CNN 32x32 ~1M (quick: one MLP, one CNN).
    cases = [bench.CASES[0], bench.CASES[2]] if quick else list(bench.CASES)
    # 4 rounds at least: quartiles need 4 ratios (the ~1M CNN's round takes ~15-20 s).
    min_rounds, max_rounds = (2, 3) if quick else (4, 41)
    rows: list[list[str]] = []
    data: list[dict[str, object]] = []
    t0 = time.perf_counter()
    with _expected_opacus_warnings():
        for i, case in enumerate(cases):
            # Leave each remaining model a fair share of the time left.
            share = time_left(1e9) / (len(cases) - i) / 3
            budget = min(QUICK_BUDGET_S if quick else FULL_BUDGET_S, max(1.0, share))
            for r in bench.bench_case(
                case, min_rounds=min_rounds, max_rounds=max_rounds, budget_s=budget
            ):
                data.append(r)
                rows.append(
                    [
                        str(r["model"]),
                        f"{r['params']:,}",
                        str(r["batch"]),
                        str(r["mode"]),
                        f"{r['plain_ms']:.1f}",
                        f"{r['dp_ms']:.1f}",
                        str(r["ratio"]),
                        f"{r['plain_mb']:.2f}",
                        f"{r['dp_mb']:.2f}",
                        f"{r['mem_ratio']:.1f}x",
                        str(r["rounds"]),
                    ]
                )
    best: dict[str, tuple[str, float]] = {}
    for r in data:
        model = str(r["model"])
        ratio = float(str(r["ratio_median"]))
        if model not in best or ratio < best[model][1]:
            best[model] = (str(r["mode"]), ratio)
    fastest = "; ".join(f"{m}: {mode} {ratio:.2f}x" for m, (mode, ratio) in best.items())
    return Section(
        title="DP-SGD step vs non-private step (per model and grad-sample mode)",
        columns=[
            "model",
            "params",
            "batch",
            "mode",
            "plain step ms",
            "DP step ms",
            "time ratio [quartiles]",
            "plain peak MiB",
            "DP peak MiB",
            "memory ratio",
            "paired rounds",
        ],
        rows=rows,
        notes=[
            f"Fastest DP mode per model (median ratio): {fastest}. `(auto)` marks the mode "
            "`grad_sample_mode=auto` picks.",
            "What bounds them: Opacus' fixed per-step Python cost on tiny models (the MLP on "
            "8x8 digits); per-sample gradients, batch x params of memory traffic, for hooks "
            "and functorch (hence 37x-260x memory on MLPs); for ghost, the forward pass, one "
            "backward pass towards activations and the per-layer norms and clipped sums "
            "(fl_app.privacy.ghost_norms: per Conv2d the Gram trick or per-sample gradients, "
            "whichever costs less time; GroupNorm/LayerNorm from their small per-sample "
            "gradients).",
            f"torch {torch.__version__}, 1 thread; random data, q = 1 (fixed batch); "
            f"up to {QUICK_BUDGET_S if quick else FULL_BUDGET_S:.0f} s of paired rounds per "
            f"model; section timing {time.perf_counter() - t0:.0f} s. Medians over "
            f"{statistics.median([int(str(r['rounds'])) for r in data]):.0f} paired rounds "
            "(median across models).",
        ],
        data={"rows": data},
    )
