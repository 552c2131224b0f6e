"""GPU: DP-SGD step vs the non-private step on CUDA, peak device memory, noise, clients/s.

Runs only where torch sees a CUDA device; elsewhere the section is one row, "skipped:
no GPU", and takes a second (the CPU sections are unchanged). ``scripts/gpu_check.sh``
runs it, with the CUDA tests, where a GPU is lent.

* Per model (the ~1M-parameter CNN on 32x32 of the ``dpsgd`` section, and ResNet-18 at
  32x32, :mod:`benchmarks.resnet`) and per Opacus grad-sample mode: fl-app's real DP-SGD
  step (``_PrivateTrainer``: per-sample gradients, clipping and the update on the
  device; noise from the client's ChaCha20 keystream, drawn on the CPU and copied over)
  against a plain step on the same batch, paired round by round in rotating order, each
  step timed between ``torch.cuda.synchronize()`` calls; peak device memory of one step
  (``torch.cuda.max_memory_allocated`` above what was allocated before it).
* The price of drawing the noise on the CPU (torch has no CSPRNG on CUDA: the
  ``fl_app.privacy.dpsgd`` docstring): the keystream draw plus the copy, per step, as
  a share of the DP step; beside it what a seeded ``torch.randn`` on the device costs
  (not usable: a seed is not a secret key).
* Clients per second: the in-process simulation (digits, the default CNN) on CUDA and
  on the CPU, plain and with record-level DP-SGD; client-rounds per second in the
  rounds after the first.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.reuse import load_script
from benchmarks.section import Section, time_left

__all__ = ["SKIPPED", "TITLE", "run"]

TITLE = "GPU: DP-SGD step, peak device memory, noise cost, clients per second"
SKIPPED = "skipped: no GPU (torch sees no CUDA device)"
MODES = ("hooks", "functorch", "ghost")
BATCH = 256


def run(quick: bool) -> Section:
    import torch

    if not torch.cuda.is_available():
        return Section(
            title=TITLE,
            columns=["status"],
            rows=[[SKIPPED]],
            notes=[
                f"torch {torch.__version__}. Where a GPU is lent, scripts/gpu_check.sh runs "
                "this section and the CUDA tests (pytest -m gpu) and names the card."
            ],
            data={"skipped": "no GPU"},
        )
    device = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(device)
    rows, data = step_rows(device, quick)
    sims = clients_per_second(quick)
    notes = [
        f"{card}, torch {torch.__version__} (CUDA {torch.version.cuda}); batch {BATCH}, "
        "q = 1 (fixed batch), SGD; time ratio: median [quartiles] of DP/plain within paired "
        "rounds; peak: most device memory one step allocates.",
        "noise ms: the client's ChaCha20 keystream draw on the CPU plus its copy to the "
        "device, once a DP step (share of the DP step in brackets); torch.randn ms: a "
        "seeded draw on the device, for scale only (a seed is not a secret key).",
        "Clients per second (in-process simulation, digits, CNN, client-rounds per second "
        "after round 1): "
        + "; ".join(
            f"{s['setting']}: {s['clients_per_s']:.1f}"
            + (f" (failed: {s['error'][:120]})" if "error" in s else "")
            for s in sims
        ),
    ]
    return Section(
        title=TITLE,
        columns=[
            "model",
            "params",
            "mode",
            "plain step ms",
            "DP step ms",
            "time ratio [quartiles]",
            "plain peak MiB",
            "DP peak MiB",
            "noise ms (share)",
            "torch.randn ms",
        ],
        rows=rows,
        notes=notes,
        data={"card": card, "steps": data, "simulation": sims},
    )


def _models() -> list[tuple[str, Any, tuple[int, int, int]]]:
    from benchmarks.resnet import resnet18_32
    from fl_app.models import build_model

    cnn = load_script("bench_dpsgd").CASES[3]  # "CNN 32x32 ~1M"
    return [
        (cnn.name, build_model(cnn.model_cfg, cnn.input_shape, 10, seed=0), cnn.input_shape),
        ("ResNet-18 32x32", resnet18_32(), (3, 32, 32)),
    ]


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _peak_mib(step: Callable[[], None], device: Any) -> float:
    import torch

    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def step_rows(device: Any, quick: bool) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """The table's rows (and raw numbers) for every model and mode on ``device``."""
    import torch

    from fl_app.config.schema import ClientTrainConfig
    from fl_app.models import count_parameters
    from fl_app.privacy.dpsgd_opacus import _expected_opacus_warnings
    from fl_app.privacy.noise import SecureNoise

    bench = load_script("bench_dpsgd")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows: list[list[str]] = []
    data: list[dict[str, Any]] = []
    models = _models()[:1] if quick else _models()
    for i, (name, base, shape) in enumerate(models):
        budget = min(3.0 if quick else 20.0, max(1.0, time_left(1e9) / (len(models) - i) / 4))
        gen = torch.Generator().manual_seed(0)
        xb = torch.rand((BATCH, *shape), generator=gen).to(device)
        yb = torch.randint(0, 10, (BATCH,), generator=gen).to(device)
        cfg = ClientTrainConfig(local_epochs=1, batch_size=BATCH, lr=0.01, momentum=0.9)
        base = base.to(device)
        n_params = count_parameters(base)
        with _expected_opacus_warnings():
            variants, failed = _variants(bench, base, xb, yb, cfg)
            times, ratios, peaks = _pair(variants, xb, yb, sync, budget, device)
        for v in variants.values():
            v.close()
        noise_ms, randn_ms = _noise_ms(n_params, device, sync, SecureNoise())
        for mode, error in failed.items():
            data.append({"model": name, "params": n_params, "mode": mode, "error": error})
            rows.append([name, f"{n_params:,}", mode, f"failed: {error}", *[""] * 6])
        for mode in ratios:
            dp_ms = 1e3 * statistics.median(times[mode])
            record = {
                "model": name,
                "params": n_params,
                "mode": mode,
                "plain_ms": 1e3 * statistics.median(times["plain"]),
                "dp_ms": dp_ms,
                "ratio": bench._fmt_ratio(ratios[mode]),
                "rounds": len(ratios[mode]),
                "plain_mib": peaks["plain"],
                "dp_mib": peaks[mode],
                "noise_ms": noise_ms,
                "randn_ms": randn_ms,
            }
            data.append(record)
            rows.append(
                [
                    name,
                    f"{n_params:,}",
                    mode,
                    f"{record['plain_ms']:.2f}",
                    f"{dp_ms:.2f}",
                    str(record["ratio"]),
                    f"{peaks['plain']:.0f}",
                    f"{peaks[mode]:.0f}",
                    f"{noise_ms:.2f} ({100 * noise_ms / dp_ms:.0f} %)",
                    f"{randn_ms:.3f}",
                ]
            )
    return rows, data


