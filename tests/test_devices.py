"""GPU settings (tfg_mm.runtime.devices): `device`, `amp`, `num_workers`, `pin_memory`, checked without a GPU.

The resolvers take the machine's facts (CUDA visible, device count, CPUs) as arguments, so every device is
checked here; the loop's fp16 path is checked on CPU with a real gradient scaler.
"""

from __future__ import annotations

import pytest
import torch

from tfg_mm.config import load_params
from tfg_mm.errors import ConfigError
from tfg_mm.runtime import devices
from tfg_mm.runtime.devices import check_amp, loader_settings, resolve_device
from tfg_mm.training import loop as train
from tfg_mm.training.baseline import run_baseline


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_auto_cpu_cuda_and_cuda_n(value):
    assert load_params(device=value).device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_device_rejects_other_spellings_naming_the_parameter_and_the_fix(value):
    with pytest.raises(ConfigError) as err:
        load_params(device=value)
    assert "`device`" in str(err.value) and "cuda:N" in str(err.value)


def test_num_workers_and_pin_memory_take_auto_or_a_value():
    p = load_params()
    assert (p.num_workers, p.pin_memory) == ("auto", "auto")
    p = load_params(num_workers=3, pin_memory=False)
    assert (p.num_workers, p.pin_memory) == (3, False)
    for bad in ({"num_workers": -1}, {"num_workers": "many"}, {"pin_memory": "sometimes"}):
        with pytest.raises(ConfigError) as err:
            load_params(**bad)
        assert f"`{next(iter(bad))}`" in str(err.value)


def test_resolve_device_per_machine():
    assert resolve_device("cpu", cuda_available=True) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=False) == torch.device("cpu")
    assert resolve_device("auto", cuda_available=True) == torch.device("cuda")
    assert resolve_device("cuda", cuda_available=True) == torch.device("cuda")
    assert resolve_device("cuda:1", cuda_available=True, cuda_count=2) == torch.device("cuda", 1)


def test_resolve_device_refuses_an_absent_gpu_with_the_fix():
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:0", cuda_available=False)
    assert "`device: cuda:0`" in str(err.value) and "no CUDA device is visible" in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:2", cuda_available=True, cuda_count=2)
    assert "only 2 CUDA devices" in str(err.value) and "cuda:0, cuda:1" in str(err.value)


