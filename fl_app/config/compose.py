"""Compose, type-check and validate experiment configs from the Hydra tree.

Three entry points meet here: ``fl-app simulate`` (Hydra's own ``@hydra.main`` hands
us a ``DictConfig``), the ServerApp under ``flwr run`` (which composes from the
bundle's ``configs/`` given ``hydra-config-name``/``hydra-overrides``), and tests.
All of them end in :func:`to_app_config`, so a config is checked the same way
whichever path started the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import shlex
import typing
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_app.config.errors import ConfigError
from fl_app.config.plan import RunPlan, resolve
from fl_app.config.schema import AppConfig

__all__ = [
    "RUN_HOW_KEYS",
    "SCHEMA_NAME",
    "check_override_keys",
    "compose_config",
    "compose_plan",
    "config_dir",
    "config_hash",
    "config_to_dict",
    "parse_overrides",
    "preflight",
    "register_schemas",
    "run_config_hash",
    "schema_keys",
    "suggest_key",
    "to_app_config",
    "to_app_plan",
    "to_typed_config",
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


@functools.lru_cache(maxsize=1)
def _schema_tree() -> tuple[frozenset[str], frozenset[str]]:
    """(every dotted key of :class:`AppConfig`, the keys that are sections)."""
    keys: set[str] = set()
    sections: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            keys.add(key)
            sub = hints[f.name]
            if dataclasses.is_dataclass(sub) and isinstance(sub, type):
                sections.add(key)
                walk(sub, f"{key}.")

    walk(AppConfig, "")
    return frozenset(keys), frozenset(sections)


def schema_keys() -> frozenset[str]:
    """Every dotted key of :class:`AppConfig` (``privacy.dpsgd.noise_multiplier``, ...)."""
    return _schema_tree()[0]


def _config_groups() -> frozenset[str]:
    """The Hydra groups of ``configs/`` (``privacy``, ``dataset``...), chosen as ``group=name``."""
    return frozenset(
        p.name for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )


def suggest_key(key: str) -> str | None:
    """The schema key or config group closest to a misspelt ``key``, or None.

    Tries the whole dotted key first (``privacy.noise_multipler``), then the last
    part alone, so a key given at the wrong depth (``privacy.max_grad_norm``) still
    finds ``privacy.dpsgd.max_grad_norm``.
    """
    known = sorted(schema_keys() | _config_groups())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    close = difflib.get_close_matches(leaf, sorted(by_leaf), n=1, cutoff=0.75)
    if close:
        # Prefer a candidate under the same top-level section as the key typed.
        head = key.split(".", 1)[0]
        options = by_leaf[close[0]]
        return next((k for k in options if k.split(".", 1)[0] == head), options[0])
    return None


def _unknown_key_fix(key: str, value: str | None) -> str:
    """The fix for an unknown key: a "did you mean" from the schema, never ``+key=``.

    Hydra's own hint (``To append to your config use +key=value``) fails again, one
    step later, against the structured schema; it would only ever add a stray key.
    """
    guess = suggest_key(key)
    where = "(keys: fl_app/config/schema.py; groups: the folders of configs/)"
    if guess is None:
        return f"unknown key or config group {where}"
    shown = f"{guess}={value}" if value is not None else guess
    return f"unknown key or config group; did you mean `{shown}`? {where}"


def check_override_keys(overrides: Iterable[str]) -> None:
    """Refuse an override whose key is neither a schema key nor a config group.

    Runs before Hydra composes (and before ``@hydra.main`` makes a run directory), so a
    typo such as ``privcy=central`` or ``privacy.noise_multipler=1`` gets a "did you
    mean" instead of Hydra's ``+privcy=`` advice. Hydra's own keys (``hydra.*``,
    ``hydra/...``), deletions (``~key``), packaged group overrides (``group@pkg=``)
    and the elements of list or dict values are left to Hydra.

    Raises
    ------
    ConfigError
        Naming the key, the override and the closest known key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    known, sections = _schema_tree()
    groups = _config_groups()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:
            continue  # a syntax error: Hydra's own message names it
        key = override.key_or_group
        if (
            override.type is OverrideType.DEL
            or override.package is not None
            or key.split(".", 1)[0].split("/", 1)[0] == "hydra"
            or key in known
            or key in groups
            or key.split("/", 1)[0] in groups
        ):
            continue
        parts = key.split(".")
        heads = (".".join(parts[:i]) for i in range(1, len(parts)))
        if any(h in known and h not in sections for h in heads):
            continue  # an element of a list or dict value, e.g. dataset.input_shape.0
        value = text.split("=", 1)[1] if "=" in text else None
        raise ConfigError(key, text, _unknown_key_fix(key, value))


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
                # A typo inside a YAML file (overrides were checked before composing).
                fix = _unknown_key_fix(str(key), None)
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
    return to_app_plan(cfg).cfg


