"""Cost of one DP-SGD step over a non-private step, per Opacus grad_sample_mode.

For each model (MLP on 8x8 digits, an MNIST-size MLP, the default SmallCNN on 28x28,
a ~1M-parameter SmallCNN on 32x32; random data) and each per-sample gradient mode,
the script times the very step :func:`fl_app.privacy.dpsgd.train_dpsgd` takes
(forward, backward, per-sample clipping, noise, SGD update, through its
``_PrivateTrainer``) against a plain step (forward, backward, SGD update) on the
same fixed batch of ``B`` examples (``q = 1``, so no batch-size variance).

Timing is paired: each round runs one step of every variant back to back, in an
order that rotates between rounds, and the DP/plain ratio is taken within the round;
the table shows the median and quartiles over rounds (the machine may be shared and
noisy: compare ratios from one run, not absolute times across runs). Rounds run
until the per-model time budget is spent (at least ``--min-rounds``).

Peak memory: the most tensor memory live at once during one step, counting
everything the step allocates (gradients are released before it starts), from
``torch.profiler`` allocation events on the CPU.

Usage::

    python scripts/bench_dpsgd.py            # ~2-4 minutes on 2 cores
    python scripts/bench_dpsgd.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.config.schema import ClientTrainConfig, ModelConfig, ModelName
from fl_app.models import build_model, count_parameters
from fl_app.privacy.dpsgd_opacus import _expected_opacus_warnings, _PrivateTrainer
from fl_app.privacy.dpsgd_settings import DpSgdSettings, GradSampleMode, resolve_grad_sample_mode
from fl_app.privacy.noise import SecureNoise
from fl_app.training import make_optimizer

MODES = [GradSampleMode.hooks.value, GradSampleMode.functorch.value, GradSampleMode.ghost.value]


@dataclass(frozen=True)
class Case:
    name: str
    model_cfg: ModelConfig
    input_shape: tuple[int, int, int]
    batch_size: int


CASES = [
    Case("MLP digits 8x8", ModelConfig(name=ModelName.mlp, hidden=[64]), (1, 8, 8), 64),
    Case("MLP 28x28", ModelConfig(name=ModelName.mlp, hidden=[256, 256]), (1, 28, 28), 256),
    Case("SmallCNN 28x28", ModelConfig(name=ModelName.cnn, channels=[16, 32]), (1, 28, 28), 256),
    Case(
        "CNN 32x32 ~1M",
        ModelConfig(name=ModelName.cnn, channels=[100, 200, 400], norm_groups=4),
        (3, 32, 32),
        128,
    ),
]


@dataclass
class Variant:
    step: Callable[[torch.Tensor, torch.Tensor], None]
    release: Callable[[], None]  # drop gradients, so a profiled step allocates them anew
    close: Callable[[], None] = lambda: None


def _plain_variant(model: nn.Module, cfg: ClientTrainConfig) -> Variant:
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    model.train()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    return Variant(step, lambda: opt.zero_grad(set_to_none=True))


def _dp_variant(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, cfg: ClientTrainConfig, mode: str
) -> Variant:
    dp = DpSgdSettings(1.0, 1.0, grad_sample_mode=GradSampleMode(mode))
    trainer = _PrivateTrainer(
        model,
        xb,
        yb,
        cfg,
        dp,
        mode,
        sampling_generator=None,
        noise_generator=None,
        # The default (secure_mode) noise source: a client-held ChaCha20 keystream.
        keystreams=(SecureNoise(), SecureNoise()),
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        trainer.step(x, y)

    return Variant(step, lambda: trainer.optimizer.zero_grad(set_to_none=True), trainer.close)


def _time_once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_step_bytes(variant: Variant, xb: torch.Tensor, yb: torch.Tensor) -> int:
    variant.release()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step(xb, yb)
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _fmt_ratio(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        return f"{med:.2f}x [{q1:.2f}-{q3:.2f}]"
    return f"{med:.2f}x"


def bench_case(
    case: Case, *, min_rounds: int, max_rounds: int, budget_s: float
) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    xb = torch.rand((case.batch_size, *case.input_shape), generator=gen)
    yb = torch.randint(0, 10, (case.batch_size,), generator=gen)
    cfg = ClientTrainConfig(local_epochs=1, batch_size=case.batch_size, lr=0.01, momentum=0.9)
    base = build_model(case.model_cfg, case.input_shape, 10, seed=0)
    n_params = count_parameters(base)
    # With the batch, as training resolves it (fl_app/privacy/dpsgd.py): a tiny model at
    # a small batch gets hooks (GHOST_MIN_ENTRIES), which the label must show.
    auto = resolve_grad_sample_mode(base, GradSampleMode.auto, batch_size=case.batch_size)

    variants = {"plain": _plain_variant(copy.deepcopy(base), cfg)}
    for mode in MODES:
        variants[mode] = _dp_variant(copy.deepcopy(base), xb, yb, cfg, mode)

    # Warm-up (first calls allocate and build vmap/autograd caches), then rounds: each
    # round times every variant once, back to back, in a rotating order, and the ratio
    # is taken within the round. Rounds continue until the case's time budget is spent.
    for v in variants.values():
        v.step(xb, yb)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
    t_start = time.perf_counter()
    r = 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() - t_start < budget_s):
        order = names[r % len(names) :] + names[: r % len(names)]
        this = {name: _time_once(functools.partial(variants[name].step, xb, yb)) for name in order}
        for name, t in this.items():
            times[name].append(t)
        for mode in MODES:
            ratios[mode].append(this[mode] / this["plain"])
        r += 1

    mem = {name: _peak_step_bytes(v, xb, yb) for name, v in variants.items()}
    for v in variants.values():
        v.close()

    rows: list[dict[str, object]] = []
    for mode in MODES:
        rows.append(
            {
                "model": case.name,
                "params": n_params,
                "batch": case.batch_size,
                "mode": mode + (" (auto)" if mode == auto else ""),
                "plain_ms": 1e3 * statistics.median(times["plain"]),
                "dp_ms": 1e3 * statistics.median(times[mode]),
                "ratio": _fmt_ratio(ratios[mode]),
                "rounds": r,
                "ratio_median": statistics.median(ratios[mode]),
                "plain_mb": mem["plain"] / 2**20,
                "dp_mb": mem[mode] / 2**20,
                "mem_ratio": mem[mode] / mem["plain"] if mem["plain"] else float("nan"),
            }
        )
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    head = (
        "| model | params | batch | mode | plain step (ms) | DP step (ms) | time ratio "
        "(median [quartiles]) | plain peak (MiB) | DP peak (MiB) | memory ratio |\n"
        "|---|---:|---:|---|---:|---:|---|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['mode']} | "
            f"{r['plain_ms']:.1f} | {r['dp_ms']:.1f} | {r['ratio']} | "
            f"{r['plain_mb']:.2f} | {r['dp_mb']:.2f} | {r['mem_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3-5 rounds a model (~1-2 min)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds of timing a model (default 60)"
    )
    parser.add_argument("--min-rounds", type=int, default=None, help="default 5 (quick: 3)")
    parser.add_argument("--max-rounds", type=int, default=None, help="default 41 (quick: 9)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1, as runtime.torch_threads gives each client)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (10.0 if args.quick else 60.0)
    min_rounds = args.min_rounds or (3 if args.quick else 5)
    max_rounds = args.max_rounds or (9 if args.quick else 41)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    t0 = time.perf_counter()
    with _expected_opacus_warnings():
        for case in CASES:
            t_case = time.perf_counter()
            rows += bench_case(case, min_rounds=min_rounds, max_rounds=max_rounds, budget_s=budget)
            print(f"# {case.name}: {time.perf_counter() - t_case:.0f} s", file=sys.stderr)
    table = to_markdown(rows)
    footer = (
        f"\n\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); time ratio: "
        "median [quartiles] over paired rounds (each round one step of every variant); "
        f"rounds per model: {', '.join(str(r['rounds']) for r in rows[:: len(MODES)])}; "
        f"memory: peak tensor bytes during one step (torch.profiler); "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    print(table + footer)
    if args.out:
        args.out.write_text(table + footer + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
