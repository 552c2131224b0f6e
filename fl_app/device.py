"""Where a client trains: ``train.device`` parsed, checked and resolved in one place.

``train.device`` is ``auto | cpu | cuda | cuda:N | mps``; ``auto`` is the first CUDA
device where torch sees one, else the CPU (so a CPU-only machine behaves as before the
setting existed). The server's value is a default that travels in the client spec; a
deployed site overrides it with its node config's ``train-device`` (its hardware is its
own), and the ClientApp resolves whichever applies when it builds the model
(docs/deployment.md, "Training on a site's GPU").

Three checks, three places, one implementation (this module):

* the value's form, when the config is validated (:func:`parse_device`), and when a
  site's YAML is read;
* the device's presence where training happens: the simulation checks this machine
  before any client starts; a deployed client refuses a round naming the field and the
  fix (a deployed *server* needs no GPU, so it never checks);
* what a client reports: the device it resolved, as public metrics
  (:func:`device_metrics`), sent only when it is not the CPU so that replies on a
  CPU-only machine are exactly today's.

torch is imported inside the functions that need it: config validation and the
secure-aggregation key exchange import this module without paying for torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fl_app.config.errors import ConfigError, ConfigPlanError, ConfigRangeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_FIELD",
    "DEVICE_INDEX_METRIC",
    "DEVICE_TYPE_METRIC",
    "NODE_DEVICE_KEY",
    "DeviceRequest",
    "DeviceUnavailableError",
    "device_from_metrics",
    "device_metrics",
    "parse_device",
    "resolve_device",
    "run_manifest_device",
    "site_device",
]

DEVICE_FIELD = "train.device"
# A site's node-config key that overrides the server's train.device for that site.
NODE_DEVICE_KEY = "train-device"
_CHOICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_FORM = re.compile(r"(?P<kind>auto|cpu|cuda|mps)(?::(?P<index>0|[1-9][0-9]{0,2}))?")

# Public per-client metrics ("dp-" is the prefix of every metric the server keeps per
# client, fl_app.protocol.PUBLIC_METRIC_PREFIX). Numbers only (a MetricRecord holds no
# strings): the device type as a code and its index. Absent: the CPU.
DEVICE_TYPE_METRIC = "dp-device-type"
DEVICE_INDEX_METRIC = "dp-device-index"
_TYPE_CODES = {"cuda": 1, "mps": 2}


class DeviceUnavailableError(ConfigPlanError):
    """A device the config (or the site's node config) asks for is not on this machine."""


@dataclass(frozen=True)
class DeviceRequest:
    """A parsed ``train.device``: its kind and, for ``cuda:N``, the index ``N``."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(value: object, field: str = DEVICE_FIELD) -> DeviceRequest:
    """The parsed request, or :class:`~fl_app.config.errors.ConfigRangeError` naming
    ``field``. Only CUDA takes an index (torch has one MPS device)."""
    match = _FORM.fullmatch(value) if isinstance(value, str) else None
    if match is None or (match["index"] is not None and match["kind"] != "cuda"):
        raise ConfigRangeError(
            field,
            value,
            f"use {_CHOICES}; auto trains on the first CUDA device where there is one, "
            "else on the CPU",
        )
    index = match["index"]
    return DeviceRequest(match["kind"], None if index is None else int(index))


def resolve_device(value: object, field: str = DEVICE_FIELD) -> torch.device:
    """The ``torch.device`` this process trains on for ``value``.

    Raises
    ------
    ConfigRangeError
        On a value of the wrong form.
    DeviceUnavailableError
        When ``cuda``/``cuda:N``/``mps`` is asked for and this process cannot see it
        (``auto`` never raises: it falls back to the CPU).
    """
    import torch

    request = parse_device(value, field)
    if request.kind == "cpu":
        return torch.device("cpu")
    if request.kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if request.kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailableError(
                field,
                value,
                "torch sees no MPS device here (not Apple silicon, or a torch "
                "built without MPS): use auto or cpu",
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            field,
            value,
            "torch sees no CUDA device in this process (a CPU-only torch build, no NVIDIA "
            "driver, or CUDA_VISIBLE_DEVICES hides them): use auto (falls back to the CPU) "
            "or cpu, or install a CUDA torch (scripts/bootstrap.sh does where nvidia-smi "
            "works)",
        )
    index = request.index or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            field,
            value,
            f"this process sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}: pick one "
            "of them, or cuda (the first)",
        )
    return torch.device("cuda", index)


def site_device(node_config: Mapping[str, Any], spec_device: str) -> tuple[str, str]:
    """``(value, field)`` a client resolves: its node config's ``train-device`` when the
    site set one (the site's hardware is its own), else the server's ``train.device``."""
    if NODE_DEVICE_KEY in node_config:
        return str(node_config[NODE_DEVICE_KEY]), f'node-config "{NODE_DEVICE_KEY}"'
    return spec_device, DEVICE_FIELD


def device_metrics(device: torch.device) -> dict[str, float]:
    """The public metrics a client reports for the device it trained on (``{}``: CPU)."""
    code = _TYPE_CODES.get(device.type)
    if code is None:
        return {}
    return {DEVICE_TYPE_METRIC: code, DEVICE_INDEX_METRIC: int(device.index or 0)}


def device_from_metrics(metrics: Mapping[str, float]) -> str:
    """The device a client's public metrics name (``"cpu"`` when they name none)."""
    code = metrics.get(DEVICE_TYPE_METRIC)
    if code is None:
        return "cpu"
    kinds = {v: k for k, v in _TYPE_CODES.items()}
    kind = kinds.get(int(code), "unknown")
    return f"{kind}:{int(metrics.get(DEVICE_INDEX_METRIC, 0))}" if kind == "cuda" else kind


def run_manifest_device(value: str) -> dict[str, str]:
    """``run.json``'s ``train_device``: the configured value and what it resolves to in
    the server's process, which is the simulated clients' device (they run on this
    machine); a deployed site resolves its own and reports it in its public metrics.
    Never raises: a deployed server without the GPU its sites use records why."""
    try:
        resolved = str(resolve_device(value))
    except ConfigError as err:  # a bad form, or DeviceUnavailableError
        resolved = f"unavailable on the server: {err.fix}"
    return {"configured": value, "resolved_on_server": resolved}
