"""A site's YAML turned into the SuperNode's ``--node-config`` (docs/deployment.md, step 4).

Every relative path in the YAML resolves against the YAML's own folder, so a site's
folder can be moved or started from anywhere; ``name`` becomes the node config's
``site-name``, the stable identity that names the site's own files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_app.deploy import DeployError

__all__ = [
    "format_node_config",
    "load_site",
    "load_sites",
    "node_config_from_site",
    "parse_node_config",
]

_SITE_KEYS = {"name", "data", "partition", "dp_state_dir", "device", "extra"}
_FORMATS = ("npz", "csv")
# Node-config keys whose values are paths (resolved against the site YAML's folder, in
# ``extra:`` too), and the suffixes that mark any other key as one.
_PATH_KEYS = ("audit-dir", "policy-path", "dp-state-dir", "data-path")
_PATH_SUFFIXES = ("-dir", "-path", "-file")
_SITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def _literal(value: str, what: str) -> str:
    # TOML literal string: no escapes, so a path's backslashes survive. Flower's parser
    # splits on whitespace outside quotes and cannot carry a quote inside one.
    if "'" in value or "\n" in value or '"' in value:
        raise DeployError(
            f"{what} {value!r} contains a quote or newline, which --node-config cannot "
            "carry; rename it"
        )
    return f"'{value}'"


def node_config_from_site(site: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """Turn a site's settings into the SuperNode's node config (a flat dict).

    Site YAML (all keys optional except where noted)::

        name: hospital-a
        data:                       # the site's own file; omit for simulated partitions
          path: /srv/fl/hospital-a.npz
          format: npz               # npz | csv; must match the file suffix
        partition:                  # simulated partitions of a public dataset
          id: 0
          num: 3
        dp_state_dir: /var/lib/fl-app/dp-state   # required for DP-SGD (privacy budgets)
        device: cuda:1              # this site's train.device (overrides the server's)
        extra:                      # any other node-config keys, passed through
          audit-dir: audit          # the site's audit log folder
          policy-path: policy.yaml  # the site's data-use policy

    Relative paths, ``extra:`` ones included (``audit-dir``, ``policy-path`` and any key
    ending in ``-dir``, ``-path`` or ``-file``), are resolved against ``base_dir`` (the
    YAML's folder), so a site's folder can be moved or started from anywhere. ``name``
    becomes node-config ``site-name``: the stable identity that names the site's own
    files (``audit-<run>-site-<name>.jsonl``), so sites sharing a folder never collide.
    """
    unknown = set(site) - _SITE_KEYS
    if unknown:
        raise DeployError(f"unknown site keys {sorted(unknown)}; allowed: {sorted(_SITE_KEYS)}")
    base = base_dir or Path.cwd()
    out: dict[str, Any] = {}
    name = site.get("name")
    if name is not None:
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
            raise DeployError(
                f"name must be 1-64 letters, digits, '_', '-' or '.' (not starting with "
                f"'.'), got {name!r}: it names the site's audit log and state files"
            )
        out["site-name"] = name
    if site.get("partition") is not None:
        out["partition-id"], out["num-partitions"] = _partition(site["partition"])
    if site.get("data") is not None:
        out["data-path"], out["data-format"] = _data(site["data"], base)
    if site.get("dp_state_dir") is not None:
        out["dp-state-dir"] = _path(site["dp_state_dir"], "dp_state_dir", base)
    if site.get("device") is not None:
        out["train-device"] = _device(site["device"])
    extra = site.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise DeployError(f"extra must be a mapping of node-config keys, got {extra!r}")
    for key, value in extra.items():
        if key in out:
            raise DeployError(f"extra.{key} clashes with a key set by the site's other fields")
        if not isinstance(value, str | int | float | bool):
            raise DeployError(f"extra.{key} must be a scalar, got {value!r}")
        if str(key) in _PATH_KEYS or str(key).endswith(_PATH_SUFFIXES):
            value = _path(value, f"extra.{key}", base)
        out[str(key)] = value
    return out


def _path(value: Any, what: str, base: Path) -> str:
    """An absolute path: ``value`` as written if absolute, else under ``base``."""
    if not isinstance(value, str) or not value:
        raise DeployError(f"{what} must be a non-empty string, got {value!r}")
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _device(value: Any) -> str:
    """``device:`` as node-config ``train-device``, its form checked (fl_app.device);
    whether this machine has it is ``fl-app site check``'s question."""
    from fl_app.config.errors import ConfigError
    from fl_app.device import parse_device

    try:
        return str(parse_device(value, "device"))
    except ConfigError as err:
        raise DeployError(str(err)) from err


def _partition(part: Any) -> tuple[int, int]:
    """``partition: {id, num}`` as (partition id, number of partitions), checked."""
    if not isinstance(part, Mapping) or set(part) - {"id", "num"} or "id" not in part:
        raise DeployError(f"partition must be {{id: int, num: int}}, got {part!r}")
    pid, num = part.get("id"), part.get("num", 1)
    if not isinstance(pid, int) or not isinstance(num, int) or isinstance(pid, bool):
        raise DeployError(f"partition id/num must be integers, got {part!r}")
    if num < 1 or not 0 <= pid < num:
        raise DeployError(f"partition id must be in [0, num) and num >= 1, got {part!r}")
    return pid, num


def _data(data: Any, base: Path) -> tuple[str, str]:
    """``data: {path, format}`` as (absolute path, format), the suffix matching the format."""
    if not isinstance(data, Mapping) or set(data) - {"path", "format"}:
        raise DeployError(f"data must be {{path: str, format: npz|csv}}, got {data!r}")
    path = _path(data.get("path"), "data.path", base)
    fmt = data.get("format", Path(path).suffix.lstrip("."))
    if fmt not in _FORMATS:
        raise DeployError(f"data.format must be one of {_FORMATS}, got {fmt!r}")
    if Path(path).suffix.lstrip(".") != fmt:
        raise DeployError(f"data.path {path!r} does not end in .{fmt} (data.format={fmt})")
    return path, str(fmt)


def format_node_config(config: Mapping[str, Any]) -> str:
    """The ``--node-config`` string for ``config`` (round-trips through Flower's parser)."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise DeployError(f"node-config key {key!r} must be letters, digits, '_' or '-'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = _literal(str(value), f"node-config {key}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def load_site(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a site YAML and return its node config."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DeployError(f"cannot read site file {str(p)!r}: {err}") from err
    if not isinstance(raw, Mapping):
        raise DeployError(f"site file {str(p)!r} must hold a mapping, got {type(raw).__name__}")
    return node_config_from_site(raw, p.resolve().parent)


def load_sites(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read the site YAMLs of one federation; refuse two sites with one identity.

    A site's identity (:func:`fl_app.client.identity.site_identity`: its ``name``, else
    its data file, else its partition) names its audit log and state files, and its
    ``name`` is its roster entry, so two sites sharing one would write each other's
    logs and sign as each other. The error names both YAMLs.
    """
    from fl_app.client.identity import site_identity

    configs: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path in paths:
        cfg = load_site(path)
        identity = site_identity(cfg)
        if identity in seen:
            what = (
                f"site name {cfg['site-name']!r} is used by both"
                if cfg.get("site-name")
                else f"without a `name`, {identity!r} (same data file or partition) is both"
            )
            raise DeployError(
                f"{what} {seen[identity]} and {Path(path)}: give every site a different "
                "`name` (it names the site's audit log, state files and roster entry)"
            )
        seen[identity] = Path(path)
        configs.append(cfg)
    return configs


def parse_node_config(text: str) -> dict[str, Any]:
    """A ``--node-config`` string, parsed exactly as ``flower-supernode`` parses it (the
    inverse of :func:`format_node_config`)."""
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text])) if text.strip() else {}
