"""``fl-app synth``: a DP synthetic surrogate of one site's data, and how far it carries.

``fl-app synth --out DIR --epsilon E --state-dir S (--site-name N | --data-path F |
--partition K) [hydra overrides...]`` runs as the site's data custodian: it reads the
site's rows, records the release in the site's budget ledger and writes the surrogate
with its card (:mod:`fl_app.synth.run`). ``fl-app synth --compare REAL_RUN SURROGATE_RUN``
evaluates both runs' models on the real test rows (:mod:`fl_app.synth.compare`).
docs/synthetic-data.md walks through both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["synth_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-app synth",
        description="A differentially private synthetic copy of one site's data (MST or "
        "AIM from smartnoise-synth), accounted in the site's budget ledger, with a card.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment config")
    p.add_argument("--out", type=Path, help="new folder for synthetic.npz, card.json, card.md")
    p.add_argument("--epsilon", type=float, help="the surrogate's epsilon (> 0)")
    p.add_argument("--delta", type=float, default=1e-6, help="its delta (default 1e-6)")
    p.add_argument("--method", choices=["mst", "aim"], default="mst")
    p.add_argument(
        "--levels",
        type=int,
        default=4,
        help="pixel levels of the configured input range (default 4; digits: 17 keeps every "
        "raw value but MST then takes far longer)",
    )
    p.add_argument("--rows", type=int, default=None, help="rows to sample (default: as many)")
    p.add_argument(
        "--state-dir", type=Path, help="the site's DP state folder (its budget ledger lives there)"
    )
    site = p.add_mutually_exclusive_group()
    site.add_argument("--site-name", help="the site's name (as in its site YAML)")
    site.add_argument("--data-path", help="the site's own data file (dataset=local)")
    site.add_argument("--partition", type=int, help="a simulated partition id")
    p.add_argument("--policy", type=Path, default=None, help="the site's policy (max_epsilon)")
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("REAL_RUN", "SURROGATE_RUN"),
        help="evaluate a real-data run and a dataset=synthetic run on the real test rows",
    )
    return p


def _node_config(args: argparse.Namespace) -> dict[str, str]:
    if args.site_name is not None:
        return {"site-name": args.site_name}
    if args.data_path is not None:
        return {"data-path": str(Path(args.data_path).resolve())}
    return {"partition-id": str(args.partition)}


def _make(args: argparse.Namespace) -> int:
    from fl_app.client.identity import site_identity
    from fl_app.client.policy_file import load_policy
    from fl_app.config.compose import compose_config
    from fl_app.synth.mechanism import SnsynthSynthesizer, SynthMethod
    from fl_app.synth.run import SurrogateRequest, make_surrogate

    missing = [
        f"--{n.replace('_', '-')}"
        for n in ("out", "epsilon", "state_dir")
        if getattr(args, n) is None
    ]
    if args.site_name is None and args.data_path is None and args.partition is None:
        missing.append("one of --site-name, --data-path, --partition")
    if missing:
        print(f"fl-app synth: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.data_path is not None:
        overrides = ["dataset=local", "server_eval=false", *overrides]
    cfg = compose_config("config", overrides)
    node_config = _node_config(args)
    request = SurrogateRequest(
        out_dir=args.out,
        state_dir=args.state_dir,
        site=site_identity(node_config),
        epsilon=args.epsilon,
        delta=args.delta,
        method=SynthMethod(args.method),
        levels=args.levels,
        rows=args.rows,
        partition=args.partition,
        node_config=node_config if args.data_path is not None else None,
    )
    policy = load_policy(args.policy) if args.policy is not None else None
    result = make_surrogate(cfg, request, SnsynthSynthesizer(request.method), policy)
    card = result.card
    print(
        f"surrogate {card['release_id']}: {card['rows']} rows in {args.out}, "
        f"epsilon {card['privacy']['epsilon']:g}, delta {card['privacy']['delta']:g}\n"
        f"site {request.site}: every release on its data now totals epsilon "
        f"{result.site_epsilon:.4g}, delta {result.site_delta:.3g} (its budget ledger; not "
        "in the card)\n"
        f"run on it: fl-app simulate dataset=synthetic dataset.synthetic_path={args.out}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fl_app.atomic import write_atomic
    from fl_app.synth.compare import compare_markdown, compare_runs

    real, surrogate = args.compare
    doc = compare_runs(real, surrogate)
    if args.out is not None:
        write_atomic(args.out / "compare.json", (json.dumps(doc, indent=2) + "\n").encode())
        write_atomic(args.out / "compare.md", compare_markdown(doc).encode())
    print(compare_markdown(doc))
    return 0


def synth_main(argv: list[str] | None = None) -> int:
    """Entry point of ``fl-app synth``; returns the exit status."""
    args = _parser().parse_args(argv)
    from fl_app.client.policy import PolicyError
    from fl_app.client.refusal import ClientRefusal
    from fl_app.config.errors import ConfigError
    from fl_app.data import DataError
    from fl_app.privacy.state import PrivacyStateError
    from fl_app.synth.mechanism import SynthError

    try:
        return _compare(args) if args.compare else _make(args)
    except (
        ClientRefusal,
        ConfigError,
        DataError,
        PolicyError,
        PrivacyStateError,
        SynthError,
    ) as err:
        print(f"fl-app synth: {err}", file=sys.stderr)
        return 2