def to_app_plan(cfg: DictConfig | dict[str, Any]) -> RunPlan:
    """:func:`to_app_config`, returning the resolved plan (:func:`resolve`) with it."""
    # Resolving (calibration, parameter count) makes an impossible plan fail now, not
    # at round 1; a run in another process resolves its own plan from the config.
    return resolve(to_typed_config(cfg))


def to_typed_config(cfg: DictConfig | dict[str, Any]) -> AppConfig:
    """The typed :class:`AppConfig` of a composed config, not yet resolved: a caller that
    already holds the plan of an equal config (``fl-app simulate``'s preflight) reuses it
    instead of resolving twice. Unknown keys and wrong types raise :class:`ConfigError`."""
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
    return obj


def parse_overrides(text: str) -> list[str]:
    """Split a ``hydra-overrides`` run-config string ("a=1 b='x y'") into overrides."""
    return shlex.split(text or "")


def compose_config(config_name: str = "config", overrides: list[str] | None = None) -> AppConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides, then validate.

    Used by the ServerApp under ``flwr run`` and by tests; clears any global Hydra
    state first (several compositions in one process are normal there).
    """
    return compose_plan(config_name, overrides).cfg


def compose_plan(config_name: str = "config", overrides: list[str] | None = None) -> RunPlan:
    """:func:`compose_config`, returning the resolved plan (built once) with the config."""
    from hydra import compose, initialize_config_dir

    check_override_keys(overrides or [])
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
    return to_app_plan(raw)


def preflight(argv: list[str]) -> RunPlan | None:
    """Check ``fl-app simulate`` arguments before ``@hydra.main`` makes a run directory.

    Every override's key is checked against the schema (a sweep's too). A single run
    without Hydra flags is also composed and validated, and its local data files are
    read (:func:`fl_app.data.check_local_data`) and its device checked on this machine
    (:func:`~fl_app.config.validate_device.check_simulation_hardware`), so a config,
    data or device error ends the
    command with no run directory left behind. A sweep's jobs are validated one by
    one when they run.

    Returns
    -------
    RunPlan or None
        The resolved plan of a single run (the run reuses it); None for a sweep or
        Hydra flags.

    Raises
    ------
    ConfigError, DataError
        The first problem found.
    """
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    check_override_keys(overrides)
    if any(a.startswith("-") for a in argv):
        return None  # -m, --cfg, --help...: Hydra's own modes
    from fl_app.data import check_local_data

    own = [
        a for a in overrides if re.split(r"[./@]", a.split("=", 1)[0].lstrip("+~"))[0] != "hydra"
    ]
    plan = compose_plan("config", own)
    check_local_data(plan.cfg.dataset, plan.cfg.seed)
    from fl_app.config.validate_device import check_simulation_hardware

    check_simulation_hardware(plan.cfg)  # train.device and GPU shares exist here
    return plan


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


#: Config keys that say how to run, not what: a run's config hash excludes them, so a
#: resumed, rolled-back or head-signed run keeps its hash. The one definition, used where
#: a run records its hash (fl_app.server.rundir) and where an export re-checks it
#: (fl_app.release.evidence).
RUN_HOW_KEYS = ("resume", "rollback_to", "audit_signing_key")


def run_config_hash(cfg: AppConfig) -> str:
    """The run's config hash: :func:`config_hash` with :data:`RUN_HOW_KEYS` unset."""
    unset: dict[str, Any] = dict.fromkeys(RUN_HOW_KEYS)
    return config_hash(dataclasses.replace(cfg, **unset))
