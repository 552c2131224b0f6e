"""JSON objects with duplicate keys refused, for every artifact fl-app reads back.

``json.loads`` keeps the *last* of two equal keys silently, so a privacy ledger, a
client's accountant history or an audit record could be read as something other
than what a reviewer sees first in the file. Each reader passes
:func:`reject_duplicate_keys` as ``object_pairs_hook`` with its own error type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["reject_duplicate_keys"]

PairsHook = Callable[[list[tuple[str, Any]]], dict[str, Any]]


def reject_duplicate_keys(error: type[Exception], where: str = "") -> PairsHook:
    """An ``object_pairs_hook`` raising ``error(f"{where}duplicate key {key!r}")``."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}duplicate key {key!r}")
            out[key] = value
        return out

    return hook
