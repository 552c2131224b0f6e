"""Seeded use of torch's *global* RNG without disturbing it.

Some torch layers (dropout) and initialisers draw only from the global generator.
:func:`seeded_global_rng` forks exactly the generators involved (the CPU one, plus
the model's CUDA device when there is one), seeds them, and restores them on exit.

It seeds the forked generators directly rather than through ``torch.manual_seed``:
that call also seeds every CUDA/XPU/MTIA device lazily, recording a stack trace each
time (about 1.5 ms a call, most of a small simulated client's round) and touching
device generators that ``fork_rng`` does not restore.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["seeded_global_rng"]


@contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's global RNG(s) seeded by ``seed``, then restore them."""
    cuda = device is not None and device.type == "cuda"
    index = (device.index or 0) if cuda and device is not None else 0
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield
