"""Test utilities: adversarial servers and a SecAgg test client over the in-process grid.

The grid itself is production code (the ``runtime.backend=inprocess`` simulation
backend) and lives in :mod:`fl_app.runtime.inprocess`; it is re-exported here because
tests use its fault injection (drop rules, message hooks) through this package.
"""

from fl_app.runtime.inprocess import (
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
