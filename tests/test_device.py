"""pmodel.device: RNG state, peak memory and synchronize per device type.

CPU is tested for real; CUDA and NPU routing is tested with stand-in ``torch.<type>`` modules
that record their calls (the real ones need the hardware; the GPU session covers CUDA).
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from pmodel import device as dev
from pmodel.checkpoint import state as ckpt


def test_cpu_rng_state_round_trip():
    s = dev.rng_state("cpu")
    a = torch.rand(5)
    dev.set_rng_state(s, torch.device("cpu"))
    assert torch.equal(torch.rand(5), a)


def test_cpu_synchronize_is_a_no_op():
    dev.synchronize("cpu")
    dev.synchronize(torch.device("cpu"))


def test_cpu_peak_memory_is_the_process_high_water_mark():
    assert dev.peak_memory_bytes("cpu") > 0
    try:
        dev.reset_peak_memory("cpu")
    except RuntimeError as e:  # kernels without /proc/self/clear_refs refuse instead of ignoring
        assert "cannot reset" in str(e)
        pytest.skip(str(e))
    start = dev.peak_memory_bytes("cpu")  # about the current resident set after the reset
    x = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    high = dev.peak_memory_bytes(torch.device("cpu"))
    assert high >= start + 32 * 2**20, (start, high)
    del x
    dev.reset_peak_memory("cpu")
    assert dev.peak_memory_bytes("cpu") < high  # a new window forgets the freed 64 MiB


class _FakeAccelerator(types.ModuleType):
    """A ``torch.<type>`` module stand-in with the shared RNG / memory calling convention."""

    def __init__(self, name):
        super().__init__(name)
        self.calls = []
        self.state = torch.arange(8, dtype=torch.uint8)

    def synchronize(self, device=None):
        self.calls.append(("synchronize", device))

    def max_memory_allocated(self, device=None):
        self.calls.append(("max_memory_allocated", device))
        return 1234.0

    def reset_peak_memory_stats(self, device=None):
        self.calls.append(("reset_peak_memory_stats", device))

    def get_rng_state(self, device="cuda"):
        self.calls.append(("get_rng_state", device))
        return self.state.clone()

    def set_rng_state(self, new_state, device="cuda"):
        self.calls.append(("set_rng_state", device))
        self.state = new_state.clone()


@pytest.fixture
def fake_hpu(monkeypatch):
    # any device type torch knows (hpu here, npu once torch_npu renamed privateuse1) is served
    # by its torch.<type> module
    mod = _FakeAccelerator("torch.hpu")
    monkeypatch.setattr(torch, "hpu", mod, raising=False)
    return mod


@pytest.fixture
def fake_cuda(monkeypatch):
    mod = _FakeAccelerator("torch.cuda")
    for name in ("synchronize", "max_memory_allocated", "reset_peak_memory_stats", "get_rng_state",
                 "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, getattr(mod, name))
    return mod


@pytest.mark.parametrize("kind", ["hpu", "cuda"])
def test_accelerators_route_to_their_torch_module(kind, request):
    mod = request.getfixturevalue(f"fake_{kind}")
    d = torch.device(kind, 1)
    dev.synchronize(d)
    assert dev.peak_memory_bytes(d) == 1234 and isinstance(dev.peak_memory_bytes(d), int)
    dev.reset_peak_memory(f"{kind}:1")
    s = dev.rng_state(d)
    dev.set_rng_state(s + 1, d)
    assert torch.equal(mod.state, s + 1)
    assert [c for c, _ in mod.calls] == ["synchronize", "max_memory_allocated", "max_memory_allocated",
                                         "reset_peak_memory_stats", "get_rng_state", "set_rng_state"]
    assert all(torch.device(x) == d for _, x in mod.calls)


def test_device_types_without_a_module_refuse_with_the_reason():
    with pytest.raises(RuntimeError, match=r"unknown device 'npu:0' \(import torch_npu first\)"):
        dev.rng_state("npu:0")
    with pytest.raises(RuntimeError, match="no torch.meta device module"):
        dev.peak_memory_bytes("meta")


# torch_npu renames torch's privateuse1 backend to "npu" and installs torch.npu; that rename is
# process-wide and permanent, so the NPU path runs in a fresh interpreter.
_NPU = r"""
import sys, types, torch
sys.path.insert(0, sys.argv[1])
from test_device import _FakeAccelerator
torch.utils.rename_privateuse1_backend("npu")
torch.npu = fake = _FakeAccelerator("torch.npu")
from pmodel import device as dev
from pmodel.checkpoint import state as ckpt
d = torch.device("npu", 0)
dev.synchronize(d)
assert dev.peak_memory_bytes("npu:0") == 1234
tensors, meta = ckpt.capture_rng(d)
assert set(tensors) == {"torch_cpu", "torch_npu"} and torch.equal(tensors["torch_npu"], fake.state)
fake.state = torch.zeros(8, dtype=torch.uint8)
ckpt.restore_rng(tensors, meta, "cpu")          # a CPU-only restore leaves the NPU generator alone
assert not fake.state.any()
ckpt.restore_rng(tensors, meta, d)
assert torch.equal(fake.state, torch.arange(8, dtype=torch.uint8))
assert [c for c, _ in fake.calls] == ["synchronize", "max_memory_allocated", "get_rng_state", "set_rng_state"]
print("ok")
"""


def test_npu_routes_to_torch_npu_and_checkpoints_keep_its_generator():
    import subprocess
    import sys
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", _NPU, str(Path(__file__).parent)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_checkpoint_rng_capture_keeps_the_accelerator_generator(fake_cuda):
    tensors, meta = ckpt.capture_rng(torch.device("cuda", 0))
    assert set(tensors) == {"torch_cpu", "torch_cuda"} and torch.equal(tensors["torch_cuda"], fake_cuda.state)
    fake_cuda.state = torch.zeros(8, dtype=torch.uint8)
    ckpt.restore_rng(tensors, meta, torch.device("cuda", 0))
    assert torch.equal(fake_cuda.state, torch.arange(8, dtype=torch.uint8))
    assert set(ckpt.capture_rng("cpu")[0]) == {"torch_cpu"}
