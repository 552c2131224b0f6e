"""The DP synthesizer: smartnoise-synth's MST or AIM on a table with a public domain.

MST (McKenna, Miklau and Sheldon, "Winning the NIST Contest: A scalable and general
approach to differentially private synthetic data", JPC 2021) measures every 1-way
marginal and a maximum spanning tree of 2-way marginals with Gaussian noise, choosing
the tree with the exponential mechanism; AIM (McKenna et al., VLDB 2022) selects
marginals adaptively and is slower. Both are (ε, δ)-DP through zCDP, as smartnoise-synth
calibrates them (``snsynth.utils.cdp_rho``), for neighbouring tables that differ in one
row; the row count is treated as public (MST estimates with the true total and we
sample as many rows), which the card states.

Randomness, and why there is no seed (docs/synthetic-data.md):

* The Gaussian noise of the measurements comes from OpenDP's sampler
  (``opendp.measurements.make_gaussian``), which draws from the operating system's
  CSPRNG and cannot be seeded. Nobody, the site included, can predict or replay it:
  that is what the guarantee needs (docs/architecture.md, Rules: who holds the
  randomness), and it is why the same inputs never give the same bytes twice.
* The exponential mechanism's choice of marginals, the decompression of rare values and
  the sampled rows use NumPy's *global* RNG (``np.random``), for which smartnoise-synth
  takes no generator. Whatever seeded that global state elsewhere in the process (an
  experiment seed, a test) would make the selection predictable to whoever knows that
  seed, so :func:`secret_global_numpy_rng` seeds it with 256 bits from ``os.urandom``
  for the call and restores the caller's state afterwards. That seed is never stored.

Reproducibility is therefore of the *surrogate run*, not of the synthesis: the card pins
the written file by its SHA-256 and ``dataset=synthetic`` refuses any other bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from enum import Enum
from typing import Any, Protocol

import numpy as np

__all__ = [
    "SnsynthSynthesizer",
    "SynthError",
    "SynthMethod",
    "Synthesizer",
    "check_table",
    "secret_global_numpy_rng",
]

LIBRARY = "smartnoise-synth"
_INSTALL = (
    "smartnoise-synth is not installed: run scripts/bootstrap.sh (it installs the synth "
    "extra, `pip install -e '.[synth]'`, then smartnoise-synth and smartnoise-sql with "
    "--no-deps, whose declared pins would downgrade Opacus and pandas)"
)


class SynthError(RuntimeError):
    """The surrogate cannot be made; the message says why and what to change."""


class SynthMethod(str, Enum):
    mst = "mst"  # McKenna et al. 2021: 1-way marginals + a spanning tree of 2-way ones
    aim = "aim"  # McKenna et al. 2022: adaptive, iterative; slower


class Synthesizer(Protocol):
    """Fits a DP model of ``table`` and samples ``rows`` rows over the same domain."""

    def __call__(
        self,
        table: np.ndarray,
        cardinalities: Sequence[int],
        epsilon: float,
        delta: float,
        rows: int,
    ) -> np.ndarray: ...


@contextlib.contextmanager
def secret_global_numpy_rng() -> Iterator[None]:
    """NumPy's global RNG seeded from ``os.urandom`` inside, the caller's state after.

    For libraries that draw DP-relevant choices from ``np.random`` and take no
    generator (smartnoise-synth's exponential mechanism): a seed someone else knows
    must not decide them, and code around the call keeps its own sequence.
    """
    saved = np.random.get_state()
    np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
    try:
        yield
    finally:
        np.random.set_state(saved)


def check_table(table: np.ndarray, cardinalities: Sequence[int], what: str) -> np.ndarray:
    """``table`` as int64 ``[N, len(cardinalities)]`` with column ``j`` in ``0..card_j-1``."""
    arr = np.asarray(table)
    if arr.ndim != 2 or arr.shape[1] != len(cardinalities):
        raise SynthError(
            f"{what} has shape {list(arr.shape)}, expected [rows, {len(cardinalities)}]"
        )
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.rint(arr)):
        raise SynthError(f"{what} holds values that are not integer codes")
    codes = np.rint(arr).astype(np.int64)
    high = np.asarray(cardinalities, dtype=np.int64) - 1
    if codes.size and (codes.min() < 0 or np.any(codes > high)):
        raise SynthError(f"{what} holds codes outside the public domain {list(cardinalities)}")
    return codes


class SnsynthSynthesizer:
    """smartnoise-synth's MST or AIM with each column's domain fixed in advance.

    Every column gets a ``BinTransformer`` with explicit bounds (``[-0.5, card - 0.5]``,
    ``card`` bins: code ``k`` is bin ``k``), so the library spends no budget and reads
    nothing from the data to find the domain (its default ``LabelTransformer`` would use
    the observed categories, which leaks which values occur).
    """

    def __init__(self, method: SynthMethod = SynthMethod.mst) -> None:
        self.method = SynthMethod(method)

    def __call__(
        self,
        table: np.ndarray,
        cardinalities: Sequence[int],
        epsilon: float,
        delta: float,
        rows: int,
    ) -> np.ndarray:
        codes = check_table(table, cardinalities, "the site's table")
        # Imports inside too: importing jax draws from NumPy's global RNG.
        with secret_global_numpy_rng():
            try:
                import pandas as pd
                from snsynth.transform import BinTransformer, TableTransformer
            except ImportError as err:
                raise SynthError(_INSTALL) from err
            transformer = TableTransformer(
                [BinTransformer(bins=int(c), lower=-0.5, upper=int(c) - 0.5) for c in cardinalities]
            )
            synth = self._model(epsilon, delta)
            columns = [f"c{j}" for j in range(len(cardinalities))]
            synth.fit(pd.DataFrame(codes, columns=columns), transformer=transformer)
            sample = synth.sample(int(rows))
        out = np.asarray(
            sample.to_numpy() if hasattr(sample, "to_numpy") else list(sample), dtype=np.float64
        )
        return check_table(np.rint(out), cardinalities, f"{LIBRARY}'s sample")

    def _model(self, epsilon: float, delta: float) -> Any:
        try:
            if self.method is SynthMethod.aim:
                from snsynth.aim import AIMSynthesizer

                return AIMSynthesizer(epsilon=float(epsilon), delta=float(delta))
            from snsynth.mst import MSTSynthesizer

            return MSTSynthesizer(epsilon=float(epsilon), delta=float(delta))
        except ImportError as err:
            raise SynthError(_INSTALL) from err
