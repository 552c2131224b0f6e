"""The model card of a release: what was trained, on what, and under which guarantee.

The card (``model_card.json``; the same content as Markdown in ``model_card.md``)
states task, data, model, training, mechanism and threat model, z, C, sampling,
rounds, ε, δ, accountant, seed, config hash, code version, and what the release does
*not* protect (:mod:`fl_app.release.caveats`). Its numbers come from the run's checked
evidence (:mod:`fl_app.release.evidence`, :mod:`fl_app.release.privacy_evidence`).
A public card withholds a seed that drew DP noise (``privacy.secure_mode=false``);
the config hash it publishes is keyed by the run's secret salt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

from fl_app.config.guarantee import guarantee_of
from fl_app.config.schema import (
    AppConfig,
    DatasetKind,
    ModelName,
    PartitionerName,
    PrivacyMode,
    SecAggMode,
)
from fl_app.release.caveats import (
    central_noise_seeded,
    not_protected,
    record_noise_seeded,
)
from fl_app.release.evidence import sha256_hex
from fl_app.release.privacy_evidence import PrivacyEvidence
from fl_app.server.layout import MODEL_FILE

__all__ = [
    "CARD_VERSION",
    "NO_DP_BANNER",
    "Tier",
    "build_card",
    "client_level_noise_source",
    "fmt_value",
    "render_card_markdown",
]

CARD_VERSION = 1
NO_DP_BANNER = (
    "NO DIFFERENTIAL PRIVACY: this model carries NO differential-privacy guarantee. "
    "It was trained on the clients' data without clipping or noise and may memorise and "
    "reveal individual training records."
)


class Tier(str, Enum):
    public = "public"
    restricted = "restricted"


def _dataset_description(cfg: AppConfig) -> dict[str, Any]:
    d = cfg.dataset
    if d.kind is DatasetKind.digits:
        name = "scikit-learn digits (8x8 grey-scale handwritten digits)"
    elif d.kind is DatasetKind.hub:
        name = f"Hugging Face hub dataset {d.hub_path}"
    elif d.kind is DatasetKind.synthetic:
        name = (
            "a DP synthetic surrogate made by `fl-app synth`: the real rows it stands for are "
            "protected by the surrogate's own epsilon, stated in its card.json"
        )
    else:
        name = "per-institution local files (not described here)"
    return {"kind": d.kind.value, "name": name}


def _data_section(cfg: AppConfig) -> dict[str, Any]:
    from fl_app.config.compose import config_to_dict

    d = cfg.dataset
    partitioning: dict[str, Any] = {"partitioner": d.partitioner.value}
    if d.partitioner is PartitionerName.dirichlet:
        partitioning["dirichlet_alpha"] = d.dirichlet_alpha
    elif d.partitioner is PartitionerName.shard:
        partitioning["shards_per_partition"] = d.shards_per_partition
    elif d.partitioner is PartitionerName.natural:
        partitioning["natural_id_key"] = d.natural_id_key
    section = config_to_dict(cfg)["dataset"]
    canonical = json.dumps(section, sort_keys=True, separators=(",", ":")).encode()
    return {
        **_dataset_description(cfg),
        "num_clients": d.num_partitions,
        **partitioning,
        "server_test_split": (
            "none (the server holds no data)"
            if d.kind is DatasetKind.local
            else f"stratified hold-out of {d.test_fraction:g} of the rows, taken before "
            "partitioning (a hub dataset's own test split when it has one)"
        ),
        "test_fraction": d.test_fraction,
        "client_validation_fraction": d.val_fraction,
        "dataset_config_sha256": sha256_hex(canonical),
        "dataset_config_sha256_note": (
            "SHA-256 of the run's dataset configuration (canonical JSON): a fingerprint of "
            "how the data was chosen and split, not of the data bytes"
        ),
    }


def _model_section(cfg: AppConfig, parameter_count: int, weights_sha: str) -> dict[str, Any]:
    m = cfg.model
    arch: dict[str, Any] = {"name": m.name.value}
    if m.name is ModelName.mlp:
        arch["hidden"] = list(m.hidden)
    else:
        arch["channels"] = list(m.channels)
        arch["norm_groups"] = m.norm_groups
    arch["dropout"] = m.dropout
    return {
        **arch,
        "parameter_count": parameter_count,
        "file": MODEL_FILE,
        "format": "safetensors, float32, state_dict names of fl_app.models.build_model",
        "weights_sha256": weights_sha,
        # What left the sites (share.*): layers outside share.layers stayed at each site
        # and are not in this file (docs/personalization.md).
        "share_artifact": cfg.share.artifact.value,
        "shared_layers": list(cfg.share.layers),
    }


def _training_section(cfg: AppConfig, summary: Mapping[str, Any]) -> dict[str, Any]:
    s, t = cfg.strategy, cfg.train
    return {
        "rounds_run": summary["rounds"],
        "rounds_planned": summary["rounds_planned"],
        "stopped_early": summary.get("stopped_early"),
        # A degraded run's card says how many rounds updated the model and which were
        # lost (summary.json status and status_reason; absent in older run directories).
        "run_status": summary["status"],
        "rounds_model_updated": summary.get("rounds_model_updated"),
        "rounds_lost": summary.get("rounds_lost"),
        "status_reason": summary.get("status_reason"),
        "strategy": s.name.value,
        "client_sampling": s.sampling.value,
        "sample_rate": s.fraction_train,
        "local_epochs": t.local_epochs,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer.value,
        "lr": t.lr,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "proximal_mu": s.proximal_mu,
    }


def client_level_noise_source(cfg: AppConfig) -> str:
    """Where the client-level noise came from, for the card's ``noise_source``.

    Distributed DP's noise shares and randomised rounding are drawn in each client from
    SecureNoise (a ChaCha20 keystream under an OS-random key) whatever
    ``privacy.secure_mode`` says: a seed the server could know would let it subtract
    them. Only central DP's server-side noise follows ``privacy.secure_mode``.
    """
    if cfg.privacy.mode is PrivacyMode.distributed:
        return (
            "CSPRNG in each client (discrete Gaussian shares and rounding; "
            "privacy.secure_mode does not apply to them)"
        )
    if cfg.privacy.secure_mode:
        return "CSPRNG (privacy.secure_mode=true)"
    return "generator seeded by the run's config (privacy.secure_mode=false)"


def _client_level_card(cfg: AppConfig, summary: Mapping[str, Any], ledger: Any) -> dict[str, Any]:
    p = cfg.privacy
    priv = summary["privacy"]
    cl = priv.get("client_level", {})
    out: dict[str, Any] = {
        "mechanism": cl.get("mechanism"),
        "unit": "client (one institution's whole contribution)",
        "noise_multiplier_z": cl.get("noise_multiplier"),
        "clip_C": cl.get("clip"),
        "epsilon": priv["epsilon"],
        "delta": priv["delta"],
        "accountant": ledger.accountant.value,
        "budget_max_epsilon": cl.get("budget_max_epsilon"),
    }
    if p.mode is PrivacyMode.local:
        counts = [n for _, n in ledger.local]
        out.update(
            {
                "epsilon_is": "the largest per-client epsilon (each client accounts its own "
                "releases; no amplification by sampling)",
                "clients_accounted": len(counts),
                "max_releases_per_client": max(counts, default=0),
                "noise_source": "CSPRNG in each client",
            }
        )
        return out
    last = ledger.events[-1]
    out.update(
        {
            "clipping": p.clipping.value,
            "clip_side": p.clip_side.value,
            "clip_final": cl.get("clip_final"),
            "update_noise_multiplier": cl.get("update_noise_multiplier"),
            "clipped_count_stddev": cl.get("clipped_count_stddev"),
            "sampling": last.sampling.value,
            "sample_rate_q": last.sample_rate,
            "population": last.population,
            "expected_cohort": last.cohort,
            "neighbouring": cl.get("neighbouring"),
            "rounds_accounted": len(ledger.events),
            "epsilon_rdp_cross_check": cl.get("epsilon_rdp_cross_check"),
            "noise_source": client_level_noise_source(cfg),
        }
    )
    # epsilon per party (docs/privacy-branches.md): amplification by sampling holds only
    # against whoever does not know the cohorts.
    out.update(_against_server(cl))
    if "amplification" in cl:  # DP-FTRL (strategies.ftrl.ftrl_summary): no amplification
        out["epsilon_is"] = (
            "against anyone but the server, whether or not they know the cohorts (DP-FTRL: "
            "every round accounted at sampling rate 1, no amplification by sampling)"
        )
        out["ftrl"] = cl.get("ftrl")
    return out


def _against_server(cl: Mapping[str, Any]) -> dict[str, Any]:
    """Distributed/central DP's ε against the server, when the summary states it."""
    out: dict[str, Any] = {}
    against = cl.get("against_server")
    if isinstance(against, dict):
        out["epsilon_is"] = (
            "against outsiders, who do not know the cohorts (amplification by sampling); "
            "part of delta covers sampling-dependent round branches (delta_branches)"
        )
        out["delta_branches"] = cl.get("delta_branches")
        out["epsilon_against_server"] = {
            k: against.get(k)
            for k in (
                "epsilon_max_over_clients",
                "epsilon_planned_worst_case",
                "rounds_max_over_clients",
                "note",
            )
            if k in against
        }
    return out


