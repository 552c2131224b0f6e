"""Decoding the unmasked sum, and the shape of a round's vectors.

The sum is what the clients' vectors add up to: one faulty or malicious client can
make it undecodable or implausible, and :func:`decode_checked` then abandons the round
(never the run): weights must sum above zero and the update sum stay within ``n``
clipped inputs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_app.secagg.params import SecAggParams
from fl_app.secagg.vector import BOUND_SLACK, DecodedSum, VectorLayout
from strategies.secagg.outcome import SecAggOutcome

__all__ = ["RoundShape", "decode_checked", "decode_into"]

log = logging.getLogger("fl_app.secagg")


@dataclass(frozen=True)
class RoundShape:
    """What one round's vectors look like: ``(k, t)``, the layout, the ring length, and
    the fixed-point codec or, under distributed DP, the round's DdpRound."""

    params: SecAggParams
    layout: VectorLayout
    length: int
    codec: Any = None
    ddp_round: Any = None


def decode_into(
    outcome: SecAggOutcome,
    result: Any,
    shape: RoundShape,
    context: bytes,
    bound: float,
    rnd: int,
) -> None:
    """Decode the unmasked total into ``outcome`` (or abandon the round with a note)."""
    t0 = time.perf_counter()
    n = result.num_contributors
    outcome.unmasked = True
    try:
        if shape.ddp_round is not None:
            flat = shape.ddp_round.decode(result.total, context, num_contributors=n)
            decoded_sum = DecodedSum(
                shape.layout.split_params(flat), float(n), 0.0, math.nan, math.nan
            )
        else:
            decoded_sum = decode_checked(shape.codec, shape.layout, result.total, n, bound)
    # The sum is what the clients' vectors add up to: one faulty or malicious client
    # can make it undecodable, and that must end the round, never the run.
    except (ValueError, ArithmeticError) as err:
        outcome.note = (
            f"secure aggregation abandoned after unmasking: the sum of {n} inputs is not "
            f"one honest clients can produce ({err}): model unchanged"
        )
        log.warning("round %d: %s", rnd, outcome.note)
        return
    finally:
        outcome.stages[-1].server_seconds += time.perf_counter() - t0
    outcome.decoded = decoded_sum
    outcome.num_contributors = n


def decode_checked(
    codec: Any, layout: VectorLayout, total: np.ndarray, n: int, bound: float
) -> DecodedSum:
    """Decode the unmasked sum and check it against what ``n`` honest inputs can give.

    ``codec.decode_sum`` refuses magnitudes above ``n`` maximal encodings (a wrapped or
    shifted sum). Beyond that, honest inputs have weights in ``(0, 1]`` and
    ``||w·Δ|| <= C``, so ``Σ w > 0`` and ``||Σ w·Δ|| <= n·C`` up to the codec's slack and
    the stochastic rounding (``< 1/scale`` per coordinate and input). A sum outside these
    bounds raises ``ValueError`` (the round is abandoned): a client that did not clip, or
    that shifted its weight to zero or below, cannot skew the model past its bound nor
    make the mean divide by a non-positive weight.
    """
    decoded = codec.decode_sum(total, n)
    out: DecodedSum = layout.split_sum(decoded, bound)
    if not out.weight > 0:
        raise ValueError(f"decoded total weight {out.weight:.6g} is not > 0")
    # einsum, not np.dot: BLAS threads contend with the clients' on a shared machine.
    flat = [v.reshape(-1) for v in out.update.values()]
    sq = math.fsum(float(np.einsum("i,i->", v, v)) for v in flat)
    rounding = n * math.sqrt(layout.num_params) / codec.scale
    limit = n * bound * BOUND_SLACK + rounding
    if not math.sqrt(sq) <= limit:
        raise ValueError(
            f"decoded update sum has L2 norm {math.sqrt(sq):.6g}, above {limit:.6g} = "
            f"{n} inputs x clip {bound:g} (an input was not clipped)"
        )
    return out
