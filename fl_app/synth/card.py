"""The surrogate's card: what was released, under which ε, and what it can't tell you.

``card.json`` is the machine-readable record ``dataset=synthetic`` checks (its
``data_sha256`` pins the file, :mod:`fl_app.data.synthetic`); ``card.md`` says the same
for a person. The card is meant to travel with the surrogate to outside researchers, so
it states only the surrogate's own ε and δ, never the site's total over its other
releases (that stays in the site's ledger and on the operator's terminal), and no seed:
there is none to state (:mod:`fl_app.synth.mechanism`, "Randomness").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["CARD_FORMAT", "CardFacts", "build_card", "card_json", "card_markdown"]

CARD_FORMAT = "fl-app synthetic surrogate card"
CARD_VERSION = 1

PAPERS = {
    "mst": "McKenna, Miklau and Sheldon, Winning the NIST Contest: A scalable and general "
    "approach to differentially private synthetic data, JPC 2021",
    "aim": "McKenna, Mullins, Sheldon and Miklau, AIM: An Adaptive and Iterative Mechanism "
    "for Differentially Private Synthetic Data, VLDB 2022",
}


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states, gathered by :func:`fl_app.synth.run.make_surrogate`."""

    release_id: str
    site: str
    method: str
    library_version: str
    epsilon: float
    delta: float
    source_kind: str
    source_rows: int
    source_description: str
    input_shape: tuple[int, ...]
    num_classes: int
    levels: int
    input_range: tuple[float, float]
    rows: int
    data_file: str
    data_sha256: str
    created: str


def _limits(facts: CardFacts) -> list[str]:
    lo, hi = facts.input_range
    return [
        f"Pixels are binned into {facts.levels} levels of [{lo:g}, {hi:g}]; a model trained "
        "on the surrogate sees only those levels.",
        "The synthesizer keeps the 1-way marginals and the 2-way marginals it selects (MST: "
        "a spanning tree of column pairs): structure spanning three or more pixels (strokes, "
        "shapes) is not preserved, so accuracy on the surrogate understates or overstates "
        "real accuracy; docs/synthetic-data.md reports how far a result carries on digits.",
        "The unit of privacy is one row (one image and its label) of the site's data; a "
        "person with several rows is protected with group privacy (k rows: k epsilon).",
        f"The row count ({facts.source_rows}) is treated as public: the synthesizer "
        "estimates with it and the surrogate has as many rows unless --rows says otherwise.",
        "Not reproducible byte for byte by design: the noise comes from OpenDP's CSPRNG "
        "(unseedable). A run on this surrogate is reproducible from this card: "
        "dataset=synthetic checks the file against data_sha256.",
    ]


def build_card(facts: CardFacts) -> dict[str, Any]:
    """The card's JSON document."""
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "release_id": facts.release_id,
        "created": facts.created,
        "site": facts.site,
        "method": {
            "library": "smartnoise-synth",
            "library_version": facts.library_version,
            "synthesizer": facts.method,
            "paper": PAPERS.get(facts.method, ""),
        },
        "privacy": {
            "epsilon": facts.epsilon,
            "delta": facts.delta,
            "definition": "(epsilon, delta)-DP via zCDP, neighbouring tables differ in one row",
            "unit": "one row: one image and its label",
            "accounted_in": f"the site's budget ledger site-budget-{facts.site}.jsonl "
            f"(kind 'synthetic data', key {facts.release_id})",
            "row_count_public": True,
        },
        "source": {
            "dataset_kind": facts.source_kind,
            "rows": facts.source_rows,
            "description": facts.source_description,
        },
        "preprocessing": {
            "features": "each pixel binned into equal-width levels of the configured range; "
            "level k decodes to low + k (high - low) / (levels - 1)",
            "levels": facts.levels,
            "input_range": list(facts.input_range),
            "input_shape": list(facts.input_shape),
            "label_classes": facts.num_classes,
            "domain_from": "the config (never inferred from the data)",
        },
        "randomness": {
            "seed": None,
            "noise": "OpenDP's Gaussian sampler: the operating system's CSPRNG, not seedable",
            "selection_and_sampling": "NumPy's global RNG, seeded from os.urandom for this "
            "call only and never stored",
            "reproducible": "the surrogate run, from data_sha256; not the synthesis",
        },
        "rows": facts.rows,
        "data_file": facts.data_file,
        "data_sha256": facts.data_sha256,
        "run_with": "fl-app simulate dataset=synthetic dataset.synthetic_path=<this folder>",
        "limits": _limits(facts),
    }


def card_markdown(card: dict[str, Any]) -> str:
    """``card.md``: the card for a person."""
    priv, pre, method = card["privacy"], card["preprocessing"], card["method"]
    lines = [
        f"# Synthetic surrogate {card['release_id']}",
        "",
        f"- **Method:** {method['library']} {method['library_version']}, "
        f"{method['synthesizer'].upper()} ({method['paper']})",
        f"- **Privacy:** epsilon {priv['epsilon']:g}, delta {priv['delta']:g} "
        f"({priv['definition']}; unit: {priv['unit']})",
        f"- **Accounted in:** {priv['accounted_in']}",
        f"- **Source:** {card['source']['description']} ({card['source']['rows']} rows)",
        f"- **Preprocessing:** {pre['levels']} levels per pixel of {pre['input_range']}, "
        f"images {pre['input_shape']}, {pre['label_classes']} label classes; domain from "
        f"{pre['domain_from']}",
        f"- **Seed:** none ({card['randomness']['noise']}; "
        f"{card['randomness']['selection_and_sampling']})",
        f"- **Rows:** {card['rows']} in `{card['data_file']}`, SHA-256 `{card['data_sha256']}`",
        f"- **Run on it:** `{card['run_with']}`",
        "",
        "## Limits",
        "",
        *[f"- {limit}" for limit in card["limits"]],
        "",
    ]
    return "\n".join(lines)


def card_json(card: dict[str, Any]) -> bytes:
    """The card as written: sorted keys, indented, strict JSON (no NaN)."""
    return (json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