def _record_level_card(cfg: AppConfig, summary: Mapping[str, Any]) -> dict[str, Any]:
    d = cfg.privacy.dpsgd
    priv = summary["privacy"]
    rl = priv["record_level"]
    per_client = [m for m in (rl.get("per_client") or {}).values() if isinstance(m, dict)]
    zs = sorted({float(m["noise-multiplier"]) for m in per_client if "noise-multiplier" in m})
    return {
        "mechanism": rl.get("mechanism"),
        "unit": "one training record of one institution",
        "noise_multiplier_z": d.noise_multiplier if d.noise_multiplier is not None else zs,
        "target_epsilon": d.target_epsilon,
        "clip_C": d.max_grad_norm,
        "sampling": "Poisson sampling of each institution's local records",
        "epsilon_max": priv["record_level_epsilon_max"],
        "epsilon_is": "the largest epsilon any institution reported (per-institution values "
        "only in the restricted tier)",
        "delta": d.delta,
        "accountant": d.accountant.value,
        "budget_max_epsilon": d.max_epsilon,
        "institutions_reporting": len(per_client),
        "institutions_budget_exhausted": len(rl.get("clients_budget_exhausted") or []),
        "noise_source": (
            "CSPRNG (privacy.secure_mode=true)"
            if cfg.privacy.secure_mode
            else "generators seeded by the run's config (privacy.secure_mode=false)"
        ),
    }


