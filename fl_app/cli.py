"""The ``fl-app`` command.

``fl-app simulate [hydra overrides...]``  run an experiment (Hydra main; ``-m`` sweeps)
``fl-app config [hydra overrides...]``    print the composed, validated config
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["main"]

USAGE = """usage: fl-app <command> [hydra overrides...]

commands:
  simulate   run an experiment in simulation (default: digits, 10 IID clients, 5 rounds)
             e.g. fl-app simulate strategy=fedadam dataset.partitioner=dirichlet
                  fl-app simulate experiment=digits_dirichlet
                  fl-app simulate -m strategy=fedavg,fedadam seed=1,2
  config     print the composed and validated config for the given overrides

Hydra's own flags work after `simulate` (--help, --cfg job, -m, hydra.run.dir=...).
"""


def _simulate_task(raw: Any) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from fl_app.config.compose import to_app_config
    from fl_app.config.validate import ConfigError
    from fl_app.simulation import run_simulation_experiment

    try:
        cfg = to_app_config(raw)
    except ConfigError as err:
        print(f"fl-app: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    run_dir = HydraConfig.get().runtime.output_dir
    summary = run_simulation_experiment(cfg, run_dir)
    acc = summary.get("accuracy")
    return float(acc) if acc is not None else None


def _run_hydra(argv: list[str]) -> None:
    import hydra

    from fl_app.config.compose import config_dir, register_schemas

    register_schemas()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(
        _simulate_task
    )()


def _print_config(argv: list[str]) -> None:
    import yaml

    from fl_app.config.compose import compose_config, config_hash, config_to_dict
    from fl_app.config.validate import ConfigError

    try:
        cfg = compose_config("config", argv)
    except ConfigError as err:
        print(f"fl-app: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print(f"# config hash: {config_hash(cfg)}")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "simulate":
        _run_hydra(rest)
    elif command == "config":
        _print_config(rest)
    else:
        print(f"fl-app: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
