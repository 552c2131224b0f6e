"""DP-SGD step cost with client-held keystream randomness vs seeded torch generators.

For each model of ``scripts/bench_dpsgd.py`` (its per-sample gradient mode chosen by
``auto``), times the very step :func:`fl_app.privacy.dpsgd.train_dpsgd` takes with
noise from a ChaCha20 keystream (``secure_mode=True``, the default: one vectorised
float32 Box-Muller draw per step) against the same step with Opacus' noise from a
seeded ``torch.Generator`` (``secure_mode=False``, the code before keystreams), on
one fixed batch, paired round by round in rotating order; the ratio is taken within
each round. Also times one Poisson batch draw over ``N`` records: the keystream
sampler against Opacus' ``UniformWithReplacementSampler``.

Usage::

    python scripts/bench_dpsgd_noise.py            # ~1-2 minutes on 2 cores
    python scripts/bench_dpsgd_noise.py --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fl_app.config.schema import ClientTrainConfig
from fl_app.models import build_model, count_parameters
from fl_app.privacy.dpsgd_opacus import (
    KeystreamPoissonSampler,
    _expected_opacus_warnings,
    _PrivateTrainer,
)
from fl_app.privacy.dpsgd_settings import DpSgdSettings, GradSampleMode, resolve_grad_sample_mode
from fl_app.privacy.noise import SecureNoise
from scripts.bench_dpsgd import CASES


def _trainer(model: torch.nn.Module, xb, yb, cfg, mode: str, secure: bool) -> _PrivateTrainer:
    return _PrivateTrainer(
        model,
        xb,
        yb,
        cfg,
        DpSgdSettings(1.0, 1.0, grad_sample_mode=GradSampleMode(mode), secure_mode=secure),
        mode,
        sampling_generator=None if secure else torch.Generator().manual_seed(1),
        noise_generator=None if secure else torch.Generator().manual_seed(2),
        keystreams=(SecureNoise(), SecureNoise()) if secure else None,
    )


def _noise_draw_ms(model: torch.nn.Module, repeats: int = 21) -> tuple[float, float]:
    """Median ms of one step's noise for every parameter: Opacus' draw (seeded
    generator, one ``torch.normal`` per tensor) and the keystream draw (one float32
    Box-Muller for all, split and scaled), the only work the two steps do differently."""
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(2)
    source = SecureNoise()

    def seeded() -> None:
        for p in params:
            _generate_noise(std=1.0, reference=p, generator=gen, secure_mode=False).add_(p)

    def keystream() -> None:
        flat = torch.from_numpy(source.standard_normal_f32(sum(p.numel() for p in params)))
        offset = 0
        for p in params:
            part = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            _ = p + part.mul_(1.0)

    out = []
    for fn in (seeded, keystream):
        fn()
        out.append(1e3 * statistics.median(_time(fn) for _ in range(repeats)))
    return out[0], out[1]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        "| model | params | mode | seeded step ms | keystream step ms | step ratio "
        "[quartiles] | seeded noise ms | keystream noise ms | ratio from noise cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with _expected_opacus_warnings():
        for case in CASES:
            gen = torch.Generator().manual_seed(0)
            xb = torch.rand((case.batch_size, *case.input_shape), generator=gen)
            yb = torch.randint(0, 10, (case.batch_size,), generator=gen)
            cfg = ClientTrainConfig(local_epochs=1, batch_size=case.batch_size, lr=0.01)
            base = build_model(case.model_cfg, case.input_shape, 10, seed=0)
            mode = resolve_grad_sample_mode(base, "auto", batch_size=case.batch_size)
            variants = {
                name: _trainer(copy.deepcopy(base), xb, yb, cfg, mode, name == "keystream")
                for name in ("seeded", "keystream")
            }
            for t in variants.values():
                t.step(xb, yb)  # warm-up
            times: dict[str, list[float]] = {n: [] for n in variants}
            ratios = []
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                this = {n: _time(lambda v=variants[n], x=xb, y=yb: v.step(x, y)) for n in order}
                for n, t in this.items():
                    times[n].append(t)
                ratios.append(this["keystream"] / this["seeded"])
            for t in variants.values():
                t.close()
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            noise_s, noise_k = _noise_draw_ms(base)
            step_s = 1e3 * statistics.median(times["seeded"])
            print(
                f"| {case.name} | {count_parameters(base)} | {mode} | {step_s:.2f} | "
                f"{1e3 * statistics.median(times['keystream']):.2f} | "
                f"{med:.3f} [{q1:.3f}-{q3:.3f}] | {noise_s:.3f} | {noise_k:.3f} | "
                f"{1 + (noise_k - noise_s) / step_s:.4f} |"
            )
    n = 60_000
    opacus = UniformWithReplacementSampler(
        num_samples=n, sample_rate=0.01, generator=torch.Generator().manual_seed(0), steps=20
    )
    keyed = KeystreamPoissonSampler(num_samples=n, sample_rate=0.01, steps=20, source=SecureNoise())
    t_o = statistics.median(_time(lambda: list(opacus)) for _ in range(5)) / 20
    t_k = statistics.median(_time(lambda: list(keyed)) for _ in range(5)) / 20
    print(
        f"\nPoisson batch over N={n} (q=0.01): Opacus {1e3 * t_o:.2f} ms, "
        f"keystream {1e3 * t_k:.2f} ms a step; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} paired rounds"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
