"""Bytes up and down per client in a plain train stage (docs/compression.md).

Measured on the messages themselves, not from a formula: the payload of each train
instruction sent and each reply received (:func:`fl_app.secagg.wire.payload_bytes`: array
data as serialized in the ArrayRecord, byte strings, 8 bytes per scalar; protocol framing
excluded, as for secure aggregation's own count in ``secagg_bytes_*_per_client``).
Divided by the cohort size, so a lost reply lowers the round's mean upload.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message

from fl_app.secagg.wire import payload_bytes

__all__ = ["BYTES_DOWN_KEY", "BYTES_UP_KEY", "stage_bytes"]

BYTES_UP_KEY = "bytes_up_per_client"
BYTES_DOWN_KEY = "bytes_down_per_client"


def stage_bytes(
    sent: Sequence[Message], replies: Sequence[Message], cohort: int
) -> dict[str, float]:
    """Mean payload bytes per sampled client: instructions down, replies up."""
    if cohort < 1:
        return {}
    down = sum(payload_bytes(m.content) for m in sent)
    up = sum(payload_bytes(m.content) for m in replies if m.has_content())
    return {BYTES_UP_KEY: up / cohort, BYTES_DOWN_KEY: down / cohort}
