"""Secure-aggregation checks on a composed :class:`AppConfig`.

Bit width, dropout and colluder fractions, the server model, and the cohorts the run
can sample: secure aggregation must have parameters (thresholds, an encoding without
overflow) for every one of them, or the run is refused before it starts.
"""

from __future__ import annotations

import functools
import math

from fl_app.config.errors import ConfigPlanError
from fl_app.config.errors import require as _check
from fl_app.config.errors import require_in as _in
from fl_app.config.errors import require_positive as _positive
from fl_app.config.schema import AppConfig, PrivacyMode, SamplingMode, SecAggMode
from fl_app.secagg.crypto import MAX_BITS, MIN_BITS

__all__ = ["check_secagg"]


def check_secagg(cfg: AppConfig) -> None:
    s = cfg.secagg
    _in(
        MIN_BITS <= s.bits <= MAX_BITS,
        "secagg.bits",
        s.bits,
        f"must lie in [{MIN_BITS}, {MAX_BITS}]",
    )
    _in(
        0 <= s.dropout_tolerance < 1,
        "secagg.dropout_tolerance",
        s.dropout_tolerance,
        "must lie in [0, 1)",
    )
    _in(
        0 <= s.corrupt_fraction < 1,
        "secagg.corrupt_fraction",
        s.corrupt_fraction,
        "must lie in [0, 1)",
    )
    _positive(s.stage_timeout_s, "secagg.stage_timeout_s")
    _positive(s.max_weight, "secagg.max_weight")
    from fl_app.secagg.wire import SECAGG_MAX_KEY_ROUNDS  # the wire limit clients enforce

    _in(
        isinstance(s.key_rounds, int) and 1 <= s.key_rounds <= SECAGG_MAX_KEY_ROUNDS,
        "secagg.key_rounds",
        s.key_rounds,
        f"must be an integer in [1, {SECAGG_MAX_KEY_ROUNDS}] (1: fresh keys exchanged in "
        "every round)",
    )
    if s.mode is SecAggMode.off:
        _check(
            s.clip is None,
            "secagg.clip",
            s.clip,
            "has no effect with secagg=off; remove it (client-level DP clipping is privacy.clip)",
        )
        return
    _check_bound(cfg)
    _check_encoding(cfg)
    _check_cohorts(cfg)


def _check_bound(cfg: AppConfig) -> None:
    """Secure aggregation encodes bounded inputs: the DP clip norm or ``secagg.clip``."""
    s = cfg.secagg
    p = cfg.privacy
    _check(
        p.mode in (PrivacyMode.none, PrivacyMode.central, PrivacyMode.distributed),
        "privacy.mode",
        p.mode.value,
        "secure aggregation needs bounded inputs; local DP noise is unbounded and cannot be "
        "encoded without overflow (and already hides updates from the server): use "
        "privacy=none with secagg.clip, privacy=distributed, or privacy.mode=central with "
        "privacy.threat_model=honest_but_curious and privacy.clip_side=client",
    )
    if p.mode is PrivacyMode.none:
        _check(
            s.clip is not None,
            "secagg.clip",
            s.clip,
            "secure aggregation encodes each update in fixed point and needs an L2 bound: set "
            "secagg.clip (e.g. 10.0; clients clip to it), or use client-level DP with "
            "privacy.clip_side=client",
        )
        assert s.clip is not None
        _positive(s.clip, "secagg.clip")
    else:
        _check(
            s.clip is None,
            "secagg.clip",
            s.clip,
            "with client-level DP the encoding bound is the DP clip norm (privacy.clip); "
            "remove secagg.clip",
        )
    _check(
        s.server_model.value != "malicious" or s.mode.value == "secagg",
        "secagg.server_model",
        s.server_model.value,
        "the malicious server model needs the complete graph: the SecAgg+ neighbour graph "
        "is drawn by the server and clients cannot verify it (a server that builds it "
        "learns inputs or partial sums), so clients refuse it. Use secagg=secagg with "
        "secagg.server_model=malicious, or secagg.server_model=honest_but_curious",
    )


