"""Structured-config schemas (dataclasses) for every Hydra group.

These dataclasses are the single typed description of an experiment. Hydra merges
the YAML files under ``configs/`` into them, so an unknown key or a value of the
wrong type fails at composition; :func:`fl_app.config.plan.resolve` then checks
values and cross-field rules and builds the run's plan. Code below the builder
receives these typed objects, never a ``DictConfig``.

Why registries and not ``_target_``: a ClientApp receives its model and data spec
from the server in every train message. Instantiating ``_target_`` strings sent over
the network would let a server run arbitrary callables on an institution's machine,
so models and datasets are chosen by name from fixed registries instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fl_app.config.schema_ftrl import FtrlConfig
from fl_app.config.schema_share import ShareArtifact, ShareCompression, ShareConfig
from fl_app.config.schema_tracking import TrackingConfig

__all__ = [
    "Accountant",
    "AppConfig",
    "CheckpointConfig",
    "ClientTrainConfig",
    "DatasetConfig",
    "DatasetKind",
    "DpSgdConfig",
    "FtrlConfig",
    "GradSampleModeName",
    "LocalFormat",
    "ModelConfig",
    "ModelName",
    "NoiseSchedule",
    "OptimizerName",
    "PartitionerName",
    "PrivacyConfig",
    "PrivacyMode",
    "RuntimeConfig",
    "SamplingMode",
    "SecAggConfig",
    "SecAggMode",
    "SecAggServerModel",
    "ShareArtifact",
    "ShareCompression",
    "ShareConfig",
    "SimulationBackend",
    "StrategyConfig",
    "StrategyName",
    "ThreatModel",
    "ValidationConfig",
    "federated_eval_interval",
    "metrics_hidden_from_server",
]


class DatasetKind(str, Enum):
    """Where the data comes from."""

    digits = "digits"  # scikit-learn's load_digits, ships with the package (default)
    hub = "hub"  # a Hugging Face hub dataset through flwr-datasets (needs internet)
    local = "local"  # per-institution files (.npz / .csv), path from --node-config
    synthetic = "synthetic"  # a DP synthetic surrogate written by `fl-app synth`


class PartitionerName(str, Enum):
    iid = "iid"
    dirichlet = "dirichlet"
    shard = "shard"  # pathological non-IID: each client gets a few label shards
    natural = "natural"  # by an id column (e.g. FEMNIST writer_id)


class LocalFormat(str, Enum):
    npz = "npz"
    csv = "csv"


@dataclass
class DatasetConfig:
    kind: DatasetKind = DatasetKind.digits
    # Hub dataset id (kind=hub), e.g. "ylecun/mnist", "uoft-cs/cifar10", "flwrlabs/femnist".
    hub_path: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    # Input shape (channels, height, width) and class count the model is built for;
    # checked against the loaded data.
    input_shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    num_classes: int = 10
    # Simulated federation: how many partitions (= simulated SuperNodes).
    num_partitions: int = 10
    partitioner: PartitionerName = PartitionerName.iid
    dirichlet_alpha: float = 0.5
    # Smallest partition the Dirichlet partitioner accepts (it resamples until met).
    min_partition_size: int = 2
    shards_per_partition: int = 2
    natural_id_key: str | None = None
    # Held-out server-side test split (centralised evaluation), taken before partitioning.
    # Hub datasets with an official "test" split (mnist, cifar10) use that split instead.
    test_fraction: float = 0.2
    # Each client's local validation split (federated evaluation).
    val_fraction: float = 0.1
    # kind=local: file format; the path itself comes from the SuperNode's --node-config
    # (key "data-path"), or from local_path for simulations on one machine.
    local_format: LocalFormat = LocalFormat.npz
    # A file (shared by the simulated clients, partitioned among them) or a directory
    # whose *.<local_format> files are one site each (sorted by name; client k reads
    # the k-th file whole, as SuperNode k would in deployment).
    local_path: str | None = None
    # kind=local, rehearsing a consortium: one file per site, client k reads the k-th
    # whole. Exclusive with local_path; needs num_partitions == len(site_files).
    site_files: list[str] = field(default_factory=list)
    # Divide pixel values by this (digits: 16, 8-bit images: 255).
    pixel_scale: float = 16.0
    # Range every feature must lie in after dividing by pixel_scale; a file outside it
    # is refused (raw 0..16 digits with pixel_scale 1 train to chance otherwise).
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # kind=synthetic: the folder `fl-app synth --out` wrote (synthetic.npz and its card);
    # the file must hash to the card's data_sha256 (docs/synthetic-data.md).
    synthetic_path: str | None = None


class ModelName(str, Enum):
    mlp = "mlp"
    cnn = "cnn"


@dataclass
class ModelConfig:
    name: ModelName = ModelName.mlp
    # MLP hidden widths.
    hidden: list[int] = field(default_factory=lambda: [64])
    # CNN conv channels (one 3x3 conv + GroupNorm + ReLU + 2x2 pool per entry).
    channels: list[int] = field(default_factory=lambda: [16, 32])
    # GroupNorm groups (Opacus-compatible replacement for BatchNorm).
    norm_groups: int = 4
    dropout: float = 0.0


class OptimizerName(str, Enum):
    sgd = "sgd"
    adam = "adam"


@dataclass
class ClientTrainConfig:
    """Hyper-parameters the server sends to every client in each train message."""

    local_epochs: int = 3
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: OptimizerName = OptimizerName.sgd
    # auto (first CUDA device, else CPU) | cpu | cuda | cuda:N | mps: fl_app/device.py
    device: str = "auto"


class StrategyName(str, Enum):
    fedavg = "fedavg"
    fedadam = "fedadam"
    fedprox = "fedprox"


class SamplingMode(str, Enum):
    # Exactly round(fraction * N) clients, sampled without replacement.
    fixed = "fixed"
    # Each client independently with probability `fraction` (what DP accountants model).
    poisson = "poisson"


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.fedavg
    sampling: SamplingMode = SamplingMode.fixed
    # Fraction of connected clients sampled for training each round (Poisson: the rate).
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # Fewest connected clients before a round starts.
    min_available_nodes: int = 2
    # Fewest valid train replies for the model to change; fewer leaves it unchanged.
    min_train_replies: int = 1
    # FedOpt family (fedadam).
    eta: float = 0.01
    eta_l: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    # FedProx proximal term weight (sent to clients; they add mu/2 ||w - w_t||^2).
    proximal_mu: float = 0.0


class PrivacyMode(str, Enum):
    """The client-level mechanism (who clips and noises whole updates)."""

    none = "none"
    # The server adds Gaussian noise to the (possibly securely aggregated) sum.
    central = "central"
    # Every client noises its own update.
    local = "local"
    # Every client adds a discrete Gaussian share under secure aggregation.
    distributed = "distributed"


class ThreatModel(str, Enum):
    none = "none"
    trusted_server = "trusted_server"
    honest_but_curious = "honest_but_curious"
    distributed_dp = "distributed_dp"


class Accountant(str, Enum):
    pld = "pld"
    rdp = "rdp"
    prv = "prv"


class GradSampleModeName(str, Enum):
    auto = "auto"
    hooks = "hooks"
    functorch = "functorch"
    ghost = "ghost"


@dataclass
class DpSgdConfig:
    """Record-level DP-SGD (Opacus) in every client; active when privacy.record_level=true.

    Give exactly one of ``noise_multiplier`` (z) or ``target_epsilon``; with a target,
    each client calibrates z once for ``num_rounds x train.local_epochs`` of its own
    Poisson sampling and keeps it fixed.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    # Per-sample clipping norm C.
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    # Each institution's budget: a client whose epsilon after the next round would
    # exceed it refuses to train ("budget exhausted"). null = no budget.
    max_epsilon: float | None = None
    accountant: Accountant = Accountant.prv
    grad_sample_mode: GradSampleModeName = GradSampleModeName.auto
    # Where clients keep their accountant state between rounds and restarts. A SuperNode's
    # --node-config "dp-state-dir=..." wins; null in simulation = the run directory's client-state/.
    state_dir: str | None = None


