"""Compose, type-check and validate experiment configs from the Hydra tree.

Three entry points meet here: ``fl-app simulate`` (Hydra's own ``@hydra.main`` hands
us a ``DictConfig``), the ServerApp under ``flwr run`` (which composes from the
bundle's ``configs/`` given ``hydra-config-name``/``hydra-overrides``), and tests.
All of them end in :func:`to_app_config`, so a config is checked the same way
whichever path started the run.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_app.config.schema import AppConfig
from fl_app.config.validate import ConfigError, validate_config

__all__ = [
    "SCHEMA_NAME",
    "compose_config",
    "config_dir",
    "config_hash",
    "config_to_dict",
    "parse_overrides",
    "register_schemas",
    "to_app_config",
]

SCHEMA_NAME = "fl_app_schema"


def config_dir() -> Path:
    """The Hydra tree: the repository's (and bundle's) ``configs/``, else the installed copy.

    Resolved from this file, never from the working directory: a ServerApp under
    ``flwr run`` starts in a directory of Flower's choosing.
    """
    repo = Path(__file__).resolve().parents[2] / "configs"
    if (repo / "config.yaml").is_file():
        return repo
    bundled = Path(__file__).resolve().parents[1] / "_bundled_configs"
    if (bundled / "config.yaml").is_file():
        return bundled
    raise FileNotFoundError(f"no Hydra config tree found at {repo} or {bundled}")


def register_schemas() -> None:
    """Register the structured-config schema that ``configs/config.yaml`` builds on."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=AppConfig)


def _translate(err: BaseException) -> ConfigError | None:
    """Turn an OmegaConf error (possibly wrapped by Hydra) into a ConfigError."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OmegaConfBaseException):
            key = getattr(cur, "full_key", None) or "<config>"
            msg = str(cur).split("\n")[0]
            if "not in" in msg or "not in struct" in msg or "Key '" in msg:
                fix = f"unknown key ({msg}); check the spelling against fl_app/config/schema.py"
            else:
                fix = f"{msg}; use a value of the type declared in fl_app/config/schema.py"
            return ConfigError(str(key), getattr(cur, "value", None), fix)
        cur = cur.__cause__ or cur.__context__
    return None


def to_app_config(cfg: DictConfig | dict[str, Any]) -> AppConfig:
    """Convert a composed config to a typed, validated :class:`AppConfig`.

    A Hydra ``hydra`` node, if present, is ignored. Unknown keys and wrong types
    raise :class:`ConfigError` naming the dotted key.
    """
    try:
        schema = OmegaConf.structured(AppConfig)
        if isinstance(cfg, DictConfig):
            with_hydra = OmegaConf.to_container(cfg, resolve=True)
        else:
            with_hydra = dict(cfg)
        assert isinstance(with_hydra, dict)
        with_hydra.pop("hydra", None)
        merged = OmegaConf.merge(schema, with_hydra)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        translated = _translate(err)
        raise (translated or err) from err
    assert isinstance(obj, AppConfig)
    return validate_config(obj)


def parse_overrides(text: str) -> list[str]:
    """Split a ``hydra-overrides`` run-config string ("a=1 b='x y'") into overrides."""
    return shlex.split(text or "")


def compose_config(config_name: str = "config", overrides: list[str] | None = None) -> AppConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides, then validate.

    Used by the ServerApp under ``flwr run`` and by tests; clears any global Hydra
    state first (several compositions in one process are normal there).
    """
    from hydra import compose, initialize_config_dir

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            raw = compose(config_name=config_name, overrides=list(overrides or []))
    except HydraException as err:
        translated = _translate(err)
        if translated is not None:
            raise translated from err
        raise ConfigError("<overrides>", overrides, str(err).split("\n")[0]) from err
    finally:
        GlobalHydra.instance().clear()
    return to_app_config(raw)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def config_to_dict(cfg: AppConfig) -> dict[str, Any]:
    """Plain JSON-able dict of a config (enums as their values)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    assert isinstance(container, dict)
    return _jsonable(container)


def config_hash(cfg: AppConfig) -> str:
    """SHA-256 of the canonical JSON of the resolved config (recorded with every run)."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
