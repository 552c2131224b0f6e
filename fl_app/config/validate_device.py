"""Checks on where clients train: ``train.device`` and ``runtime.client_num_gpus``.

Two kinds, kept apart because they run in different places:

* :func:`check_device` (part of :func:`fl_app.config.validate.validate_config`, so it
  runs wherever a config is resolved, the deployed server included): the value's form
  and the cross-field rules, none of which depends on the machine;
* :func:`check_simulation_hardware` (called by the simulation before any client
  starts, never by a deployed server, which needs no GPU of its own): the device and
  the GPU shares exist on this machine.

Ray gives a client with ``num_gpus > 0`` its share by setting ``CUDA_VISIBLE_DEVICES``
to the GPU it picked, so inside the client that GPU is ``cuda:0``; hence ``cuda:N``
with ``N > 0`` is refused together with GPU shares.
"""

from __future__ import annotations

import math

from fl_app.config.errors import ConfigConflictError, ConfigRangeError
from fl_app.config.errors import require as _check
from fl_app.config.schema import AppConfig, SimulationBackend
from fl_app.device import DEVICE_FIELD, DeviceUnavailableError, parse_device, resolve_device

__all__ = ["check_device", "check_simulation_hardware"]

_GPUS = "runtime.client_num_gpus"


def check_device(cfg: AppConfig) -> None:
    """The form of ``train.device`` and how it goes with ``runtime.client_num_gpus``."""
    request = parse_device(cfg.train.device)
    gpus = cfg.runtime.client_num_gpus
    if not gpus > 0:
        return  # >= 0 is the runtime check's (fl_app.config.validate)
    _check(
        math.isfinite(gpus) and (gpus <= 1 or float(gpus).is_integer()),
        _GPUS,
        gpus,
        "a share of one GPU in (0, 1] (0.25: four clients per GPU) or a whole number of "
        "GPUs per client: Ray schedules no fractions above 1",
        ConfigRangeError,
    )
    _check(
        cfg.runtime.backend is SimulationBackend.ray,
        _GPUS,
        gpus,
        "only the Ray backend schedules GPU shares; the in-process backend trains every "
        "client on train.device directly: set runtime.client_num_gpus=0",
        ConfigConflictError,
    )
    _check(
        request.kind in ("auto", "cuda"),
        _GPUS,
        gpus,
        f"reserves GPU shares that clients training on {DEVICE_FIELD}={request} never use: "
        "set train.device=auto or cuda, or runtime.client_num_gpus=0",
        ConfigConflictError,
    )
    _check(
        request.index in (None, 0),
        DEVICE_FIELD,
        str(request),
        "with runtime.client_num_gpus > 0 Ray shows each client its own GPU share as "
        "cuda:0: use train.device=cuda (or auto)",
        ConfigConflictError,
    )


def check_simulation_hardware(cfg: AppConfig) -> str:
    """Refuse a simulation this machine cannot run; return the device clients resolve.

    On a Ray cluster (``runtime.ray_address`` other than ``local``) the GPUs may be on
    other machines: nothing is checked here (a client without the device refuses its
    round, naming the field), and ``"cluster"`` is returned.

    Raises
    ------
    DeviceUnavailableError
        ``train.device`` names a device this machine lacks, or GPU shares are asked for
        on a machine where torch sees no CUDA device.
    """
    if cfg.runtime.backend is SimulationBackend.ray and cfg.runtime.ray_address != "local":
        return "cluster"
    device = resolve_device(cfg.train.device)
    if cfg.runtime.client_num_gpus > 0 and device.type != "cuda":
        raise DeviceUnavailableError(
            _GPUS,
            cfg.runtime.client_num_gpus,
            "torch sees no CUDA device on this machine, so Ray has no GPU to share: set "
            "runtime.client_num_gpus=0, or run on a machine with a CUDA GPU and torch",
        )
    return str(device)
