"""Value and cross-field checks on a composed :class:`AppConfig`.

Hydra and OmegaConf already refuse unknown keys and wrong types (the schemas are
structured configs). What is left is what a type cannot say: impossible values
("fraction 1.5"), and combinations that would run but not give what they promise
(a privacy mode the code cannot yet enforce). All of it fails here, before any
client starts, with the field's dotted name, the value found and the fix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from fl_app.config.schema import (
    Accountant,
    AppConfig,
    ClippingMode,
    ClipSide,
    DatasetKind,
    ModelName,
    PartitionerName,
    PrivacyMode,
    SamplingMode,
    SecAggMode,
    StrategyName,
    ThreatModel,
    evaluation_hidden_from_server,
    metrics_hidden_from_server,
)

__all__ = ["ConfigError", "validate_config"]


class ConfigError(ValueError):
    """A configuration that must not run. The message names the field and the fix."""

    def __init__(self, field: str, found: object, fix: str) -> None:
        self.field = field
        self.found = found
        self.fix = fix
        super().__init__(f"config error in `{field}` (found {found!r}): {fix}")


def _check(ok: bool, field: str, found: object, fix: str) -> None:
    if not ok:
        raise ConfigError(field, found, fix)


def _positive(value: float, field: str) -> None:
    _check(
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
        field,
        value,
        "must be a finite number > 0",
    )


def _fraction(value: float, field: str, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    bound = "[0, 1]" if allow_zero else "(0, 1]"
    _check(math.isfinite(value) and low_ok and value <= 1, field, value, f"must lie in {bound}")


def _check_site_files(cfg: AppConfig) -> None:
    """One simulated client per site file: the list is the federation's roster."""
    d = cfg.dataset
    _check(
        d.kind is DatasetKind.local,
        "dataset.site_files",
        list(d.site_files),
        f"per-site files need dataset.kind=local (found {d.kind.value}): use dataset=local",
    )
    _check(
        not d.local_path,
        "dataset.site_files",
        list(d.site_files),
        f"set either dataset.site_files or dataset.local_path={d.local_path!r}, not both",
    )
    _check(
        len(set(d.site_files)) == len(d.site_files),
        "dataset.site_files",
        list(d.site_files),
        "names a file twice; every site needs its own file",
    )
    _check(
        d.num_partitions == len(d.site_files),
        "dataset.num_partitions",
        d.num_partitions,
        f"dataset.site_files lists {len(d.site_files)} sites, one client each: set "
        f"dataset.num_partitions={len(d.site_files)}",
    )


