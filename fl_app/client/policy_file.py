"""A site's policy file: read strictly, every field checked, into a :class:`SitePolicy`.

The fields and what each allows are :mod:`fl_app.client.policy`'s. A policy the site
wrote wrong must never loosen what it meant, so everything is refused that a lenient
reader would guess at: unknown keys, duplicate keys (PyYAML keeps the last one
silently), booleans given as strings, numbers out of range, an empty file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fl_app.client.policy import (
    ARTIFACTS,
    DEFAULT_DDP_MIN_NOISE_MULTIPLIER,
    DEFAULT_LOCAL_MIN_NOISE_MULTIPLIER,
    DEFAULT_MAX_DROPOUT_TOLERANCE,
    DEFAULT_MIN_COHORT_SIZE,
    DEFAULT_MIN_CORRECTNESS_BITS,
    DEFAULT_MIN_CORRUPT_CLIENTS,
    DEFAULT_MIN_CORRUPT_FRACTION,
    DEFAULT_MIN_SECURITY_BITS,
    DEFAULT_MIN_SERVER_MODEL,
    POLICY_FIELDS,
    SERVER_MODELS,
    SHARE_ARTIFACTS,
    PolicyError,
    SitePolicy,
)

__all__ = ["load_policy", "parse_policy"]


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if type(value) is not bool:
        raise PolicyError(f"policy field `{key}` is {value!r}; it must be true or false")
    return value


def parse_policy(raw: Any, source: str = "policy") -> SitePolicy:
    """Check a decoded policy mapping strictly; :class:`PolicyError` names the field."""
    if not isinstance(raw, Mapping):
        raise PolicyError(
            f"{source}: a policy is a mapping of {list(POLICY_FIELDS)}, got {type(raw).__name__}"
        )
    for key in raw:
        if key not in POLICY_FIELDS:
            raise PolicyError(
                f"{source}: unknown policy field `{key}`; remove it or use one of "
                f"{list(POLICY_FIELDS)}"
            )
    allowed = _allowed_artifacts(raw, source)
    max_eps = _max_epsilon(raw, source)
    # Absent: the safe default; an explicit null: the site opts out of a floor.
    z_min = _floor(raw, "ddp_min_noise_multiplier", source, DEFAULT_DDP_MIN_NOISE_MULTIPLIER)
    local_min = _floor(
        raw, "local_min_noise_multiplier", source, DEFAULT_LOCAL_MIN_NOISE_MULTIPLIER
    )
    return SitePolicy(
        allowed_artifacts=allowed,
        max_epsilon=max_eps,
        require_secure_aggregation=_bool(raw, "require_secure_aggregation"),
        require_secure_aggregation_explicit="require_secure_aggregation" in raw,
        require_record_level_dp=_bool(raw, "require_record_level_dp"),
        secagg_max_dropout_tolerance=_number(
            raw, "secagg_max_dropout_tolerance", source, 0.0, 1.0, DEFAULT_MAX_DROPOUT_TOLERANCE
        ),
        secagg_min_corrupt_fraction=_number(
            raw, "secagg_min_corrupt_fraction", source, 0.0, 1.0, DEFAULT_MIN_CORRUPT_FRACTION
        ),
        secagg_min_corrupt_clients=_count(
            raw, "secagg_min_corrupt_clients", source, DEFAULT_MIN_CORRUPT_CLIENTS
        ),
        secagg_min_cohort_size=_count(
            raw, "secagg_min_cohort_size", source, DEFAULT_MIN_COHORT_SIZE
        ),
        secagg_min_security_bits=_count(
            raw, "secagg_min_security_bits", source, DEFAULT_MIN_SECURITY_BITS
        ),
        secagg_min_correctness_bits=_count(
            raw, "secagg_min_correctness_bits", source, DEFAULT_MIN_CORRECTNESS_BITS
        ),
        secagg_allow_custom_params=_bool(raw, "secagg_allow_custom_params"),
        secagg_min_server_model=_server_model(raw, source),
        secagg_min_server_model_explicit="secagg_min_server_model" in raw,
        ddp_min_noise_multiplier=z_min,
        local_min_noise_multiplier=local_min,
        allow_seeded_noise=_bool(raw, "allow_seeded_noise"),
        allowed_share_artifacts=frozenset(
            _names(raw, "allowed_share_artifacts", source, SHARE_ARTIFACTS)
        ),
        shareable_layers=tuple(_names(raw, "shareable_layers", source, None)),
    )


def _names(
    raw: Mapping[str, Any], key: str, source: str, choices: tuple[str, ...] | None
) -> list[str]:
    """A non-empty list of strings (from ``choices`` when given); absent: all of
    ``choices``, or ``["*"]`` for patterns."""
    if key not in raw:
        return list(choices) if choices is not None else ["*"]
    items = raw[key]
    if (
        not isinstance(items, list)
        or not items
        or not all(isinstance(x, str) and x for x in items)
        or (choices is not None and not set(items) <= set(choices))
    ):
        kind = f"names from {list(choices)}" if choices is not None else "parameter-name globs"
        raise PolicyError(
            f"{source}: policy field `{key}` is {items!r}; it must be a non-empty list of {kind}"
        )
    return list(items)


def _allowed_artifacts(raw: Mapping[str, Any], source: str) -> frozenset[str]:
    """``allowed_artifacts``: names from :data:`ARTIFACTS` (default: all of them)."""
    if "allowed_artifacts" not in raw:
        return frozenset(ARTIFACTS)
    items = raw["allowed_artifacts"]
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise PolicyError(
            f"{source}: policy field `allowed_artifacts` is {items!r}; it must be a list "
            f"of names from {list(ARTIFACTS)}"
        )
    unknown = sorted(set(items) - set(ARTIFACTS))
    if unknown:
        raise PolicyError(
            f"{source}: policy field `allowed_artifacts` names {unknown}; the artifacts "
            f"are {list(ARTIFACTS)}"
        )
    return frozenset(items)


def _max_epsilon(raw: Mapping[str, Any], source: str) -> float | None:
    """``max_epsilon``: a finite number > 0, or None (absent or null: no bound)."""
    max_eps = raw.get("max_epsilon")
    if max_eps is None:
        return None
    if (
        isinstance(max_eps, bool)
        or not isinstance(max_eps, (int, float))
        or not math.isfinite(max_eps)
        or max_eps <= 0
    ):
        raise PolicyError(
            f"{source}: policy field `max_epsilon` is {max_eps!r}; it must be a finite "
            "number > 0 (or omitted for no bound)"
        )
    return float(max_eps)


def _floor(raw: Mapping[str, Any], key: str, source: str, default: float) -> float | None:
    """A noise-multiplier floor: ``default`` when absent, None when null, else > 0."""
    if key not in raw:
        return default
    if raw[key] is None:
        return None
    return _number(raw, key, source, 0.0, math.inf, low_open=True)


def _number(
    raw: Mapping[str, Any],
    key: str,
    source: str,
    low: float,
    high: float,
    default: float = math.nan,
    *,
    low_open: bool = False,
) -> float:
    """A number in ``[low, high)`` (``(low, high)`` with ``low_open``), or ``default``."""
    if key not in raw:
        return default
    value = raw[key]
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value < high
    )
    if not ok:
        bracket = "(" if low_open else "["
        raise PolicyError(
            f"{source}: policy field `{key}` is {value!r}; it must be a number in "
            f"{bracket}{low:g}, {high:g})"
        )
    return float(value)


def _server_model(raw: Mapping[str, Any], source: str) -> str:
    value = raw.get("secagg_min_server_model", DEFAULT_MIN_SERVER_MODEL)
    if value not in SERVER_MODELS:
        raise PolicyError(
            f"{source}: policy field `secagg_min_server_model` is {value!r}; it must be one "
            f"of {list(SERVER_MODELS)}"
        )
    return str(value)


def _count(raw: Mapping[str, Any], key: str, source: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"{source}: policy field `{key}` is {value!r}; it must be an int >= 0")
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise PolicyError(f"duplicate policy field `{key}`; give each field once")
        seen.add(key)
    return dict(loader.construct_mapping(node))


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_policy(path: str | os.PathLike[str]) -> SitePolicy:
    """Read and parse a policy file (YAML, of which JSON is a subset).

    Raises
    ------
    PolicyError
        When the file is unreadable, not YAML, empty, or fails :func:`parse_policy`.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"policy file {path}: cannot read it ({err})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except PolicyError as err:
        raise PolicyError(f"policy file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise PolicyError(f"policy file {path}: not valid YAML/JSON ({err})") from None
    if raw is None:
        raise PolicyError(
            f"policy file {path} is empty; write `{{}}` for a policy that allows everything"
        )
    return parse_policy(raw, f"policy file {path}")
