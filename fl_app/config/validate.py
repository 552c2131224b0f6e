"""Value and cross-field checks on a composed :class:`AppConfig`.

Hydra and OmegaConf already refuse unknown keys and wrong types (the schemas are
structured configs). What is left is what a type cannot say: impossible values
("fraction 1.5"), and combinations that would run but not give what they promise
(a privacy mode the code cannot yet enforce). All of it fails here, before any
client starts, with the field's dotted name, the value found and the fix (typed
errors of :mod:`fl_app.config.errors`).

This module checks the dataset, model, training, strategy, runtime, resume and audit
settings and runs the privacy (:mod:`fl_app.config.validate_privacy`) and secure
aggregation (:mod:`fl_app.config.validate_secagg`) checks; the resolved plan that
needs calibration is built by :func:`fl_app.config.plan.resolve`, after these.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fl_app.config.errors import ConfigPlanError
from fl_app.config.errors import require as _check
from fl_app.config.errors import require_fraction as _fraction
from fl_app.config.errors import require_in as _in
from fl_app.config.errors import require_positive as _positive
from fl_app.config.schema import (
    AppConfig,
    DatasetKind,
    ModelName,
    PartitionerName,
    StrategyName,
)
from fl_app.config.validate_device import check_device
from fl_app.config.validate_privacy import check_metrics_stay_hidden, check_privacy
from fl_app.config.validate_secagg import check_secagg
from fl_app.config.validate_share import check_share
from fl_app.config.validate_tracking import check_tracking

__all__ = ["validate_config"]


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
    _in(d.num_partitions >= 1, "dataset.num_partitions", d.num_partitions, "must be >= 1")
    _in(
        len(d.input_shape) == 3 and all(int(s) >= 1 for s in d.input_shape),
        "dataset.input_shape",
        list(d.input_shape),
        "must be [channels, height, width], each >= 1",
    )
    _in(d.num_classes >= 2, "dataset.num_classes", d.num_classes, "must be >= 2")
    _fraction(d.test_fraction, "dataset.test_fraction", allow_zero=True)
    _in(d.test_fraction < 1, "dataset.test_fraction", d.test_fraction, "must be < 1")
    _fraction(d.val_fraction, "dataset.val_fraction", allow_zero=True)
    _in(d.val_fraction < 1, "dataset.val_fraction", d.val_fraction, "must be < 1")
    _positive(d.pixel_scale, "dataset.pixel_scale")
    _in(
        len(d.input_range) == 2
        and all(math.isfinite(float(v)) for v in d.input_range)
        and float(d.input_range[0]) < float(d.input_range[1]),
        "dataset.input_range",
        list(d.input_range),
        "must be [low, high] with low < high (features after dividing by dataset.pixel_scale)",
    )
    if d.site_files:
        _check_site_files(cfg)
    _check_partitioner_and_source(cfg)


def _check_partitioner_and_source(cfg: AppConfig) -> None:
    """Each partitioner's and each data source's own settings."""
    d = cfg.dataset
    if d.partitioner is PartitionerName.dirichlet:
        _positive(d.dirichlet_alpha, "dataset.dirichlet_alpha")
    if d.partitioner is PartitionerName.shard:
        _in(
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
            raise ConfigPlanError(
                "dataset", f"num_partitions={d.num_partitions}", str(err)
            ) from None
    if d.kind is DatasetKind.synthetic:
        _check_synthetic(cfg)
    if d.kind is DatasetKind.local:
        _check(
            not cfg.server_eval,
            "server_eval",
            cfg.server_eval,
            "with dataset.kind=local the server holds no data to test on: set server_eval=false "
            "(clients still evaluate on their own validation splits)",
        )


def _check_synthetic(cfg: AppConfig) -> None:
    """``dataset=synthetic``: the surrogate folder is named, its file matches its card, and
    the split works, before any client starts (docs/synthetic-data.md)."""
    d = cfg.dataset
    _check(
        bool(d.synthetic_path),
        "dataset.synthetic_path",
        d.synthetic_path,
        "name the folder `fl-app synth --out DIR` wrote (dataset.synthetic_path=DIR)",
    )
    from fl_app.data import DataError, partition_sizes

    try:
        partition_sizes(d, cfg.seed)
    except DataError as err:
        raise ConfigPlanError("dataset.synthetic_path", d.synthetic_path, str(err)) from None


def _check_model(cfg: AppConfig) -> None:
    m = cfg.model
    _check(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "widths must be >= 1")
    _check(
        len(m.channels) >= 1 and all(c >= 1 for c in m.channels),
        "model.channels",
        list(m.channels),
        "give at least one conv width, each >= 1",
    )
    _in(m.norm_groups >= 1, "model.norm_groups", m.norm_groups, "must be >= 1")
    if m.name is ModelName.cnn:
        bad = [c for c in m.channels if c % min(m.norm_groups, c) != 0]
        _in(
            not bad,
            "model.norm_groups",
            m.norm_groups,
            f"must divide every conv width in model.channels (not {bad}) for GroupNorm",
        )
    _in(0 <= m.dropout < 1, "model.dropout", m.dropout, "must lie in [0, 1)")


def _check_train(cfg: AppConfig) -> None:
    t = cfg.train
    _in(t.local_epochs >= 1, "train.local_epochs", t.local_epochs, "must be >= 1")
    _in(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _positive(t.lr, "train.lr")
    _in(0 <= t.momentum < 1, "train.momentum", t.momentum, "must lie in [0, 1)")
    _in(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")


def _check_strategy(cfg: AppConfig) -> None:
    s = cfg.strategy
    _fraction(s.fraction_train, "strategy.fraction_train", allow_zero=False)
    _fraction(s.fraction_evaluate, "strategy.fraction_evaluate", allow_zero=True)
    _in(
        s.min_available_nodes >= 1,
        "strategy.min_available_nodes",
        s.min_available_nodes,
        "must be >= 1",
    )
    _in(s.min_train_replies >= 1, "strategy.min_train_replies", s.min_train_replies, "must be >= 1")
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
        _in(0 <= s.beta_1 < 1, "strategy.beta_1", s.beta_1, "must lie in [0, 1)")
        _in(0 <= s.beta_2 < 1, "strategy.beta_2", s.beta_2, "must lie in [0, 1)")
    _in(s.proximal_mu >= 0, "strategy.proximal_mu", s.proximal_mu, "must be >= 0")
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


def _check_runtime(cfg: AppConfig) -> None:
    r = cfg.runtime
    _in(r.client_num_cpus > 0, "runtime.client_num_cpus", r.client_num_cpus, "must be > 0")
    _in(r.client_num_gpus >= 0, "runtime.client_num_gpus", r.client_num_gpus, "must be >= 0")
    _in(
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
    _in(r.torch_threads >= 1, "runtime.torch_threads", r.torch_threads, "must be >= 1")
    _in(
        r.max_in_flight is None or r.max_in_flight >= 0,
        "runtime.max_in_flight",
        r.max_in_flight,
        "must be null (automatic), 0 (all at once) or a positive number of messages",
    )
    _positive(r.validation.max_update_norm, "runtime.validation.max_update_norm")
    _in(
        r.validation.max_num_examples >= 1,
        "runtime.validation.max_num_examples",
        r.validation.max_num_examples,
        "must be >= 1",
    )


def _check_resume(cfg: AppConfig) -> None:
    """Static checks only; the run directory itself is checked by
    :func:`fl_app.server.resume.check_resume` (config hash, checkpoints)."""
    keep = cfg.checkpoint.keep
    _in(keep >= 0, "checkpoint.keep", keep, "must be >= 0 (0 keeps all)")
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
        _in(
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
    check_privacy,
    check_metrics_stay_hidden,
    check_secagg,
    check_share,
    _check_runtime,
    check_device,
    _check_resume,
    _check_audit,
    check_tracking,
)


def validate_config(cfg: AppConfig) -> AppConfig:
    """Check values and cross-field rules; return ``cfg`` unchanged or raise.

    Raises
    ------
    ConfigError
        Naming the first offending field, the value found and the fix.
    """
    _in(cfg.num_rounds >= 1, "num_rounds", cfg.num_rounds, "must be >= 1")
    _in(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    _in(
        cfg.federated_eval_every is None or cfg.federated_eval_every >= 0,
        "federated_eval_every",
        cfg.federated_eval_every,
        "must be >= 0 (0 turns federated evaluation off) or null (the threat model decides)",
    )
    for check in _CHECKS:
        check(cfg)
    return cfg