def test_amp_that_cannot_run_on_the_device_is_refused():
    with pytest.raises(ConfigError, match="`amp: fp16` needs a CUDA device"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        check_amp("bf16", torch.device("cuda"), bf16_supported=False)
    refused = set()
    for amp in ("no", "fp16", "bf16"):
        for device in ("cpu", "cuda"):
            for bf16 in (True, False):
                try:
                    check_amp(amp, torch.device(device), bf16_supported=bf16)
                except ConfigError:
                    refused.add((amp, device, bf16))
    # fp16 only on CUDA; bf16 on the CPU and on GPUs that support it; no mixed precision everywhere
    assert refused == {("fp16", "cpu", True), ("fp16", "cpu", False), ("bf16", "cuda", False)}


def test_loader_settings_auto_per_device():
    # CPU: today's settings (no worker process, no pinned memory): CPU results stay identical
    assert loader_settings("auto", "auto", "cpu", cpus=16) == devices.LoaderSettings(0, False)
    # CUDA: min(8, CPUs) workers and pinned memory
    assert loader_settings("auto", "auto", "cuda", cpus=16) == devices.LoaderSettings(8, True)
    assert loader_settings("auto", "auto", torch.device("cuda", 1), cpus=3) == devices.LoaderSettings(3, True)
    # explicit values win; pinned memory is dropped on CPU (it only speeds copies to a GPU)
    assert loader_settings(2, True, "cpu", cpus=16) == devices.LoaderSettings(2, False)
    assert loader_settings(0, False, "cuda", cpus=16) == devices.LoaderSettings(0, False)


def test_default_params_on_this_cpu_build_todays_loaders(tiny_dataset):
    from tfg_mm.data import loaders
    from tfg_mm.training.seeding import seed_everything

    params = load_params(dataset=str(tiny_dataset), generate_if_missing=False, device="cpu", batch_size=4)
    data = loaders.make_data(params, seed_everything(0), progress=False)
    for loader in (data.train_loader, data.val_loader):
        assert (loader.num_workers, loader.pin_memory) == (0, False)


def test_one_process_can_switch_mixed_precision_between_runs():
    """accelerate keeps one state per process; a notebook running `amp: no` then `amp: bf16` gets both."""
    cpu = torch.device("cpu")
    x = torch.ones(4, 4)
    first = train.make_accelerator(cpu, "no")
    with first.autocast():
        assert (x @ x).dtype == torch.float32
    second = train.make_accelerator(cpu, "bf16")
    assert second.mixed_precision == "bf16"
    with second.autocast():
        assert (x @ x).dtype == torch.bfloat16
    third = train.make_accelerator(cpu, "no")
    with third.autocast():
        assert (x @ x).dtype == torch.float32


@pytest.mark.slow
def test_fp16_gradient_scaling_skips_overflowing_steps_without_the_divergence_error(tiny_params, monkeypatch):
    """amp fp16's path in the loop, on CPU with a real GradScaler whose scale overflows every gradient.

    The non-finite guard sees the unscaled loss, so the overflow is not reported as a divergence: the scaler
    skips each step (the weights stay as they were) and halves its scale; the state keeps the scaler's.
    """
    scale = 1e38  # any loss above ~3.4 times this overflows float32: every gradient is inf
    real = train.make_accelerator

    def with_scaler(device, amp):
        accelerator = real(device, amp)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        return accelerator

    monkeypatch.setattr(train, "make_accelerator", with_scaler)
    seen = {}
    original_fit = train.Trainer.fit

    def fit(self):
        seen["before"] = {n: p.detach().clone() for n, p in self.task.model.named_parameters()}
        result = original_fit(self)
        seen["after"] = dict(self.task.model.named_parameters())
        seen["scale"] = self.accelerator.scaler.get_scale()
        return result

    monkeypatch.setattr(train.Trainer, "fit", fit)
    params = tiny_params(epochs=1, max_steps_per_epoch=2)
    metrics = run_baseline(params, progress=False)  # no TrainingError
    assert metrics["status"] == "finished"
    assert all(torch.equal(seen["after"][n], v) for n, v in seen["before"].items())
    assert seen["scale"] == pytest.approx(scale * 0.5**2)
    state = torch.load(f"{params.run_dir}/state/last.pt", weights_only=False)
    assert state["scaler"]["scale"] == pytest.approx(scale * 0.5**2)


def _gpu_check(tmp_path, extra_env: dict, *args: str):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **extra_env}
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--work", str(tmp_path / "work"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_a_machine_without_gpu(tmp_path):
    done = _gpu_check(tmp_path, {"GPU_CHECK_ALLOW_CPU": "0"})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "no CUDA device is visible" in done.stderr and "GPU_CHECK_ALLOW_CPU=1" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on a GPU run the script itself")
def test_gpu_check_dry_run_on_cpu_writes_every_figure(tmp_path):
    import json

    env = {"GPU_CHECK_ALLOW_CPU": "1", "SIZE": "atto", "IMAGE_SIZE": "160", "EPOCHS": "2", "TRAIN_IMAGES": "8"}
    done = _gpu_check(tmp_path, {**env, "VAL_IMAGES": "4", "BATCH": "4", "AMP": "no"}, "--inference-iters", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["status"] == "finished"
    assert result["settings"]["loader"] == {"num_workers": 0, "pin_memory": False}
    for phase, key in (("phase1", "train"), ("phase2", "train_stage_b")):
        train = result[phase][key]
        assert train["images_per_epoch"] == 8 and len(train["epoch_seconds"]) == 2, train
        assert train["steady_images_per_s"] > 0 and 0 <= result[phase]["map"] <= 1
    assert result["inference"]["float32"]["images_per_s"] > 0 and "no" not in result["inference"]
    assert "phase 1 training" in done.stdout and "inference float32" in done.stdout


def test_judging_and_repredicting_use_the_runs_device_or_fall_back():
    """Evaluation after training (the test judgement, `evaluate`, the ablation statistics, WiSE-FT) follows the run's
    `device`; a device this machine lacks (a GPU run judged on a laptop) falls back to `auto` instead of failing."""
    from tfg_mm.config import Params
    from tfg_mm.training.judge import evaluation_device

    assert evaluation_device(Params(device="cpu")) == torch.device("cpu")
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    assert evaluation_device(Params(device=missing)) == resolve_device("auto")