def build_card(
    cfg: AppConfig,
    summary: Mapping[str, Any],
    evidence: PrivacyEvidence,
    tier: Tier,
    parameter_count: int,
    exporter_version: str,
    published_hash: str | None,
    audit: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of a checked run (the content of ``model_card.json``); ``audit``:
    the cited empirical audit (:func:`fl_app.release.audit_citation.cite_audit`)."""
    from fl_app.privacy.noise import release_status

    evaluation = {
        "test_accuracy": summary.get("accuracy"),
        "test_loss": summary.get("loss"),
        "evaluated_on": (
            "the server's held-out test split (see data.server_test_split), after the last "
            "round, with the exported weights"
        ),
    }
    d = cfg.dataset
    return {
        "card_version": CARD_VERSION,
        "tier": tier.value,
        "release": release_status(cfg),
        "experiment_name": summary.get("experiment_name"),
        "task": {
            "type": "image classification",
            "dataset": _dataset_description(cfg)["name"],
            "num_classes": d.num_classes,
            "input_shape": list(d.input_shape),
            "input_scaling": f"pixel values divided by {d.pixel_scale:g}",
        },
        "data": _data_section(cfg),
        "model": _model_section(cfg, parameter_count, summary["weights_sha256"]),
        "training": _training_section(cfg, summary),
        "evaluation": evaluation,
        "privacy": {
            **_privacy_section(cfg, summary, evidence),
            **({"empirical_audit": dict(audit)} if audit is not None else {}),
        },
        "not_protected": not_protected(cfg),
        "reproducibility": _reproducibility_section(
            cfg, summary, tier, exporter_version, published_hash
        ),
    }


def _privacy_section(
    cfg: AppConfig, summary: Mapping[str, Any], evidence: PrivacyEvidence
) -> dict[str, Any]:
    p = cfg.privacy
    dp = evidence.client_level or evidence.record_level
    return {
        "differential_privacy": dp,
        "guarantee": (
            NO_DP_BANNER
            if not dp
            else "The released weights are differentially private at the (epsilon, delta) "
            "stated below, under the threat model and exceptions stated on this card."
        ),
        "mode": p.mode.value,
        "threat_model": p.threat_model.value,
        "threat_model_description": guarantee_of(cfg).protects,
        "secure_aggregation": cfg.secagg.mode.value,
        "secure_aggregation_server_model": (
            None if cfg.secagg.mode is SecAggMode.off else cfg.secagg.server_model.value
        ),
        "record_level": p.record_level,
        "client_level": (
            _client_level_card(cfg, summary, evidence.ledger) if evidence.client_level else None
        ),
        "record_level_dp": _record_level_card(cfg, summary) if evidence.record_level else None,
    }


def _reproducibility_section(
    cfg: AppConfig,
    summary: Mapping[str, Any],
    tier: Tier,
    exporter_version: str,
    published_hash: str | None,
) -> dict[str, Any]:
    seeded = central_noise_seeded(cfg) or record_noise_seeded(cfg)
    reproducibility: dict[str, Any] = {
        "config_hash": published_hash,
        "config_hash_is": _PUBLISHED_HASH_NOTE
        if published_hash is not None
        else "withheld: the run directory holds no config-hash salt (a run from before "
        "salted hashes); an unsalted hash would let anyone search for the seed",
        "code_version": summary["code_version"],
        "exported_with": exporter_version,
    }
    if tier is Tier.public and seeded:
        reproducibility["seed"] = None
        reproducibility["seed_withheld"] = (
            "the DP noise was drawn from generators seeded by it (privacy.secure_mode=false); "
            "publishing it would let anyone remove the noise"
        )
    else:
        reproducibility["seed"] = cfg.seed
    return reproducibility


_PUBLISHED_HASH_NOTE = (
    "HMAC-SHA256 of the run's config hash under a secret per-run salt kept in the run "
    "directory (run.json): whoever holds the run can show which config produced this "
    "model; nobody else can test guessed configs (e.g. seeds) against it"
)


def fmt_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(fmt_value(v) for v in value) or "n/a"
    return str(value)


def _table(rows: Mapping[str, Any], nested: bool = False) -> list[str]:
    """A two-column Markdown table of ``rows``.

    Dict values are skipped unless ``nested``, then flattened to ``key.sub`` rows: the
    Privacy table's dicts have sections of their own, but a DP section's dicts are
    part of the guarantee (distributed DP's epsilon against the server) and must not
    vanish from the Markdown card while the JSON card has them.
    """
    lines = ["| field | value |", "|---|---|"]
    for key, value in rows.items():
        if isinstance(value, dict) and nested:
            lines += _table({f"{key}.{k}": v for k, v in value.items()}, nested=True)[2:]
            continue
        if value is None or isinstance(value, dict):
            continue
        lines.append(f"| {key} | {fmt_value(value).replace('|', '/')} |")
    return lines


def render_card_markdown(card: Mapping[str, Any]) -> str:
    """The Markdown form of a model card (the same content as its JSON)."""
    priv = card["privacy"]
    title = card.get("experiment_name") or "fl-app model"
    out = [f"# Model card: {title}", ""]
    release = card.get("release") or {}
    if release.get("for_release") is False:
        why = "; ".join(release.get("reasons") or [])
        out += [f"> **{str(release.get('status', '')).upper()}: {why}**", ""]
    if not priv["differential_privacy"]:
        out += [f"> **WARNING: {priv['guarantee']}**", ""]
    else:
        out += [f"> {priv['guarantee']}", ""]
    out += [f"Export tier: **{card['tier']}**.", ""]
    sections = [
        ("Task", card["task"]),
        ("Data", card["data"]),
        ("Model", card["model"]),
        ("Training", card["training"]),
        ("Evaluation", card["evaluation"]),
    ]
    for heading, rows in sections:
        out += [f"## {heading}", "", *_table(rows), ""]
    out += ["## Privacy", "", *_table(priv), ""]
    if priv.get("client_level"):
        out += ["### Client-level DP", "", *_table(priv["client_level"], nested=True), ""]
    if priv.get("record_level_dp"):
        out += [
            "### Record-level DP-SGD",
            "",
            *_table(priv["record_level_dp"], nested=True),
            "",
        ]
    audit = priv.get("empirical_audit")
    if audit:
        out += ["### Empirical privacy audit", ""]
        out += [*_table({k: v for k, v in audit.items() if k != "bounds"}), ""]
        out += [f"- {b['audit']}: {b['statement']}" for b in audit.get("bounds") or []]
        out += [""] if audit.get("bounds") else []
    out += ["## What is NOT protected", ""]
    out += [f"- {item}" for item in card["not_protected"]]
    out += ["", "## Reproducibility", "", *_table(card["reproducibility"]), ""]
    return "\n".join(out)


# ---- restricted-tier files --------------------------------------------------------