class ClipSide(str, Enum):
    """Who clips each client's update to ``privacy.clip`` (client-level DP)."""

    # The server clips what it received (needs to see every update: trusted_server).
    server = "server"
    # Every client clips its own update in its pipeline (works under secure aggregation);
    # under trusted_server the server re-clips too, which is a no-op for honest clients.
    client = "client"


class ClippingMode(str, Enum):
    fixed = "fixed"
    # Andrew et al. 2021: the clip norm follows a noised quantile of the update norms.
    adaptive = "adaptive"


class NoiseSchedule(str, Enum):
    """Client-level DP's z over rounds (fl_app/privacy/schedule.py)."""

    constant = "constant"  # every round at noise_multiplier (or target_epsilon's z)
    decay = "decay"  # round t at noise_multiplier * decay_rate^(t-1), stated before the run
    spend = "spend"  # z recalibrated each round to end the planned rounds at max_epsilon


@dataclass
class DistributedDpConfig:
    """Distributed DP (privacy.mode=distributed; fl_app.privacy.distributed).

    The ring size is ``secagg.bits`` (the bandwidth knob); the quantisation step is
    derived from it, the clip norm, the model size and the largest cohort.
    """

    # Conditional randomized rounding's beta (Kairouz et al. 2021): a rounded vector is
    # redrawn unless its norm is within the bound that holds with probability 1 - beta.
    beta: float = 0.6065306597126334
    # Probability that any coordinate of a round's sum wraps around the ring.
    overflow_probability: float = 1.0e-9