def _check_encoding(cfg: AppConfig) -> None:
    """Overflow is impossible by construction if the codec exists for the largest cohort
    the run can sample: every partition (the Poisson upper bound). Under distributed DP
    the ring is sized by the distributed-DP plan instead (checked when the plan is
    resolved, naming secagg.bits)."""
    from fl_app.secagg.encoding import FixedPointCodec, FixedPointConfigError

    s = cfg.secagg
    n = cfg.dataset.num_partitions
    if cfg.privacy.mode is not PrivacyMode.distributed:
        try:
            FixedPointCodec(bits=s.bits, max_abs=1.0, max_contributors=n)
        except FixedPointConfigError as err:
            raise ConfigPlanError(
                "secagg.bits",
                s.bits,
                f"the masked sum of up to {n} clients (dataset.num_partitions) cannot be "
                f"encoded without overflow at useful resolution ({err}); use secagg.bits=64 "
                "or fewer clients",
            ) from err


def _check_cohorts(cfg: AppConfig) -> None:
    """Secure aggregation has thresholds for every cohort size the run can sample."""
    from fl_app.privacy.round_event import fixed_cohort_size
    from fl_app.secagg.derive import derive_params, federation_min_corrupt
    from fl_app.secagg.params import MIN_CORRUPT_CLIENTS, SecAggConfigError

    s = cfg.secagg
    n = cfg.dataset.num_partitions
    if cfg.strategy.sampling is SamplingMode.fixed:
        cohorts = {fixed_cohort_size(cfg.strategy.fraction_train, n)}
    else:
        cohorts = {n, max(3, round(cfg.strategy.fraction_train * n))}
    # Under the malicious model the colluder bound is a fraction of the federation (the
    # clients count it so at share-keys and refuse a cohort too small for it); the server
    # derives its thresholds with the same C (fl_app.secagg.settings.SecAggSettings).
    malicious = s.server_model.value == "malicious"
    min_corrupt = (
        federation_min_corrupt(s.corrupt_fraction, n) if malicious else MIN_CORRUPT_CLIENTS
    )
    for m in sorted(cohorts):
        _check(
            m >= 3,
            "strategy.fraction_train",
            cfg.strategy.fraction_train,
            f"secure aggregation needs cohorts of >= 3 clients; this samples {m} of {n}",
        )
        derive = functools.partial(
            derive_params,
            m,
            mode=s.mode.value,
            dropout_tolerance=s.dropout_tolerance,
            corrupt_fraction=s.corrupt_fraction,
            server_model=s.server_model.value,
        )
        try:
            derive()
        except SecAggConfigError as err:
            raise ConfigPlanError(
                "secagg.dropout_tolerance", s.dropout_tolerance, str(err)
            ) from err
        if not malicious:
            continue
        try:
            derive(min_corrupt=min_corrupt)
        except SecAggConfigError as err:
            raise _malicious_refusal(cfg, m, min_corrupt, err) from err


def _malicious_refusal(cfg: AppConfig, m: int, min_corrupt: int, err: Exception) -> ConfigPlanError:
    """Why a cohort of ``m`` has no thresholds for the federation's colluder bound."""
    from fl_app.secagg.params import MIN_CORRUPT_CLIENTS

    s = cfg.secagg
    n = cfg.dataset.num_partitions
    d = math.floor(s.dropout_tolerance * m + 1e-12)
    return ConfigPlanError(
        "secagg.server_model",
        s.server_model.value,
        f"under the malicious server model the colluder bound is over the federation: "
        f"C = max(floor(secagg.corrupt_fraction={s.corrupt_fraction:g} * {n} sites), "
        f"{MIN_CORRUPT_CLIENTS}) = {min_corrupt}, and a cohort of {m} "
        f"(strategy.fraction_train={cfg.strategy.fraction_train:g}) with D={d} "
        f"dropouts has no threshold t with t > C, 2t > n + C and t <= n - D "
        f"({err}); the clients would refuse every round. Use a larger cohort "
        "(raise strategy.fraction_train), a smaller secagg.corrupt_fraction or "
        "secagg.dropout_tolerance, or secagg.server_model=honest_but_curious",
    )