def _check_dataset(cfg: AppConfig) -> None:
    d = cfg.dataset
    _check(d.num_partitions >= 1, "dataset.num_partitions", d.num_partitions, "must be >= 1")
    _check(
        len(d.input_shape) == 3 and all(int(s) >= 1 for s in d.input_shape),
        "dataset.input_shape",
        list(d.input_shape),
        "must be [channels, height, width], each >= 1",
    )
    _check(d.num_classes >= 2, "dataset.num_classes", d.num_classes, "must be >= 2")
    _fraction(d.test_fraction, "dataset.test_fraction", allow_zero=True)
    _check(d.test_fraction < 1, "dataset.test_fraction", d.test_fraction, "must be < 1")
    _fraction(d.val_fraction, "dataset.val_fraction", allow_zero=True)
    _check(d.val_fraction < 1, "dataset.val_fraction", d.val_fraction, "must be < 1")
    _positive(d.pixel_scale, "dataset.pixel_scale")
    _check(
        len(d.input_range) == 2
        and all(math.isfinite(float(v)) for v in d.input_range)
        and float(d.input_range[0]) < float(d.input_range[1]),
        "dataset.input_range",
        list(d.input_range),
        "must be [low, high] with low < high (features after dividing by dataset.pixel_scale)",
    )
    if d.site_files:
        _check_site_files(cfg)
    if d.partitioner is PartitionerName.dirichlet:
        _positive(d.dirichlet_alpha, "dataset.dirichlet_alpha")
    if d.partitioner is PartitionerName.shard:
        _check(
            d.shards_per_partition >= 1,
            "dataset.shards_per_partition",
            d.shards_per_partition,
            "must be >= 1",
        )
    if d.partitioner is PartitionerName.natural:
        _check(
            bool(d.natural_id_key),
            "dataset.natural_id_key",
            d.natural_id_key,
            "set the column that identifies a client (e.g. writer_id) for partitioner=natural",
        )
    if d.kind is DatasetKind.hub:
        _check(
            bool(d.hub_path),
            "dataset.hub_path",
            d.hub_path,
            "set the Hugging Face dataset id (e.g. ylecun/mnist) for dataset.kind=hub",
        )
    if d.kind is DatasetKind.digits:
        # The embedded dataset is at hand: partition it now, so an impossible split
        # (too many partitions, a Dirichlet draw that cannot give everyone data) fails
        # before the run instead of as a refusal from every client.
        from fl_app.data import DataError, partition_sizes

        try:
            partition_sizes(d, cfg.seed)
        except DataError as err:
            raise ConfigError("dataset", f"num_partitions={d.num_partitions}", str(err)) from None
    if d.kind is DatasetKind.local:
        _check(
            not cfg.server_eval,
            "server_eval",
            cfg.server_eval,
            "with dataset.kind=local the server holds no data to test on: set server_eval=false "
            "(clients still evaluate on their own validation splits)",
        )


def _check_model(cfg: AppConfig) -> None:
    m = cfg.model
    _check(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "widths must be >= 1")
    _check(
        len(m.channels) >= 1 and all(c >= 1 for c in m.channels),
        "model.channels",
        list(m.channels),
        "give at least one conv width, each >= 1",
    )
    _check(m.norm_groups >= 1, "model.norm_groups", m.norm_groups, "must be >= 1")
    if m.name is ModelName.cnn:
        bad = [c for c in m.channels if c % min(m.norm_groups, c) != 0]
        _check(
            not bad,
            "model.norm_groups",
            m.norm_groups,
            f"must divide every conv width in model.channels (not {bad}) for GroupNorm",
        )
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must lie in [0, 1)")


