"""Secure-aggregation settings of a run, checked when the run is built, and the
cached derivation of a round's ``(k, t)`` (:func:`fl_app.secagg.derive.derive_params`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from fl_app.config.schema import SecAggConfig, SecAggMode
from fl_app.secagg import wire
from fl_app.secagg.crypto import MAX_BITS, MIN_BITS
from fl_app.secagg.derive import derive_params, federation_min_corrupt
from fl_app.secagg.params import MIN_CORRUPT_CLIENTS, GraphMode, SecAggParams, ServerModel

log = logging.getLogger("fl_app.secagg")


@dataclass(frozen=True)
class SecAggSettings:
    """Secure-aggregation parameters, checked when the run is built."""

    mode: GraphMode
    bits: int = 32
    dropout_tolerance: float = 0.2
    corrupt_fraction: float = 0.1
    stage_timeout_s: float = 60.0
    # Encoding bound when the privacy layer sends no clip norm (privacy.mode=none).
    clip: float | None = None
    max_weight: float = 1000.0
    # Rounds a client's stage-1 reply covers (one fresh key pair per round): a client
    # that holds keys for the round skips stage 1. 1 = stage 1 in every round.
    key_rounds: int = 16
    # What the thresholds (and, when malicious, the protocol) assume of the server.
    server_model: ServerModel = ServerModel.honest_but_curious
    # Sites in the federation (dataset.num_partitions; 0 = unknown, the cohort then).
    # Under ``malicious`` the colluder bound C is a fraction of it, not of the cohort,
    # because the clients count it so (fl_app.secagg.client.checks._check_malicious_round) and
    # refuse thresholds derived for fewer colluders.
    federation_size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.key_rounds <= wire.SECAGG_MAX_KEY_ROUNDS:
            raise ValueError(
                f"secagg.key_rounds must lie in [1, {wire.SECAGG_MAX_KEY_ROUNDS}], "
                f"found {self.key_rounds}"
            )
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"secagg.bits must lie in [{MIN_BITS}, {MAX_BITS}], found {self.bits}")
        if not self.stage_timeout_s > 0:
            raise ValueError(f"secagg.stage_timeout_s must be > 0, found {self.stage_timeout_s}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"secagg.clip must be > 0, found {self.clip}")
        if not self.max_weight > 0:
            raise ValueError(f"secagg.max_weight must be > 0, found {self.max_weight}")
        if self.federation_size < 0:
            raise ValueError(
                f"federation size must be >= 0 (0: the cohort), found {self.federation_size}"
            )
        if self.server_model is ServerModel.malicious and self.mode is not GraphMode.secagg:
            # The sparse graph is the server's choice and no client can verify it; the
            # clients refuse it under this model (fl_app.secagg.client), so say so here.
            raise ValueError(
                "secagg.server_model=malicious needs the complete graph: the SecAgg+ "
                "neighbour graph is drawn by the server and clients cannot check it (a "
                "server that builds it learns inputs or partial sums). Run with "
                "secagg=secagg (complete graph) or secagg.server_model=honest_but_curious"
            )

    @classmethod
    def from_config(cls, cfg: SecAggConfig, federation_size: int = 0) -> SecAggSettings | None:
        """``None`` for ``secagg.mode=off``; ``federation_size``: dataset.num_partitions."""
        if cfg.mode is SecAggMode.off:
            return None
        return cls(
            mode=GraphMode(cfg.mode.value),
            bits=int(cfg.bits),
            dropout_tolerance=float(cfg.dropout_tolerance),
            corrupt_fraction=float(cfg.corrupt_fraction),
            stage_timeout_s=float(cfg.stage_timeout_s),
            clip=None if cfg.clip is None else float(cfg.clip),
            max_weight=float(cfg.max_weight),
            key_rounds=int(cfg.key_rounds),
            server_model=ServerModel(cfg.server_model.value),
            federation_size=int(federation_size),
        )

    def min_corrupt(self) -> int:
        """Colluders the thresholds assume at least, whatever the cohort.

        Under ``malicious``: ``max(floor(corrupt_fraction * N), 1)`` over the federation's
        ``N`` sites, the bound every client checks at share-keys (a server that picks the
        cohort could pack it with the colluders it has; the fraction of a small cohort
        would assume fewer). Under ``honest_but_curious`` the server follows the protocol
        and samples fairly, so the cohort's fraction stands (:data:`MIN_CORRUPT_CLIENTS`).
        """
        if self.server_model is not ServerModel.malicious:
            return MIN_CORRUPT_CLIENTS
        return federation_min_corrupt(self.corrupt_fraction, self.federation_size)


@functools.lru_cache(maxsize=64)
def round_params(
    n: int,
    mode: GraphMode,
    drop: float,
    corrupt: float,
    model: ServerModel,
    min_corrupt: int = MIN_CORRUPT_CLIENTS,
) -> SecAggParams:
    return derive_params(
        n,
        mode=mode,
        dropout_tolerance=drop,
        corrupt_fraction=corrupt,
        server_model=model,
        min_corrupt=min_corrupt,
    )
