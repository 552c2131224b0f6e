"""The client's slice of the experiment config, sent in every instruction.

Under ``flwr run`` a ClientApp knows nothing of the Hydra config the ServerApp
composed; in simulation it should not rely on more than it would get in deployment.
So the server serialises exactly what clients need (seed, dataset, model, local
training) as JSON under ``config["fl-app.spec"]``, and the client parses it back into
typed dataclasses, refusing unknown keys and wrong types like any other config. JSON,
never pickle: this crosses a trust boundary.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fl_app.config.schema import (
    Accountant,
    AppConfig,
    ClientTrainConfig,
    DatasetConfig,
    DpSgdConfig,
    ModelConfig,
    NoiseSchedule,
    ShareConfig,
    metrics_hidden_from_server,
)

__all__ = [
    "ClientDpSpec",
    "ClientSpec",
    "DdpScheduleSpec",
    "SpecError",
    "decode_spec",
    "encode_spec",
    "spec_from_config",
]


class SpecError(ValueError):
    """The spec a server sent cannot be used (malformed JSON, unknown key, bad type)."""


@dataclass
class DdpScheduleSpec:
    """``privacy.schedule`` under distributed DP, stated for the client to check.

    Each round's noise is the clients' own, so a client never takes the server's word
    for that round's ``z``: from these public numbers it recomputes the least ``z`` the
    stated schedule allows in round ``t`` and refuses a stage-3 instruction whose
    distributed-DP parameters carry less (:mod:`fl_app.privacy.ddp_schedule`).
    ``decay``: ``z_t = noise_multiplier · decay_rate^(t−1)``. ``spend``: the ``z`` that
    spends ``max_epsilon`` over ``num_rounds`` rounds at ``sample_rate``, by the DDG
    bound of a ring sized by ``max_cohort``, ``dropout_tolerance``, ``beta`` and
    ``overflow_probability`` (the run's distributed-DP plan).
    """

    schedule: NoiseSchedule = NoiseSchedule.constant
    noise_multiplier: float = 1.0
    decay_rate: float = 1.0
    num_rounds: int = 1
    max_epsilon: float | None = None
    delta: float = 1e-5
    sample_rate: float = 1.0
    max_cohort: int = 1
    dropout_tolerance: float = 0.5
    beta: float = 0.0
    overflow_probability: float = 1e-9


@dataclass
class ClientDpSpec:
    """What a client does for client-level DP (present when clients clip).

    The clip norm itself changes per round (adaptive clipping) and arrives as
    ``config["fl-app.clip-norm"]`` in each train instruction.
    """

    # Local DP: noise N(0, (z·C)²) on the clipped update before it leaves; null = the
    # client only clips (central DP with client-side clipping).
    local_noise_multiplier: float | None = None
    # Report whether the update was within the clip norm (adaptive clipping's count).
    report_unclipped: bool = False
    delta: float = 1e-5
    accountant: Accountant = Accountant.pld
    # Local DP budget of this client: it refuses a round that would take it past this.
    max_epsilon: float | None = None
    # Where a local-DP client keeps its release count (fl_app.privacy.state.LocalDpStore).
    # A SuperNode's --node-config "dp-state-dir=..." wins; the server fills in the run
    # directory's client-state/ in simulation.
    state_dir: str | None = None
    # Distributed DP with privacy.schedule=decay|spend: the schedule each stage-3
    # instruction's noise is checked against (None: the run's noise is constant).
    ddp_schedule: DdpScheduleSpec | None = None


@dataclass
class ClientSpec:
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: ClientTrainConfig = field(default_factory=ClientTrainConfig)
    # Torch intra-op threads in the client process (simulation packs several per machine).
    torch_threads: int = 1
    # Planned rounds (DP-SGD calibrates z for num_rounds x local_epochs once).
    num_rounds: int = 1
    # Identifies the run: a client's privacy state is kept per run.
    run_key: str = ""
    # Record-level DP-SGD settings; None = train without DP-SGD.
    dpsgd: DpSgdConfig | None = None
    # CSPRNG (client-held keystreams) for DP-SGD noise and batches; false = seeded from
    # the run's seed: an explicit opt-in, "not for release". A spec without it is secure.
    secure_mode: bool = True
    # Client-level DP stages (clip, local noise); None = send the raw update.
    client_dp: ClientDpSpec | None = None
    # The threat model keeps every un-noised per-client number from the server
    # (honest_but_curious, distributed_dp, local DP): the client refuses to evaluate.
    hide_client_metrics: bool = False
    # What leaves the site (share.artifact, share.layers); the layers it does not list stay
    # with the site (fl_app.client.personal), in node-config dp-state-dir or this folder
    # (the server fills in the run directory's client-state/ in simulation).
    share: ShareConfig = field(default_factory=ShareConfig)
    share_state_dir: str | None = None


def spec_from_config(
    cfg: AppConfig, run_key: str = "", client_dp: ClientDpSpec | None = None
) -> ClientSpec:
    return ClientSpec(
        seed=cfg.seed,
        dataset=cfg.dataset,
        model=cfg.model,
        train=cfg.train,
        torch_threads=cfg.runtime.torch_threads,
        num_rounds=cfg.num_rounds,
        run_key=run_key,
        dpsgd=cfg.privacy.dpsgd if cfg.privacy.record_level else None,
        secure_mode=cfg.privacy.secure_mode,
        client_dp=client_dp,
        hide_client_metrics=metrics_hidden_from_server(cfg),
        share=cfg.share,
    )


def encode_spec(spec: ClientSpec) -> str:
    container = OmegaConf.to_container(OmegaConf.structured(spec), enum_to_str=True)
    return json.dumps(container, sort_keys=True, separators=(",", ":"))


def decode_spec(text: object) -> ClientSpec:
    """Parse and type-check a spec; :class:`SpecError` names what is wrong.

    The same spec arrives with every message of a run and OmegaConf's typed merge
    costs ~25 ms, most of a small client's round, so parsed specs are cached by text
    and handed out as copies (a caller may not change the cached one).
    """
    if not isinstance(text, str):
        raise SpecError(f"client spec must be a JSON string, got {type(text).__name__}")
    return copy.deepcopy(_decode_cached(text))


def _refuse_interpolation(value: object, path: str) -> None:
    """No string of a spec may hold ``${``: OmegaConf resolves interpolations while it
    merges, on the client, so ``${oc.env:VAR}`` would read the client's environment. One
    spec text would then decode differently at each site (defeating the secure-aggregation
    binding of the spec text, fl_app.secagg.protocol.spec_binding), and a type error would
    echo the variable's value back to the server. Specs are built from resolved configs
    (encode_spec), so an honest one never holds ``${``."""
    if isinstance(value, str):
        if "${" in value:
            raise SpecError(
                f"client spec field `{path or '.'}`: '${{' is refused (an interpolation the "
                "client would resolve; a spec from the server carries resolved values)"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_interpolation(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_interpolation(item, f"{path}[{i}]")


@functools.lru_cache(maxsize=16)
def _decode_cached(text: str) -> ClientSpec:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"client spec is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise SpecError("client spec must be a JSON object")
    _refuse_interpolation(raw, "")
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClientSpec), raw))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise SpecError(f"client spec field `{key}`: {str(err).splitlines()[0]}") from err
    assert isinstance(obj, ClientSpec)
    return obj
