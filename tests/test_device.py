"""Where a client trains (``train.device``, issue 22): one resolution, checked early.

What is asserted: the accepted forms and the refused ones (naming the field and the
fix); ``auto`` falls back to the CPU where torch sees no CUDA device (this machine,
and a monkeypatched one) and picks ``cuda:0`` where it does; a site's node config
wins over the server's value; a device this machine lacks refuses the client's round
before any data is read, and the simulation before any client starts; GPU shares only
with the Ray backend and a device that uses them; a CPU reply carries no device
metric (today's replies unchanged) and a GPU one carries two, kept under the hidden
modes; a model is moved to the resolved device and trained through the ClientApp's own
path. DP-SGD's noise reaches the device with standard deviation ``z·C/B`` (worked by
hand) on the CPU here, and on CUDA in the tests marked ``gpu`` (skipped without a CUDA
device; ``scripts/gpu_check.sh`` runs them where one is lent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from torch import nn

from fl_app.client.app import app as client_app
from fl_app.client.train import hidden_mode_public
from fl_app.client_spec import encode_spec, spec_from_config
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigError, ConfigRangeError
from fl_app.config.schema import AppConfig, ClientTrainConfig, SimulationBackend
from fl_app.config.validate_device import check_device, check_simulation_hardware
from fl_app.deploy import DeployError
from fl_app.deploy.site import node_config_from_site
from fl_app.deploy.site_check import check_site
from fl_app.device import (
    DeviceRequest,
    DeviceUnavailableError,
    device_from_metrics,
    device_metrics,
    parse_device,
    resolve_device,
    run_manifest_device,
    site_device,
)
from fl_app.privacy.dpsgd_opacus import _PrivateTrainer
from fl_app.privacy.dpsgd_settings import DpSgdSettings, GradSampleMode
from fl_app.privacy.noise import SecureNoise
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.server.app import initial_arrays
from fl_app.training import train_local
from fl_app.weights import to_array_record

CLIENT_REFUSED = 1001  # fl_app/protocol.py's wire code of a refusal
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="gpu marker: needs a CUDA device (scripts/gpu_check.sh runs these)"
)


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cuda_count(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# ------------------------------------------------------------------------- the form
@pytest.mark.parametrize(
    ("text", "kind", "index"),
    [
        ("auto", "auto", None),
        ("cpu", "cpu", None),
        ("cuda", "cuda", None),
        ("cuda:0", "cuda", 0),
        ("cuda:7", "cuda", 7),
        ("cuda:15", "cuda", 15),
        ("mps", "mps", None),
    ],
)
def test_accepted_forms(text: str, kind: str, index: int | None) -> None:
    assert parse_device(text) == DeviceRequest(kind, index)
    assert str(parse_device(text)) == text


@pytest.mark.parametrize(
    "bad", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cpu:0", "mps:1", " cpu", "", 0, None]
)
def test_refused_forms_name_the_field_and_the_choices(bad: object) -> None:
    with pytest.raises(ConfigRangeError) as info:
        parse_device(bad)
    assert info.value.field == "train.device" and info.value.found == bad
    assert "auto, cpu, cuda, cuda:N" in info.value.fix and "mps" in info.value.fix


# --------------------------------------------------------------------- resolution
def test_auto_is_the_cpu_on_this_machine_and_wherever_torch_sees_no_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not CUDA:
        assert resolve_device("auto") == torch.device("cpu")
    _no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_first_cuda_device_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda_count(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_cuda_asked_but_absent_names_the_field_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceUnavailableError) as info:
        resolve_device("cuda:0", 'node-config "train-device"')
    assert info.value.field == 'node-config "train-device"' and info.value.found == "cuda:0"
    assert "no CUDA device" in info.value.fix and "use auto" in info.value.fix
    assert isinstance(info.value, ConfigError)


def test_a_cuda_index_past_the_devices_seen_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda_count(monkeypatch, 2)
    with pytest.raises(DeviceUnavailableError, match=r"sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_mps_asked_but_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="no MPS device"):
        resolve_device("mps")


def test_the_sites_node_config_wins_over_the_servers_value() -> None:
    assert site_device({"train-device": "cpu"}, "cuda") == ("cpu", 'node-config "train-device"')
    assert site_device({"partition-id": 0}, "cuda:1") == ("cuda:1", "train.device")


def test_run_manifest_records_the_value_and_what_the_server_resolves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_cuda(monkeypatch)
    assert run_manifest_device("auto") == {"configured": "auto", "resolved_on_server": "cpu"}
    cuda = run_manifest_device("cuda")  # a deployed server needs no GPU: recorded, not raised
    assert cuda["configured"] == "cuda"
    assert cuda["resolved_on_server"].startswith("unavailable on the server: torch sees no")


# ------------------------------------------------------------------------- metrics
def test_device_metrics_none_on_the_cpu_two_numbers_on_an_accelerator() -> None:
    assert device_metrics(torch.device("cpu")) == {}
    cuda1 = device_metrics(torch.device("cuda", 1))
    assert cuda1 == {"dp-device-type": 1, "dp-device-index": 1}
    assert device_metrics(torch.device("mps")) == {"dp-device-type": 2, "dp-device-index": 0}
    assert device_from_metrics(cuda1) == "cuda:1"
    assert device_from_metrics({"dp-device-type": 2.0, "dp-device-index": 0.0}) == "mps"
    assert device_from_metrics({"dp-epsilon": 1.0}) == "cpu"


def test_hidden_modes_keep_the_device_metrics() -> None:
    public = {"dp-device-type": 1.0, "dp-device-index": 0.0, "train-loss": 0.1}
    assert hidden_mode_public(public) == {"dp-device-type": 1.0, "dp-device-index": 0.0}


# -------------------------------------------------------------- config validation
def _cfg(
    device: str = "auto",
    gpus: float = 0.0,
    backend: SimulationBackend = SimulationBackend.ray,
    address: str = "local",
) -> AppConfig:
    cfg = AppConfig()
    cfg.train.device = device
    cfg.runtime.client_num_gpus = gpus
    cfg.runtime.backend = backend
    cfg.runtime.ray_address = address
    return cfg


@pytest.mark.parametrize(
    ("case", "field", "kind", "words"),
    [
        (0, "runtime.client_num_gpus", ConfigRangeError, "(0, 1]"),
        (1, "runtime.client_num_gpus", ConfigConflictError, "only the Ray backend"),
        (2, "runtime.client_num_gpus", ConfigConflictError, "never use"),
        (3, "train.device", ConfigConflictError, "as cuda:0"),
        (4, "train.device", ConfigRangeError, "auto, cpu"),
    ],
)
def test_bad_device_settings_are_refused(case: int, field: str, kind: type, words: str) -> None:
    cfg = [
        _cfg(gpus=1.5),
        _cfg(gpus=0.5, backend=SimulationBackend.inprocess),
        _cfg(gpus=0.5, device="cpu"),
        _cfg(gpus=0.5, device="cuda:1"),
        _cfg(device="gpu"),
    ][case]
    with pytest.raises(kind) as info:
        check_device(cfg)
    assert info.value.field == field and words in info.value.fix


def test_the_validator_runs_the_device_checks_at_composition() -> None:
    assert compose_config().train.device == "auto"
    with pytest.raises(ConfigRangeError) as info:
        compose_config("config", ["train.device=gpu"])
    assert info.value.field == "train.device"


@pytest.mark.parametrize("gpus", [0.0, 0.25, 1.0, 2.0])
def test_gpu_shares_with_ray_and_a_gpu_device_pass(gpus: float) -> None:
    check_device(_cfg(device="cuda", gpus=gpus))
    check_device(_cfg(device="auto", gpus=gpus))


def test_simulation_refuses_hardware_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    assert check_simulation_hardware(_cfg(backend=SimulationBackend.inprocess)) == "cpu"
    with pytest.raises(DeviceUnavailableError) as info:
        check_simulation_hardware(_cfg(device="cuda"))
    assert info.value.field == "train.device"
    with pytest.raises(DeviceUnavailableError) as info:
        check_simulation_hardware(_cfg(gpus=0.5))
    assert info.value.field == "runtime.client_num_gpus" and "no GPU to share" in info.value.fix
    cluster = _cfg(device="cuda", address="auto")
    assert check_simulation_hardware(cluster) == "cluster"  # GPUs may be on other machines


# -------------------------------------------------------------------- deployment
def test_site_yaml_device_becomes_train_device_and_its_form_is_checked() -> None:
    assert node_config_from_site({"name": "a", "device": "cuda:1"})["train-device"] == "cuda:1"
    with pytest.raises(DeployError, match=r"`device` \(found 'gpu'\)"):
        node_config_from_site({"name": "a", "device": "gpu"})


def test_site_check_resolves_the_sites_device_here(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    checks = {c.name: c for c in check_site({"site-name": "a", "train-device": "cuda"})}
    assert not checks["device"].ok and "no CUDA device" in checks["device"].detail
    checks = {c.name: c for c in check_site({"site-name": "a", "train-device": "cpu"})}
    assert checks["device"].ok and checks["device"].detail == "cpu (trains on cpu)"
    assert "device" not in {c.name for c in check_site({"site-name": "a"})}


# ------------------------------------------------------------ the ClientApp's path
def _train_reply(node_config: dict[str, Any], device: str = "auto") -> Message:
    cfg = compose_config("config", ["runtime=inprocess", "train.local_epochs=1"])
    cfg.train.device = device
    grid = InProcessGrid(client_app, 1, seed=0, node_config_fn=lambda i, n: dict(node_config))
    content = RecordDict(
        {
            "arrays": to_array_record(initial_arrays(cfg)),
            "config": ConfigRecord(
                {"fl-app.spec": encode_spec(spec_from_config(cfg)), "server-round": 1}
            ),
        }
    )
    msg = Message(content, dst_node_id=grid.node_ids[0], message_type="train")
    return next(iter(grid.send_and_receive([msg])))


def _update(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["update"].items()}


def test_a_model_moved_to_the_resolved_cpu_trains_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same path a GPU site takes (resolve, move, train, weights back to numpy),
    with the site's node config naming the CPU: the update is the default's bit for
    bit, and the reply names no device (a CPU reply is today's)."""
    _no_cuda(monkeypatch)  # the default (auto) is the CPU on a GPU machine too
    moved: list[torch.device] = []
    original = nn.Module.to

    def spy(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        moved.extend(a for a in args if isinstance(a, torch.device))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    site = {"partition-id": 0, "num-partitions": 2}
    default = _train_reply(site)
    pinned = _train_reply({**site, "train-device": "cpu"}, device="cuda")
    assert moved == [torch.device("cpu"), torch.device("cpu")]
    assert not default.has_error() and not pinned.has_error()
    a, b = _update(default), _update(pinned)
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not any(k.startswith("dp-device") for k in pinned.content["metrics"])


def test_a_site_asking_for_a_missing_gpu_refuses_before_reading_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_cuda(monkeypatch)
    # The partition is out of range: a refusal about the device shows it came first.
    reply = _train_reply({"partition-id": 9, "num-partitions": 2, "train-device": "cuda"})
    assert reply.has_error() and reply.error.code == CLIENT_REFUSED
    assert 'config error in `node-config "train-device"`' in reply.error.reason
    assert "no CUDA device" in reply.error.reason


def test_train_local_on_the_resolved_device_leaves_the_model_there() -> None:
    device = resolve_device("cpu")
    model = nn.Linear(4, 3).to(device)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.arange(8) % 3
    cfg = ClientTrainConfig(local_epochs=1, batch_size=4, lr=0.1)
    stats = train_local(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert stats.steps == 2 and all(p.device == device for p in model.parameters())


# ------------------------------------------------------------- DP-SGD on a device
def _noise_only_step_std(device: torch.device) -> tuple[float, float]:
    """One pure-noise DP-SGD step (empty Poisson batch), lr=1, no momentum: each weight
    moves by -z·C·g/B with g ~ N(0, 1) from the client's ChaCha20 keystream, B = N // k
    = 10 (N = B = 10, k = 1). z = 2, C = 0.5: the moves have mean 0 and std 0.1."""
    # One parameter tensor (no bias): the noise's device is read off the first one.
    model = nn.Linear(1000, 100, bias=False).to(device)  # 100,000 weights
    before = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
    xt = torch.zeros((10, 1000), device=device)
    yt = torch.zeros(10, dtype=torch.long, device=device)
    cfg = ClientTrainConfig(local_epochs=1, batch_size=10, lr=1.0, momentum=0.0)
    dp = DpSgdSettings(2.0, 0.5, grad_sample_mode=GradSampleMode.hooks)
    trainer = _PrivateTrainer(
        model,
        xt,
        yt,
        cfg,
        dp,
        "hooks",
        sampling_generator=None,
        noise_generator=None,
        keystreams=(SecureNoise(), SecureNoise()),
    )
    try:
        trainer.step(xt[:0], yt[:0])
        assert all(p.device == device for p in model.parameters())
    finally:
        trainer.close()
    moves = torch.cat([p.detach().flatten().cpu() for p in model.parameters()]) - before
    return float(moves.mean()), float(moves.std())


def test_dpsgd_noise_has_std_z_c_over_b_on_the_cpu() -> None:
    # 100,000 draws: the std's standard error is 0.1/sqrt(2n) = 2.2e-4, the mean's
    # 3.2e-4; the tolerances are over 6 standard errors (false failure < 1e-9).
    mean, std = _noise_only_step_std(torch.device("cpu"))
    assert abs(mean) < 2e-3 and abs(std - 0.1) < 2e-3


@gpu
@needs_cuda
def test_dpsgd_noise_from_the_cpu_keystream_reaches_cuda_with_std_z_c_over_b() -> None:
    mean, std = _noise_only_step_std(torch.device("cuda", 0))
    assert abs(mean) < 2e-3 and abs(std - 0.1) < 2e-3


@gpu
@needs_cuda
def test_a_cuda_site_trains_on_cuda_and_reports_it() -> None:
    site = {"partition-id": 0, "num-partitions": 2}
    reply = _train_reply({**site, "train-device": "cuda"})
    assert not reply.has_error()
    metrics = dict(reply.content["metrics"])
    assert device_from_metrics(metrics) == "cuda:0"
    cpu = _update(_train_reply({**site, "train-device": "cpu"}))
    # Same data, same batches (CPU generator), other float32 kernels: equal to well
    # within 1e-3 (a wrong batch or a missed step moves weights by ~1e-1). Loose on
    # purpose: the bound was set without a GPU to measure the kernels' drift on.
    for key, value in _update(reply).items():
        np.testing.assert_allclose(value, cpu[key], rtol=1e-2, atol=1e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", [0, 1])  # plain, record-level DP-SGD (Opacus on CUDA)
def test_an_inprocess_simulation_on_cuda_records_the_device(tmp_path: Path, case: int) -> None:
    import json

    from fl_app.runtime.simulation import run_simulation_experiment

    privacy = [[], ["privacy=dpsgd"]][case]
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "train.device=cuda",
            "num_rounds=2",
            "dataset.num_partitions=3",
            *privacy,
        ],
    )
    summary = run_simulation_experiment(cfg, tmp_path)
    assert summary["status"] == "completed"
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["train_device"] == {"configured": "cuda", "resolved_on_server": "cuda:0"}
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    devices = {
        device_from_metrics({k.replace("_", "-"): v for k, v in m.items()})
        for r in rounds
        for m in r["client_metrics"].values()
    }
    assert devices == {"cuda:0"}


def test_simulate_asking_for_a_missing_gpu_exits_2_and_leaves_no_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fl_app.cli import main

    _no_cuda(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "train.device=cuda:0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "config error in `train.device` (found 'cuda:0')" in err and "use auto" in err
    assert list(tmp_path.iterdir()) == []