def _check_train(cfg: AppConfig) -> None:
    t = cfg.train
    _check(t.local_epochs >= 1, "train.local_epochs", t.local_epochs, "must be >= 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _positive(t.lr, "train.lr")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "must lie in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")


def _check_strategy(cfg: AppConfig) -> None:
    s = cfg.strategy
    _fraction(s.fraction_train, "strategy.fraction_train", allow_zero=False)
    _fraction(s.fraction_evaluate, "strategy.fraction_evaluate", allow_zero=True)
    _check(
        s.min_available_nodes >= 1,
        "strategy.min_available_nodes",
        s.min_available_nodes,
        "must be >= 1",
    )
    _check(
        s.min_train_replies >= 1, "strategy.min_train_replies", s.min_train_replies, "must be >= 1"
    )
    n = cfg.dataset.num_partitions
    _check(
        s.min_available_nodes <= n,
        "strategy.min_available_nodes",
        s.min_available_nodes,
        f"cannot exceed dataset.num_partitions={n} (the simulated clients); lower it "
        "or raise dataset.num_partitions",
    )
    expected_cohort = s.fraction_train * n
    _check(
        s.min_train_replies <= max(1, math.ceil(expected_cohort)),
        "strategy.min_train_replies",
        s.min_train_replies,
        f"cannot exceed the expected cohort (fraction_train * num_partitions = "
        f"{expected_cohort:g}); lower it or sample more clients",
    )
    if s.name is StrategyName.fedadam:
        _positive(s.eta, "strategy.eta")
        _positive(s.tau, "strategy.tau")
        _check(0 <= s.beta_1 < 1, "strategy.beta_1", s.beta_1, "must lie in [0, 1)")
        _check(0 <= s.beta_2 < 1, "strategy.beta_2", s.beta_2, "must lie in [0, 1)")
    _check(s.proximal_mu >= 0, "strategy.proximal_mu", s.proximal_mu, "must be >= 0")
    if s.name is StrategyName.fedprox:
        _check(
            s.proximal_mu > 0,
            "strategy.proximal_mu",
            s.proximal_mu,
            "strategy=fedprox with proximal_mu=0 is plain FedAvg: set proximal_mu > 0 "
            "or use strategy=fedavg",
        )
    else:
        _check(
            s.proximal_mu == 0,
            "strategy.proximal_mu",
            s.proximal_mu,
            f"the proximal term belongs to strategy=fedprox, not {s.name.value}",
        )


_CLIENT_LEVEL_FIELDS = ("noise_multiplier", "clip", "target_epsilon", "delta", "max_epsilon")


def _check_privacy(cfg: AppConfig) -> None:
    p = cfg.privacy
    # Each threat model is a promise (docs/architecture.md, Threat models); a combination
    # that would run but not keep it is refused here, before any client starts.
    _check(
        (p.mode is PrivacyMode.distributed) == (p.threat_model is ThreatModel.distributed_dp),
        "privacy.threat_model",
        p.threat_model.value,
        "privacy.mode=distributed and privacy.threat_model=distributed_dp go together (each "
        "client adds a discrete Gaussian share under secure aggregation, so the server never "
        "sees an un-noised sum); use privacy=distributed",
    )
    if p.mode is PrivacyMode.none:
        _check(
            p.threat_model is ThreatModel.none,
            "privacy.threat_model",
            p.threat_model.value,
            "privacy.mode=none protects no update from the server, so it cannot claim a "
            "threat model; set privacy.mode=central (trusted_server) or local, or "
            "privacy.threat_model=none",
        )
        for name in _CLIENT_LEVEL_FIELDS:
            value = getattr(p, name)
            _check(
                value is None,
                f"privacy.{name}",
                value,
                "has no effect with privacy.mode=none; remove it (a parameter that silently "
                "does nothing is worse than an error); DP-SGD settings live under privacy.dpsgd",
            )
        _check(
            p.clipping is ClippingMode.fixed,
            "privacy.clipping",
            p.clipping.value,
            "adaptive clipping is part of client-level DP; set privacy.mode=central",
        )
    else:
        _check_client_level(cfg)
    if p.record_level:
        _check_dpsgd(cfg)


def _check_client_level(cfg: AppConfig) -> None:
    p = cfg.privacy
    s = cfg.strategy
    if p.mode is PrivacyMode.distributed:
        _check_distributed(cfg)
    _check(
        p.threat_model
        in (ThreatModel.trusted_server, ThreatModel.honest_but_curious, ThreatModel.distributed_dp),
        "privacy.threat_model",
        p.threat_model.value,
        f"privacy.mode={p.mode.value} needs a threat model: trusted_server (the server may see "
        "updates; DP protects the released model) or honest_but_curious (updates hidden "
        "from the server)",
    )
    if p.mode is PrivacyMode.central and p.threat_model is ThreatModel.honest_but_curious:
        _check(
            p.clip_side is ClipSide.client,
            "privacy.clip_side",
            p.clip_side.value,
            "under honest_but_curious the server must never see an update, so it cannot clip "
            "one: set privacy.clip_side=client",
        )
        _check(
            cfg.secagg.mode is not SecAggMode.off,
            "secagg.mode",
            cfg.secagg.mode.value,
            "central DP under honest_but_curious needs secure aggregation to hide each update "
            "from the server; set secagg=secaggplus, or privacy.threat_model=trusted_server, "
            "or privacy.mode=local",
        )
    if cfg.secagg.mode is not SecAggMode.off:
        _check(
            p.clip_side is ClipSide.client,
            "privacy.clip_side",
            p.clip_side.value,
            "with secure aggregation the server sees only the masked sum and cannot clip; "
            "set privacy.clip_side=client",
        )
    _check(
        (p.noise_multiplier is None) != (p.target_epsilon is None),
        "privacy.noise_multiplier",
        p.noise_multiplier,
        "give exactly one of privacy.noise_multiplier or privacy.target_epsilon",
    )
    if p.noise_multiplier is not None:
        _positive(p.noise_multiplier, "privacy.noise_multiplier")
    if p.target_epsilon is not None:
        _positive(p.target_epsilon, "privacy.target_epsilon")
    _check(p.clip is not None, "privacy.clip", p.clip, "set the L2 clip norm C (e.g. 1.0)")
    assert p.clip is not None
    _positive(p.clip, "privacy.clip")
    _check(
        p.delta is not None and math.isfinite(p.delta) and 0 < p.delta < 1,
        "privacy.delta",
        p.delta,
        "set delta in (0, 1), well below 1/number of clients (e.g. 1e-5)",
    )
    if p.max_epsilon is not None:
        _positive(p.max_epsilon, "privacy.max_epsilon")
        if p.target_epsilon is not None:
            _check(
                p.target_epsilon <= p.max_epsilon,
                "privacy.target_epsilon",
                p.target_epsilon,
                f"exceeds the budget privacy.max_epsilon={p.max_epsilon:g}",
            )
    replace_one = (
        s.sampling is SamplingMode.fixed
        and round(s.fraction_train * cfg.dataset.num_partitions) < cfg.dataset.num_partitions
    )
    if p.mode is PrivacyMode.central and replace_one:
        _check(
            p.accountant is Accountant.rdp,
            "privacy.accountant",
            p.accountant.value,
            "fixed-size sampling without replacement (strategy.sampling=fixed with "
            "fraction_train < 1) is accounted only by dp-accounting's RDP accountant "
            "(replace-one); set privacy.accountant=rdp, or strategy.sampling=poisson for "
            "PLD and tighter epsilon",
        )
    if p.clipping is ClippingMode.adaptive:
        _check(
            p.mode is PrivacyMode.central,
            "privacy.clipping",
            p.clipping.value,
            "adaptive clipping needs privacy.mode=central (local DP fixes C per client)",
        )
        _check(
            0 < p.target_quantile < 1,
            "privacy.target_quantile",
            p.target_quantile,
            "must lie in (0, 1) (0.5: half the updates unclipped)",
        )
        _positive(p.clip_learning_rate, "privacy.clip_learning_rate")
        if p.clipped_count_stddev is not None:
            _positive(p.clipped_count_stddev, "privacy.clipped_count_stddev")
    # Resolve everything (calibration from a target epsilon included) so that an
    # impossible setting fails now, not at round 1.
    from fl_app.privacy.accounting import AccountingError
    from fl_app.privacy.distributed import DdpConfigError
    from strategies.client_dp import ClientDpSettings

    try:
        ClientDpSettings.from_config(cfg)
    except DdpConfigError as err:
        raise ConfigError("secagg.bits", cfg.secagg.bits, str(err)) from err
    except (ValueError, AccountingError) as err:
        if "clipped_count" in str(err):
            found = p.clipped_count_stddev
            raise ConfigError(
                "privacy.clipped_count_stddev",
                found if found is not None else "null (expected cohort / 20)",
                str(err),
            ) from err
        raise ConfigError("privacy", p.mode.value, str(err)) from err


def _check_distributed(cfg: AppConfig) -> None:
    """Distributed DP: shares under secure aggregation, fixed client-side clipping, RDP."""
    p = cfg.privacy
    _check(
        cfg.secagg.mode is not SecAggMode.off,
        "secagg.mode",
        cfg.secagg.mode.value,
        "distributed DP adds each client's noise share under secure aggregation; set "
        "secagg=secaggplus (or secagg=secagg)",
    )
    _check(
        p.clip_side is ClipSide.client,
        "privacy.clip_side",
        p.clip_side.value,
        "under distributed DP the server never sees an update; set privacy.clip_side=client",
    )
    _check(
        p.clipping is ClippingMode.fixed,
        "privacy.clipping",
        p.clipping.value,
        "adaptive clipping's noised count is released by the server (central DP); distributed "
        "DP supports privacy.clipping=fixed",
    )
    _check(
        p.accountant is Accountant.rdp,
        "privacy.accountant",
        p.accountant.value,
        "the distributed discrete Gaussian is accounted by its RDP bound (Kairouz et al. 2021; "
        "dp-accounting has no PLD for it); set privacy.accountant=rdp",
    )
    n = cfg.dataset.num_partitions
    _check(
        cfg.strategy.sampling is SamplingMode.poisson
        or round(cfg.strategy.fraction_train * n) >= n,
        "strategy.sampling",
        cfg.strategy.sampling.value,
        "distributed DP is accounted for Poisson sampling or full participation; set "
        "strategy.sampling=poisson or strategy.fraction_train=1",
    )
    d = p.distributed
    _check(0 <= d.beta < 1, "privacy.distributed.beta", d.beta, "must lie in [0, 1) (e.g. 0.6065)")
    _check(
        0 < d.overflow_probability < 1e-3,
        "privacy.distributed.overflow_probability",
        d.overflow_probability,
        "must lie in (0, 1e-3) (default 1e-9: a wrap in any round is that unlikely)",
    )


def _check_metrics_stay_hidden(cfg: AppConfig) -> None:
    """Nothing un-noised per client reaches a server the threat model does not trust.

    A federated evaluation reply is one client's loss, accuracy and example count in
    plaintext; under these threat models it would leak what the masked sum (or the
    local noise) hides, so asking for it explicitly is an error.
    """
    if not evaluation_hidden_from_server(cfg):
        return
    every = cfg.federated_eval_every
    if cfg.privacy.mode is PrivacyMode.local:
        why = "privacy.mode=local"
    elif cfg.secagg.mode is not SecAggMode.off and cfg.privacy.threat_model in (
        ThreatModel.none,
        ThreatModel.trusted_server,
    ):
        why = f"secagg={cfg.secagg.mode.value} (secure aggregation hides each client's numbers)"
    elif metrics_hidden_from_server(cfg):
        why = f"privacy.threat_model={cfg.privacy.threat_model.value}"
    else:
        why = "privacy.record_level=true (DP-SGD's epsilon does not cover evaluation numbers)"
    _check(
        every is None or every == 0 or cfg.strategy.fraction_evaluate == 0,
        "federated_eval_every",
        every,
        f"under {why} the server must not see any client's un-noised numbers, and federated "
        "evaluation sends each client's loss, accuracy and example count in plaintext; set "
        "federated_eval_every=0 (or null: off under this threat model) and rely on server_eval",
    )


def _check_dpsgd(cfg: AppConfig) -> None:
    d = cfg.privacy.dpsgd
    _check(
        (d.noise_multiplier is None) != (d.target_epsilon is None),
        "privacy.dpsgd.noise_multiplier",
        d.noise_multiplier,
        "give exactly one of privacy.dpsgd.noise_multiplier or privacy.dpsgd.target_epsilon",
    )
    if d.noise_multiplier is not None:
        _positive(d.noise_multiplier, "privacy.dpsgd.noise_multiplier")
    if d.target_epsilon is not None:
        _positive(d.target_epsilon, "privacy.dpsgd.target_epsilon")
    _positive(d.max_grad_norm, "privacy.dpsgd.max_grad_norm")
    _check(
        math.isfinite(d.delta) and 0 < d.delta < 1,
        "privacy.dpsgd.delta",
        d.delta,
        "must lie in (0, 1); use well below 1/records per institution (e.g. 1e-5)",
    )
    if d.max_epsilon is not None:
        _positive(d.max_epsilon, "privacy.dpsgd.max_epsilon")
        if d.target_epsilon is not None:
            _check(
                d.target_epsilon <= d.max_epsilon,
                "privacy.dpsgd.target_epsilon",
                d.target_epsilon,
                f"exceeds the budget privacy.dpsgd.max_epsilon={d.max_epsilon:g}: no client "
                "could finish the planned rounds",
            )
    _check(
        cfg.strategy.proximal_mu == 0,
        "strategy.proximal_mu",
        cfg.strategy.proximal_mu,
        "FedProx's proximal term is not supported with DP-SGD yet; use strategy=fedavg "
        "or strategy=fedadam",
    )
    # Opacus must accept the model: checked here, before any client starts.
    from fl_app.models import build_model, opacus_incompatibilities

    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    problems = opacus_incompatibilities(model)
    _check(
        not problems,
        "model.name",
        cfg.model.name.value,
        "Opacus cannot train this model with DP-SGD: " + "; ".join(problems),
    )


def _check_secagg(cfg: AppConfig) -> None:
    s = cfg.secagg
    _check(8 <= s.bits <= 64, "secagg.bits", s.bits, "must lie in [8, 64]")
    _check(
        0 <= s.dropout_tolerance < 1,
        "secagg.dropout_tolerance",
        s.dropout_tolerance,
        "must lie in [0, 1)",
    )
    _check(
        0 <= s.corrupt_fraction < 1,
        "secagg.corrupt_fraction",
        s.corrupt_fraction,
        "must lie in [0, 1)",
    )
    _positive(s.stage_timeout_s, "secagg.stage_timeout_s")
    _positive(s.max_weight, "secagg.max_weight")
    from fl_app.protocol import SECAGG_MAX_KEY_ROUNDS  # the wire limit clients enforce

    _check(
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
    from fl_app.secagg.encoding import FixedPointCodec, FixedPointConfigError
    from fl_app.secagg.graph import (
        MIN_CORRUPT_CLIENTS,
        SecAggConfigError,
        derive_params,
        federation_min_corrupt,
    )
    from strategies.sampling import FixedSizeSampler

    n = cfg.dataset.num_partitions
    # Overflow is impossible by construction if the codec exists for the largest cohort
    # the run can sample: every partition (the Poisson upper bound). Under distributed
    # DP the ring is sized by the distributed-DP plan instead (checked with the privacy
    # layer, naming secagg.bits).
    if p.mode is not PrivacyMode.distributed:
        try:
            FixedPointCodec(bits=s.bits, max_abs=1.0, max_contributors=n)
        except FixedPointConfigError as err:
            raise ConfigError(
                "secagg.bits",
                s.bits,
                f"the masked sum of up to {n} clients (dataset.num_partitions) cannot be "
                f"encoded without overflow at useful resolution ({err}); use secagg.bits=64 "
                "or fewer clients",
            ) from err
    if cfg.strategy.sampling is SamplingMode.fixed:
        cohorts = {FixedSizeSampler(cfg.strategy.fraction_train, 0).cohort_size(n)}
    else:
        cohorts = {n, max(3, round(cfg.strategy.fraction_train * n))}
    # Under the malicious model the colluder bound is a fraction of the federation (the
    # clients count it so at share-keys and refuse a cohort too small for it); the server
    # derives its thresholds with the same C (strategies.secagg.SecAggSettings).
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
            raise ConfigError("secagg.dropout_tolerance", s.dropout_tolerance, str(err)) from err
        if not malicious:
            continue
        try:
            derive(min_corrupt=min_corrupt)
        except SecAggConfigError as err:
            d = math.floor(s.dropout_tolerance * m + 1e-12)
            raise ConfigError(
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
            ) from err


def _check_runtime(cfg: AppConfig) -> None:
    r = cfg.runtime
    _check(r.client_num_cpus > 0, "runtime.client_num_cpus", r.client_num_cpus, "must be > 0")
    _check(r.client_num_gpus >= 0, "runtime.client_num_gpus", r.client_num_gpus, "must be >= 0")
    _check(
        r.ray_num_cpus is None or r.ray_num_cpus >= 1,
        "runtime.ray_num_cpus",
        r.ray_num_cpus,
        "must be null or >= 1",
    )
    if r.ray_num_cpus is not None:
        _check(
            r.client_num_cpus <= r.ray_num_cpus,
            "runtime.client_num_cpus",
            r.client_num_cpus,
            f"exceeds runtime.ray_num_cpus={r.ray_num_cpus}: no client could ever be scheduled",
        )
    _check(bool(r.ray_address), "runtime.ray_address", r.ray_address, 'use "local" or a cluster')
    _positive(r.train_timeout_s, "runtime.train_timeout_s")
    _positive(r.evaluate_timeout_s, "runtime.evaluate_timeout_s")
    _check(
        r.flower_log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"},
        "runtime.flower_log_level",
        r.flower_log_level,
        "use one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    )
    _check(r.torch_threads >= 1, "runtime.torch_threads", r.torch_threads, "must be >= 1")
    _positive(r.validation.max_update_norm, "runtime.validation.max_update_norm")
    _check(
        r.validation.max_num_examples >= 1,
        "runtime.validation.max_num_examples",
        r.validation.max_num_examples,
        "must be >= 1",
    )


def _check_resume(cfg: AppConfig) -> None:
    """Static checks only; the run directory itself is checked by
    :func:`fl_app.server.checkpoint.check_resume` (config hash, checkpoints)."""
    keep = cfg.checkpoint.keep
    _check(keep >= 0, "checkpoint.keep", keep, "must be >= 0 (0 keeps all)")
    if cfg.resume is not None:
        _check(
            bool(cfg.resume.strip()),
            "resume",
            cfg.resume,
            "give the run directory to resume (resume=outputs/...); omit it for a new run",
        )
    if cfg.rollback_to is not None:
        _check(
            cfg.resume is not None,
            "rollback_to",
            cfg.rollback_to,
            "needs resume=<run dir>: a rollback restarts an existing run from a checkpoint",
        )
        _check(
            1 <= cfg.rollback_to <= cfg.num_rounds,
            "rollback_to",
            cfg.rollback_to,
            f"must be a checkpointed round in [1, num_rounds={cfg.num_rounds}]",
        )


def _check_audit(cfg: AppConfig) -> None:
    """Static check only: the key itself is loaded when the run starts
    (:func:`fl_app.server.app.load_audit_signing_key`), on the server's machine."""
    if cfg.audit_signing_key is not None:
        _check(
            bool(cfg.audit_signing_key.strip()),
            "audit_signing_key",
            cfg.audit_signing_key,
            "give the path of an Ed25519 private key PEM (`fl-app audit keygen`), or omit it",
        )


_CHECKS: tuple[Callable[[AppConfig], None], ...] = (
    _check_dataset,
    _check_model,
    _check_train,
    _check_strategy,
    _check_privacy,
    _check_metrics_stay_hidden,
    _check_secagg,
    _check_runtime,
    _check_resume,
    _check_audit,
)


def validate_config(cfg: AppConfig) -> AppConfig:
    """Check values and cross-field rules; return ``cfg`` unchanged or raise.

    Raises
    ------
    ConfigError
        Naming the first offending field, the value found and the fix.
    """
    _check(cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds, "must be >= 1")
    _check(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    _check(
        cfg.federated_eval_every is None or cfg.federated_eval_every >= 0,
        "federated_eval_every",
        cfg.federated_eval_every,
        "must be >= 0 (0 turns federated evaluation off) or null (the threat model decides)",
    )
    for check in _CHECKS:
        check(cfg)
    return cfg