@dataclass
class PrivacyConfig:
    mode: PrivacyMode = PrivacyMode.none
    threat_model: ThreatModel = ThreatModel.none
    # Opacus DP-SGD in every client (combines with any threat model); see `dpsgd`.
    record_level: bool = False
    dpsgd: DpSgdConfig = field(default_factory=DpSgdConfig)
    # ---- client-level DP (mode=central or local). Give exactly one of
    # noise_multiplier (z) or target_epsilon (z calibrated once for num_rounds).
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    # L2 bound C on a client's whole update (adaptive: the initial C).
    clip: float | None = None
    delta: float | None = None
    accountant: Accountant = Accountant.pld
    clip_side: ClipSide = ClipSide.client
    clipping: ClippingMode = ClippingMode.fixed
    # Adaptive clipping (Andrew et al. 2021): target quantile gamma of unclipped
    # updates, learning rate eta of the geometric update, and the std sigma_b of the
    # noise on the unclipped count (null = expected cohort / 20, the paper's choice).
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    # The federation's budget: the run stops before a round that would take epsilon
    # past it (saving the DP-released model and the ledger). null = no budget.
    max_epsilon: float | None = None
    # z over rounds (central DP): constant | decay (needs decay_rate in (0, 1] and
    # noise_multiplier) | spend (needs max_epsilon; noise_multiplier and target_epsilon null).
    schedule: NoiseSchedule = NoiseSchedule.constant
    decay_rate: float | None = None
    # Every random draw a guarantee rests on (central/local/distributed noise, DP-SGD
    # noise and Poisson batches, client sampling) from ChaCha20 keystreams under keys
    # from os.urandom, held by the party that adds the noise. false = seeded from the
    # config: reproducible experiments only, marked "not for release" in summary.json
    # and the model card, and refused by `fl-app export --tier public`.
    secure_mode: bool = True
    distributed: DistributedDpConfig = field(default_factory=DistributedDpConfig)
    # DP-FTRL (privacy=ftrl; fl_app/config/schema_ftrl.py).
    ftrl: FtrlConfig = field(default_factory=FtrlConfig)


class SecAggMode(str, Enum):
    off = "off"
    secagg = "secagg"
    secaggplus = "secaggplus"


class SecAggServerModel(str, Enum):
    """What secure aggregation assumes of the server (README, threat table)."""

    honest_but_curious = "honest_but_curious"  # follows the protocol; semi-honest thresholds
    malicious = "malicious"  # may deviate: signed keys, consistency check, 2t > k+1+Y


@dataclass
class SecAggConfig:
    """Mask-based secure aggregation (Bonawitz et al. 2017; Bell et al. 2020 for secaggplus).

    The server learns only the sum of the cohort's encoded updates (and of their
    weights and training metrics). Updates must be bounded to be encoded without
    overflow: with client-level DP (privacy.clip_side=client) the DP clip norm is the
    bound; with privacy.mode=none set ``clip``.
    """

    mode: SecAggMode = SecAggMode.off
    # Ring Z_{2**bits} of the masked sum; the fixed-point scale is derived from it, the
    # clip bound and the cohort size so the sum cannot overflow (checked at build time).
    bits: int = 32
    # Fraction of the cohort that may drop out (at any stage) while the sum is recovered.
    dropout_tolerance: float = 0.2
    # Fraction of the cohort that may collude with the server (sets the Shamir threshold).
    corrupt_fraction: float = 0.1
    # Seconds the server waits for the replies of each of the four stages.
    stage_timeout_s: float = 60.0
    # L2 bound every client clips its update to before encoding, when no client-level
    # DP clip norm exists (privacy.mode=none); must be null with privacy.mode=central.
    clip: float | None = None
    # Example-weighted aggregation sends w = min(num_examples, max_weight) / max_weight
    # as a masked coordinate: clients with more examples count as max_weight.
    max_weight: float = 1000.0
    # Rounds one key advertisement (stage 1) covers: a client draws a fresh, independent
    # key pair for each of the next key_rounds rounds, so a round in which every sampled
    # client already advertised its pair skips stage 1 (3 message exchanges instead of
    # 4). Private keys of future rounds wait in the SuperNode's memory until their round;
    # 1 = draw and exchange keys in every round.
    key_rounds: int = 16
    # honest_but_curious: the server follows the protocol and only learns from what it
    # receives (Bell et al.'s semi-honest thresholds: k=38, t=20 at 100 clients).
    # malicious: the server may lie about who dropped or substitute keys; thresholds
    # survive a split view plus colluders (k=52, t=32 at 100 clients), clients sign their
    # keys and the survivor set (consistency-check round). A site policy may require it.
    server_model: SecAggServerModel = SecAggServerModel.honest_but_curious