def _variants(
    bench: Any, base: Any, xb: Any, yb: Any, cfg: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The plain step and every DP mode that runs here; a mode that cannot (out of
    memory, an Opacus limit on the device) is reported in its row, not fatal: a lent GPU
    is rare, and the other modes' numbers are still worth having."""
    variants = {"plain": bench._plain_variant(copy.deepcopy(base), cfg)}
    failed: dict[str, str] = {}
    for mode in MODES:
        try:
            variant = bench._dp_variant(copy.deepcopy(base), xb, yb, cfg, mode)
            variant.step(xb, yb)  # fails here rather than mid-timing
            variants[mode] = variant
        except Exception as ex:  # reported in the table, never hidden
            failed[mode] = f"{type(ex).__name__}: {str(ex)[:120]}"
    return variants, failed


def _pair(
    variants: dict[str, Any], xb: Any, yb: Any, sync: Callable[[], None], budget: float, device: Any
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    """Paired rounds (every variant once, rotating order) until ``budget`` seconds."""
    for v in variants.values():  # warm-up: kernels chosen, caches and buffers built
        for _ in range(2):
            v.step(xb, yb)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {m: [] for m in names if m != "plain"}
    t0 = time.perf_counter()
    r = 0
    while r < 4 or (time.perf_counter() - t0 < budget and r < 200):
        order = names[r % len(names) :] + names[: r % len(names)]
        this = {n: _timed(functools.partial(variants[n].step, xb, yb), sync) for n in order}
        for n, t in this.items():
            times[n].append(t)
        for m in ratios:
            ratios[m].append(this[m] / this["plain"])
        r += 1
    peaks = {}
    for n, v in variants.items():
        v.release()
        peaks[n] = _peak_mib(functools.partial(v.step, xb, yb), device)
    return times, ratios, peaks


def _noise_ms(n: int, device: Any, sync: Callable[[], None], source: Any) -> tuple[float, float]:
    """Median ms of one keystream draw of ``n`` float32 normals copied to ``device``, and
    of a seeded ``torch.randn`` of the same size on the device."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)

    def keystream() -> None:
        torch.from_numpy(source.standard_normal_f32(n)).to(device)

    def randn() -> None:
        torch.randn(n, generator=gen, device=device)

    out = []
    for fn in (keystream, randn):
        fn()
        out.append(1e3 * statistics.median(_timed(fn, sync) for _ in range(9)))
    return out[0], out[1]


def clients_per_second(quick: bool, devices: tuple[str, ...] = ("cuda", "cpu")) -> list[dict]:
    """Client-rounds per second of the in-process simulation, per device and privacy."""
    from fl_app.config.compose import compose_config
    from fl_app.runtime.simulation import run_simulation_experiment

    clients, rounds = (10, 3) if quick else (20, 4)
    common = [
        "runtime=inprocess",
        "model=cnn",
        f"dataset.num_partitions={clients}",
        f"num_rounds={rounds}",
        "train.local_epochs=1",
        "federated_eval_every=0",
    ]
    settings = {"plain": [], "DP-SGD": ["privacy=dpsgd"]}
    out = []
    for device in devices:
        for label, extra in settings.items():
            setting = f"{device}, {label}, {clients} clients"
            cfg = compose_config("config", [*common, *extra, f"train.device={device}"])
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    run_simulation_experiment(cfg, tmp)
                    records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").open()]
            except Exception as ex:  # reported in the notes, never hidden
                out.append({"setting": setting, "clients_per_s": float("nan"), "error": str(ex)})
                continue
            steady = [r["clients_accepted"] / r["round_seconds"] for r in records[1:]]
            out.append(
                {
                    "setting": setting,
                    "clients_per_s": statistics.median(steady) if steady else float("nan"),
                    "rounds": len(records),
                }
            )
    return out
