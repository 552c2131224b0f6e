"""A site's data-use policy: what its ClientApp may release, checked before it trains.

An institution states, in a file of its own (``--node-config "policy-path=/path"``),
what may leave its machine whatever the server asks. The ClientApp reads it for every
train and evaluate instruction and refuses, *before* it loads data or trains, an
instruction the policy does not allow; the refusal names the policy field and goes
back to the server as a structured error (:class:`fl_app.client_app.ClientRefusal`),
and into the site's own audit log (``client.refused``).

Policy file (YAML or JSON; every field optional, unknown keys refused)::

    allowed_artifacts: [masked_update, evaluation_metrics]  # default: all of ARTIFACTS
    max_epsilon: 8.0                  # ε this site accounts itself, after this round
    require_secure_aggregation: true  # train only as secure-aggregation stage 3
    require_record_level_dp: true     # train only with DP-SGD (spec.dpsgd)

``max_epsilon`` bounds the ε the client accounts itself: record-level DP-SGD's
(``dp-epsilon``, its persistent accountant) and local DP's (``dp-local-epsilon``),
each projected to the end of the round before any training. A train instruction
under which the client accounts no ε (no DP-SGD, no local DP: a plain update, or
central DP whose noise the server adds) is refused: the site cannot bound what it
cannot account. Trust assumption: the site trusts its own ClientApp code and this
file, not the server; the check is only as strong as the client's accounting.

Pure and torch-free: the key-exchange stages of secure aggregation import nothing
heavy, and this module only parses and compares.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ARTIFACTS",
    "POLICY_FIELDS",
    "PolicyError",
    "PolicyViolation",
    "SitePolicy",
    "load_policy",
    "parse_policy",
    "released_artifact",
]

#: What can leave a client, by message: a train reply's update (raw, clipped,
#: clipped+noised, or masked under secure aggregation) or an evaluate reply's metrics.
ARTIFACTS = ("update", "clipped_update", "noised_update", "masked_update", "evaluation_metrics")

POLICY_FIELDS = (
    "allowed_artifacts",
    "max_epsilon",
    "require_secure_aggregation",
    "require_record_level_dp",
)


class PolicyError(ValueError):
    """The policy file cannot be used (unreadable, unknown key, wrong type)."""


class PolicyViolation(Exception):
    """An instruction the policy does not allow; ``field`` names the policy field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"site policy `{field}`: {message}")
        self.field = field


def released_artifact(
    message_type: str, *, secure: bool, client_clips: bool, local_noise: bool
) -> str:
    """The artifact a reply to this instruction releases (one of :data:`ARTIFACTS`)."""
    if message_type == "evaluate":
        return "evaluation_metrics"
    if message_type != "train":
        raise ValueError(f"message_type is {message_type!r}; expected 'train' or 'evaluate'")
    if secure:
        return "masked_update"
    if local_noise:
        return "noised_update"
    if client_clips:
        return "clipped_update"
    return "update"


@dataclass(frozen=True)
class SitePolicy:
    """A parsed policy (see the module docstring); the defaults allow everything."""

    allowed_artifacts: frozenset[str] = frozenset(ARTIFACTS)
    max_epsilon: float | None = None
    require_secure_aggregation: bool = False
    require_record_level_dp: bool = False

    def check_request(
        self,
        message_type: str,
        *,
        artifact: str,
        secure: bool,
        record_level_dp: bool,
        accounts_epsilon: bool,
    ) -> None:
        """Raise :class:`PolicyViolation` unless this instruction may run at all.

        ``accounts_epsilon``: the client accounts an ε for this round (DP-SGD or local DP).
        """
        if artifact not in self.allowed_artifacts:
            raise PolicyViolation(
                "allowed_artifacts",
                f"this {message_type} instruction would release `{artifact}`, which the site "
                f"does not allow (allowed: {sorted(self.allowed_artifacts)})",
            )
        if message_type != "train":
            return
        if self.require_secure_aggregation and not secure:
            raise PolicyViolation(
                "require_secure_aggregation",
                "the site trains only under secure aggregation (secagg stage 3); this train "
                "instruction is a plain one (run with secagg=secaggplus)",
            )
        if self.require_record_level_dp and not record_level_dp:
            raise PolicyViolation(
                "require_record_level_dp",
                "the site trains only with record-level DP-SGD; this run has none "
                "(enable privacy.dpsgd)",
            )
        if self.max_epsilon is not None and not accounts_epsilon:
            raise PolicyViolation(
                "max_epsilon",
                f"the site bounds its epsilon at {self.max_epsilon:g}, but this round has no "
                "client-side accounting (neither record-level DP-SGD nor local DP), so its "
                "epsilon is unbounded for the site",
            )

    def check_epsilon(self, kind: str, epsilon: float) -> None:
        """Raise :class:`PolicyViolation` if ``epsilon`` (projected after the round) is too large.

        ``kind`` names the accountant in the message ("record-level", "local").
        """
        if self.max_epsilon is not None and not epsilon <= self.max_epsilon:
            raise PolicyViolation(
                "max_epsilon",
                f"{kind} epsilon would reach {epsilon:.4g} after this round, above the site's "
                f"max_epsilon {self.max_epsilon:g}",
            )


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
    allowed = frozenset(ARTIFACTS)
    if "allowed_artifacts" in raw:
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
        allowed = frozenset(items)
    max_eps = raw.get("max_epsilon")
    if max_eps is not None:
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
        max_eps = float(max_eps)
    return SitePolicy(
        allowed_artifacts=allowed,
        max_epsilon=max_eps,
        require_secure_aggregation=_bool(raw, "require_secure_aggregation"),
        require_record_level_dp=_bool(raw, "require_record_level_dp"),
    )


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
