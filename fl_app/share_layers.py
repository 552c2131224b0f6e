"""Which named parameters leave a site (``share.layers``) and which stay with it.

A pure core shared by the config checks (which names a pattern list selects, the shared
dimension that DP and secure aggregation size their vectors by), the server (the global
model is the shared part only) and the client (it strips the rest before its update is
clipped, noised, encoded or masked). Patterns are :func:`fnmatch.fnmatchcase` globs over
``state_dict`` names (``net.1.*``, ``*.bn*``); ``["*"]`` shares everything (the default).
Personalization in the style of FedPer (Arivazhagan et al. 2019) and FedBN (Li et al.,
ICLR 2021): the layers a site keeps are trained with the rest but never sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TypeVar

__all__ = ["ALL_LAYERS", "not_covered", "shared_names", "split_shared", "unmatched_patterns"]

ALL_LAYERS = ("*",)
V = TypeVar("V")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def shared_names(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The names any pattern selects, in the order given (the model's order)."""
    return [n for n in names if _matches(n, patterns)]


def split_shared(
    arrays: Mapping[str, V], patterns: Sequence[str]
) -> tuple[dict[str, V], dict[str, V]]:
    """``(shared, kept)``: the arrays that leave the site and those that stay, each in
    ``arrays``' order."""
    shared = {k: v for k, v in arrays.items() if _matches(k, patterns)}
    kept = {k: v for k, v in arrays.items() if k not in shared}
    return shared, kept


def unmatched_patterns(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The patterns that select none of ``names`` (a typo shares less than meant)."""
    listed = list(names)
    return [p for p in patterns if not any(fnmatchcase(n, p) for n in listed)]


def not_covered(names: Iterable[str], allowed: Sequence[str]) -> list[str]:
    """The names no pattern of ``allowed`` covers (a site policy's shareable layers)."""
    return [n for n in names if not _matches(n, allowed)]
