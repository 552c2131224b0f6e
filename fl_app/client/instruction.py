"""Decode one instruction and set up what both handlers need, before any training.

:func:`prepare` reads the instruction (spec, round, global weights), applies the
client's own checks in order (no federated evaluation under a threat model that hides
per-client numbers; no downgrade within a run, :mod:`fl_app.client.downgrade`; the
site policy's verdict on the request, :mod:`fl_app.client.enforce`) *before* any data
is read, then loads the site's data and builds the model on the device the site trains
on (:func:`training_device`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, Message

from fl_app.client.downgrade import refuse_downgrade
from fl_app.client.enforce import enforce_request
from fl_app.client.identity import partition
from fl_app.client.policy import SitePolicy
from fl_app.client.refusal import ClientRefusal
from fl_app.client_spec import ClientSpec, SpecError, decode_spec
from fl_app.protocol import ARRAYS_KEY, CONFIG_KEY, SERVER_ROUND, SPEC_KEY

__all__ = ["prepare", "read_instruction", "training_device", "training_seed"]


def read_instruction(msg: Message) -> tuple[ClientSpec, int, dict[str, np.ndarray], Any]:
    """The instruction's spec, round, global weights and config record, or a refusal."""
    from fl_app.weights import from_array_record

    content = msg.content
    if CONFIG_KEY not in content.config_records or ARRAYS_KEY not in content.array_records:
        raise ClientRefusal(f"instruction lacks '{CONFIG_KEY}' or '{ARRAYS_KEY}' record")
    config = content.config_records[CONFIG_KEY]
    try:
        spec = decode_spec(config.get(SPEC_KEY))
    except SpecError as err:
        raise ClientRefusal(str(err)) from err
    rnd = config.get(SERVER_ROUND)
    if not isinstance(rnd, int) or isinstance(rnd, bool):
        raise ClientRefusal(f"'{SERVER_ROUND}' missing or not an integer: {rnd!r}")
    arrays = from_array_record(content.array_records[ARRAYS_KEY])
    return spec, rnd, arrays, config


def training_seed(seed: int, rnd: int, partition_id: int) -> int:
    """A per-(run seed, round, client) seed for shuffling; independent streams."""
    ss = np.random.SeedSequence([seed, rnd, partition_id, 0x7EA1])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def prepare(
    msg: Message,
    context: Context,
    policy: SitePolicy | None,
    message_type: str,
    secure: Any = None,
) -> tuple[Any, ...]:
    """Shared set-up of both handlers: spec, the site policy's verdict on the request
    (before any data is read), data, model loaded with global weights. ``secure``: the
    train instruction's secure-aggregation stage-3 state (``None``: a plain one)."""
    import torch

    from fl_app.data import DataError, check_data_shape, load_client_data
    from fl_app.models import build_model

    spec, rnd, arrays, config = read_instruction(msg)
    local_dp = spec.client_dp is not None and spec.client_dp.local_noise_multiplier is not None
    if message_type == "evaluate" and (
        local_dp or spec.hide_client_metrics or spec.dpsgd is not None
    ):
        # The client's own check (the server turns federated evaluation off there too).
        raise ClientRefusal(
            "federated evaluation would send this client's un-noised loss, accuracy and "
            "example count to a server the run's threat model does not trust with them "
            "(honest_but_curious, distributed_dp, local DP, record-level DP-SGD, whose "
            "epsilon covers only the noised update); this client does not evaluate"
        )
    refuse_downgrade(context, spec, message_type, secure, local_dp)
    enforce_request(policy, spec, message_type, config)
    torch.set_num_threads(max(1, spec.torch_threads))
    device = training_device(context, spec)  # a missing device refuses before data is read
    pid, nparts = partition(context)
    try:
        data = load_client_data(spec.dataset, pid, nparts, spec.seed, dict(context.node_config))
        check_data_shape(data.train, spec.dataset)
    except DataError as err:
        raise ClientRefusal(f"data: {err}") from err
    # Seeded only so initialisation never touches the global RNG: the global weights
    # overwrite these parameters before any use.
    model = build_model(spec.model, spec.dataset.input_shape, spec.dataset.num_classes, seed=0)
    return spec, rnd, arrays, config, pid, data, model.to(device)


def training_device(context: Context, spec: ClientSpec) -> Any:
    """The ``torch.device`` this client trains on: its node config's ``train-device``
    when the site set one, else the server's ``train.device``; a device this machine
    lacks is a refusal naming the field and the fix (:mod:`fl_app.device`)."""
    from fl_app.config.errors import ConfigError
    from fl_app.device import resolve_device, site_device

    value, field = site_device(context.node_config, spec.train.device)
    try:
        return resolve_device(value, field)
    except ConfigError as err:
        raise ClientRefusal(str(err)) from err
