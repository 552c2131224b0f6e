"""Test utilities: an in-process Flower Grid that runs a real ClientApp.

See :mod:`fl_app.testing.harness`.
"""

from fl_app.testing.harness import (
    Delivery,
    DropFn,
    InProcessGrid,
    MessageHook,
    NodeConfigFn,
    Rejection,
    records_copy,
    wire_copy,
)

__all__ = [
    "Delivery",
    "DropFn",
    "InProcessGrid",
    "MessageHook",
    "NodeConfigFn",
    "Rejection",
    "records_copy",
    "wire_copy",
]
