"""``dataset.kind=synthetic``: the rows of a DP synthetic surrogate (``fl-app synth``).

A surrogate is a folder that ``fl-app synth`` wrote (:mod:`fl_app.synth`): the rows in
``synthetic.npz`` (``x`` scaled to [0, 1] like every source, ``y``) and their card,
``card.json``, which pins the file by its SHA-256. The loader refuses a file whose hash
is not the card's: a run "on the surrogate of card C" is then reproducible from the card
(the same bytes, the same seeded split and partitions), and a sandbox cannot be handed a
different file under the card's ε. The rows then go through the same pipeline as
``digits`` (stratified server holdout, partitioner, train/val split), so the surrogate
run is the same experiment with the data swapped (docs/synthetic-data.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fl_app.config.schema import DatasetConfig, LocalFormat
from fl_app.data.errors import DataError
from fl_app.data.local_files import load_local_source
from fl_app.data.sources import InMemorySource

__all__ = [
    "CARD_FILE",
    "CARD_MARKDOWN_FILE",
    "DATA_FILE",
    "load_synthetic_source",
    "read_card",
    "synthetic_data_path",
]

# The files of a surrogate folder; fl_app.synth writes them under these names.
DATA_FILE = "synthetic.npz"
CARD_FILE = "card.json"
CARD_MARKDOWN_FILE = "card.md"
_FIELD = "dataset.synthetic_path"


def synthetic_data_path(cfg: DatasetConfig) -> Path:
    """The surrogate's data file (``<dataset.synthetic_path>/synthetic.npz``)."""
    if not cfg.synthetic_path:
        raise DataError(
            f"dataset.kind=synthetic needs {_FIELD}: the folder `fl-app synth --out` wrote"
        )
    return Path(cfg.synthetic_path).expanduser() / DATA_FILE


def read_card(folder: str | Path) -> dict[str, Any]:
    """The surrogate's card (``card.json``), strictly: a mapping with ``data_sha256``."""
    path = Path(folder).expanduser() / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: {_FIELD} must name a folder written by `fl-app synth`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a readable surrogate card: {err}") from None
    if not isinstance(card, dict) or not isinstance(card.get("data_sha256"), str):
        raise DataError(f"{path} holds no data_sha256: not a card written by `fl-app synth`")
    return card


def load_synthetic_source(cfg: DatasetConfig) -> InMemorySource:
    """The surrogate's rows, after checking the file is the one its card pins.

    Raises
    ------
    DataError
        Naming ``dataset.synthetic_path`` when the folder, card or file is missing, or the
        file's SHA-256 differs from the card's (edited, truncated or swapped).
    """
    path = synthetic_data_path(cfg)
    card = read_card(path.parent)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"{_FIELD}: cannot read {path}: {err}") from None
    if digest != card["data_sha256"]:
        raise DataError(
            f"{path} hashes to {digest[:16]}..., not to its card's data_sha256 "
            f"{card['data_sha256'][:16]}...: the file is not the surrogate the card "
            f"describes; point {_FIELD} at an unmodified `fl-app synth` output"
        )
    # Surrogate features are stored scaled to [0, 1] whatever the site's pixel_scale.
    return load_local_source(path, replace(cfg, local_format=LocalFormat.npz, pixel_scale=1.0))
