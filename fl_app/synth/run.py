"""``fl-app synth``: one site's data in, a DP surrogate, its card and a ledger line out.

Order (each step before the next, so nothing is released unaccounted):

1. the arguments are checked (ε, δ, levels, rows, an output folder that holds no
   surrogate yet: a surrogate is an immutable release with its own ledger key);
2. the site's rows are loaded exactly as its ClientApp loads them
   (:func:`fl_app.data.load_client_data`): a deployed site's file whole (``data-path``),
   a simulated partition (``--partition``), or the whole training pool of a built-in
   data set (the server's held-out test rows stay out, so a model trained on the
   surrogate can be tested on rows the synthesizer never saw);
3. they are binned into the public domain (:mod:`fl_app.synth.table`);
4. the release is checked against the site policy's ``max_epsilon`` and appended to the
   site's budget ledger (:mod:`fl_app.synth.accounting`);
5. the synthesizer runs (:mod:`fl_app.synth.mechanism`), the rows are written, then the
   card that pins them (:mod:`fl_app.synth.card`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import math
import os
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.atomic import write_atomic
from fl_app.client.policy import SitePolicy
from fl_app.config.schema import AppConfig, DatasetKind, PartitionerName
from fl_app.data import load_client_data
from fl_app.data.synthetic import CARD_FILE, CARD_MARKDOWN_FILE, DATA_FILE
from fl_app.synth.accounting import account_surrogate
from fl_app.synth.card import CardFacts, build_card, card_json, card_markdown
from fl_app.synth.mechanism import SynthError, Synthesizer, SynthMethod
from fl_app.synth.table import decode_table, encode_table, table_cardinalities

__all__ = ["SurrogateRequest", "SurrogateResult", "load_site_rows", "make_surrogate"]


@dataclass(frozen=True)
class SurrogateRequest:
    """What the data custodian asked for (``fl-app synth``'s arguments)."""

    out_dir: Path
    state_dir: Path
    site: str
    epsilon: float
    delta: float
    method: SynthMethod = SynthMethod.mst
    levels: int = 4
    rows: int | None = None
    partition: int | None = None
    node_config: dict[str, str] | None = None

    def check(self) -> None:
        """Refuse bad values with the flag's name and the fix (house rule 2)."""
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise SynthError(f"--epsilon must be a finite number > 0, found {self.epsilon}")
        if not (0 < self.delta < 1):
            raise SynthError(
                f"--delta must lie in (0, 1), found {self.delta}: MST and AIM are "
                "(epsilon, delta)-DP; take delta well below 1/rows"
            )
        if self.levels < 2:
            raise SynthError(f"--levels must be >= 2, found {self.levels}")
        if self.rows is not None and self.rows < 1:
            raise SynthError(f"--rows must be >= 1, found {self.rows}")
        if (self.out_dir / CARD_FILE).exists() or (self.out_dir / DATA_FILE).exists():
            raise SynthError(
                f"{self.out_dir} already holds a surrogate: each surrogate is its own "
                "release (and ledger entry); choose a new --out folder"
            )


@dataclass(frozen=True)
class SurrogateResult:
    card: dict[str, Any]
    site_epsilon: float
    site_delta: float


def load_site_rows(cfg: AppConfig, request: SurrogateRequest) -> tuple[np.ndarray, np.ndarray, str]:
    """The site's images and labels (train and validation splits together) and a line
    saying which rows they are."""
    d = cfg.dataset
    if request.partition is not None:
        data = load_client_data(d, request.partition, d.num_partitions, cfg.seed)
        where = f"partition {request.partition} of {d.num_partitions} ({d.kind.value})"
    else:
        whole = replace(d, num_partitions=1, partitioner=PartitionerName.iid)
        data = load_client_data(whole, 0, 1, cfg.seed, request.node_config)
        where = (
            "the site's data file"
            if d.kind is DatasetKind.local
            else f"the {d.kind.value} training pool (the server's held-out "
            f"{d.test_fraction:g} of rows excluded)"
        )
    x = np.concatenate([data.train.x, data.val.x])
    y = np.concatenate([data.train.y, data.val.y])
    return x, y, where


def _library_version() -> str:
    try:
        return metadata.version("smartnoise-synth")
    except metadata.PackageNotFoundError:
        return "not installed"


def make_surrogate(
    cfg: AppConfig,
    request: SurrogateRequest,
    synthesizer: Synthesizer,
    policy: SitePolicy | None = None,
) -> SurrogateResult:
    """Run steps 1-5 of the module docstring; returns the card and the site's total."""
    request.check()
    x, y, where = load_site_rows(cfg, request)
    low, high = (float(v) for v in cfg.dataset.input_range)
    table = encode_table(x, y, request.levels, low, high)
    cards = table_cardinalities(table.shape[1] - 1, request.levels, cfg.dataset.num_classes)
    release_id = f"synth-{os.urandom(8).hex()}"
    site_eps, site_delta = account_surrogate(
        request.state_dir, request.site, release_id, request.epsilon, request.delta, policy
    )
    rows = int(request.rows or len(table))
    sample = synthesizer(table, cards, request.epsilon, request.delta, rows)
    xs, ys = decode_table(sample, tuple(x.shape[1:]), request.levels, low, high)
    buf = io.BytesIO()
    np.savez(buf, x=xs, y=ys)
    blob = buf.getvalue()
    write_atomic(request.out_dir / DATA_FILE, blob)
    facts = CardFacts(
        release_id=release_id,
        site=request.site,
        method=request.method.value,
        library_version=_library_version(),
        epsilon=float(request.epsilon),
        delta=float(request.delta),
        source_kind=cfg.dataset.kind.value,
        source_rows=len(table),
        source_description=where,
        input_shape=tuple(int(s) for s in x.shape[1:]),
        num_classes=int(cfg.dataset.num_classes),
        levels=request.levels,
        input_range=(low, high),
        rows=len(ys),
        data_file=DATA_FILE,
        data_sha256=hashlib.sha256(blob).hexdigest(),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    card = build_card(facts)
    write_atomic(request.out_dir / CARD_MARKDOWN_FILE, card_markdown(card).encode())
    write_atomic(request.out_dir / CARD_FILE, card_json(card))
    return SurrogateResult(card=card, site_epsilon=site_eps, site_delta=site_delta)
