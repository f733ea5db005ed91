"""Device bookkeeping for the loop and checkpoints: RNG state, peak memory, synchronize.

One function per question, for every device type: ``cpu`` answers from the process (the CPU
generator, the process's peak resident set), an accelerator from its ``torch.<type>`` module
(``torch.cuda``; ``torch.npu``, which exists once torch_npu is imported; ``torch.xpu``, ...),
whose RNG and memory functions share one calling convention. Besides the CUDA kernels in
:mod:`pmodel.ops.cuda`, this is the only module of the library that touches ``torch.cuda``.
"""
from __future__ import annotations

import random
import resource
import sys
import types

import numpy as np
import torch

__all__ = ["synchronize", "peak_memory_bytes", "reset_peak_memory", "rng_state", "set_rng_state",
           "set_deterministic"]

DeviceLike = torch.device | str


def _hint(kind: str) -> str:
    return " (import torch_npu first)" if kind == "npu" else ""


def _device(device: DeviceLike) -> torch.device:
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except RuntimeError as e:  # "npu" is a device type only once torch_npu has registered it
        raise RuntimeError(f"unknown device {device!r}{_hint(str(device).split(':')[0])}") from e


def _module(device: torch.device) -> types.ModuleType:
    """The ``torch.<type>`` module of an accelerator device."""
    if device.type == "cuda":
        return torch.cuda
    mod = getattr(torch, device.type, None)  # torch.npu appears when torch_npu is imported
    if not isinstance(mod, types.ModuleType) or not hasattr(mod, "get_rng_state"):
        raise RuntimeError(f"device type {device.type!r} has no torch.{device.type} device module"
                           f"{_hint(device.type)}")
    return mod


def synchronize(device: DeviceLike) -> None:
    """Wait for the work queued on ``device`` (CPU ops are synchronous: nothing to wait for)."""
    device = _device(device)
    if device.type != "cpu":
        _module(device).synchronize(device)


def _cpu_peak_bytes() -> int:
    try:
        # VmHWM is this address space's high-water mark; ru_maxrss (the fallback) is carried
        # across fork + exec on Linux, so a process started by a larger one would see its size.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def peak_memory_bytes(device: DeviceLike) -> int:
    """Peak memory so far, in bytes.

    Args:
      device: an accelerator (its caching allocator's peak of allocated bytes since the start or
        the last :func:`reset_peak_memory`) or ``cpu`` (the process's peak resident set size).

    Returns:
      the peak in bytes.
    """
    device = _device(device)
    if device.type == "cpu":
        return _cpu_peak_bytes()
    return int(_module(device).max_memory_allocated(device))


def reset_peak_memory(device: DeviceLike) -> None:
    """Start a new :func:`peak_memory_bytes` window on ``device``.

    On ``cpu`` this resets the process's resident-set high-water mark (Linux
    ``/proc/self/clear_refs``); where the kernel does not offer that, it raises instead of
    leaving the old peak in place.
    """
    device = _device(device)
    if device.type != "cpu":
        _module(device).reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
    except OSError as e:
        raise RuntimeError(f"reset_peak_memory: cannot reset the CPU peak resident set here ({e})") from e


def rng_state(device: DeviceLike) -> torch.Tensor:
    """The state of ``device``'s default random generator (a CPU ``uint8`` tensor)."""
    device = _device(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    return _module(device).get_rng_state(device)


def set_rng_state(state: torch.Tensor, device: DeviceLike) -> None:
    """Restore a state returned by :func:`rng_state` for the same device type."""
    device = _device(device)
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        _module(device).set_rng_state(state, device)


def set_deterministic(seed: int, device: DeviceLike) -> None:
    """Deterministic computation in this process (ModelLink's ``--use-deter-comp``).

    Seeds Python's ``random``, NumPy's global generator, torch's CPU generator and ``device``'s
    from ``seed``; makes torch refuse nondeterministic kernels (``torch.use_deterministic_algorithms``,
    which also selects the deterministic variants of scatter / index_add / embedding backward on
    CUDA and NPU); turns cuDNN autotuning off and its deterministic algorithms on.

    What must be set before the device libraries start is the launcher's job, and the script
    does it: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for deterministic cuBLAS on CUDA,
    ``HCCL_DETERMINISTIC=true`` for deterministic HCCL reductions on NPU. Fixed-order
    data-parallel reductions are :func:`pmodel.parallel.parallelize`'s ``deterministic=True``.

    Args:
      seed: the run seed.
      device: the device the run computes on.
    """
    device = _device(device)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type != "cpu":
        _module(device).manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