class SimulationBackend(str, Enum):
    ray = "ray"  # Flower's simulation engine (run_simulation on Ray)
    inprocess = "inprocess"  # our in-process Grid: no Ray, one process, fast


@dataclass
class ValidationConfig:
    """Limits the server applies to every client reply at ingestion."""

    # L2 norm of a client's whole update above which it is rejected as absurd.
    max_update_norm: float = 1.0e4
    # Largest example count (aggregation weight) one client may claim.
    max_num_examples: int = 10_000_000


@dataclass
class RuntimeConfig:
    backend: SimulationBackend = SimulationBackend.ray
    # Explicit per-client resources (Flower's default is 2 CPUs per client).
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    # Ray cluster to join: "local" starts a private one (never attaches to someone
    # else's by accident); "auto" or "ray://host:port" joins an existing cluster.
    ray_address: str = "local"
    # CPUs Ray may use on this machine when it starts a local cluster (null = all).
    ray_num_cpus: int | None = None
    # Seconds the server waits for train / evaluate replies in one round.
    train_timeout_s: float = 600.0
    evaluate_timeout_s: float = 300.0
    # Flower's own log level (our progress lines are always printed).
    flower_log_level: str = "WARNING"
    # Torch intra-op threads per client process (1 avoids oversubscription).
    torch_threads: int = 1
    # Train/evaluate instructions awaiting replies at once: 0 = all, null = 32 under
    # Ray simulation (its message sweep is O(nodes x in flight)), all elsewhere.
    max_in_flight: int | None = None
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class CheckpointConfig:
    """Server checkpoints (``checkpoints/round-NNNN/`` in the run directory, every round)."""

    # How many complete checkpoints to keep (the newest); 0 keeps all of them, so any
    # round can be rolled back to. The privacy ledger is never pruned.
    keep: int = 0


@dataclass
class AppConfig:
    seed: int = 42
    num_rounds: int = 5
    # Centralised evaluation of the global model on the server's held-out split.
    server_eval: bool = True
    # Federated evaluation on clients' local validation splits (every N rounds; 0 = off).
    # null: every round where the threat model lets the server see per-client metrics
    # (none, trusted_server), off where it does not (see federated_eval_interval).
    federated_eval_every: int | None = None
    experiment_name: str = "default"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: ClientTrainConfig = field(default_factory=ClientTrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    share: ShareConfig = field(default_factory=ShareConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Continue the run in this run directory from its last complete checkpoint (the
    # rest of the config must equal the one it ran with). Not part of the config hash.
    resume: str | None = None
    # With resume: restart from this round's checkpoint instead (rounds after it are
    # redone; the privacy they spent stays in the ledger). Not part of the config hash.
    rollback_to: int | None = None
    # Ed25519 private key (PEM, `fl-app audit keygen`) that signs the server audit log's
    # head at the end of the run and at every checkpoint (audit_head.sig.json); the
    # passphrase of an encrypted key comes from $FL_APP_AUDIT_KEY_PASSPHRASE. Loaded
    # before the run starts. Not part of the config hash.
    audit_signing_key: str | None = None


def metrics_hidden_from_server(cfg: AppConfig) -> bool:
    """Whether the run's threat model keeps every un-noised per-client number from the
    server: ``honest_but_curious``, ``distributed_dp``, local DP under any name, and any
    run with secure aggregation (it exists to hide each client's contribution, so a
    plaintext evaluation reply beside the masked sum would defeat it).

    Federated evaluation replies carry a client's loss, accuracy and example count in
    plaintext (they cannot ride in the masked sum yet), so such runs do not evaluate
    on clients; train metrics ride in the masked vector or are left out.
    """
    return (
        cfg.privacy.mode is PrivacyMode.local
        or cfg.secagg.mode is not SecAggMode.off
        or cfg.privacy.threat_model in (ThreatModel.honest_but_curious, ThreatModel.distributed_dp)
    )


def evaluation_hidden_from_server(cfg: AppConfig) -> bool:
    """Whether no client may send federated-evaluation numbers to the server.

    Every threat model of :func:`metrics_hidden_from_server`, and record-level DP-SGD:
    its ε covers the noised update only, while a client's loss and accuracy on its own
    records are un-noised functions of those records, released outside the accounting.
    """
    return metrics_hidden_from_server(cfg) or cfg.privacy.record_level


def federated_eval_interval(cfg: AppConfig) -> int:
    """Rounds between federated evaluations (0: off); resolves ``federated_eval_every=null``."""
    if cfg.federated_eval_every is not None:
        return cfg.federated_eval_every
    return 0 if evaluation_hidden_from_server(cfg) else 1
