"""What this machine does fast: the one place CPU features are read.

``amp="auto"`` (training and attribution) means bf16 autocast only where bf16 is *native*. On a CPU
that is AMX-BF16 or AVX512-BF16; elsewhere oneDNN emulates bf16 and autocast is far slower than fp32.
Measured on the project's machines (ResNet-18 training step, 224 px, batch 16, 2 cores, torch 2.14):

* Intel Xeon with AMX-BF16: bf16 autocast + channels-last 43-49 img/s vs fp32 NCHW 16-18 (x2.7);
* AMD EPYC with AVX-512 and AVX512-BF16 (160 px, batch 32): bf16 autocast + channels-last 121-127
  img/s vs fp32 NCHW 44-47 (x2.7);
* AMD EPYC with AVX2 only (no AVX-512): bf16 autocast 0.6 img/s vs fp32 7.8 img/s (x0.08).

A run's numbers depend on which precision it trained in (bf16 and fp32 take different trajectories),
so ``tbkd run`` records :func:`cpu_model` and the precision in ``report.json``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["bf16_is_native", "cpu_has_native_bf16", "cpu_features", "cpu_model"]

_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AMX-BF16 or AVX512-BF16).

    Asks torch first (``torch.cpu._is_amx_tile_supported`` / ``_is_avx512_bf16_supported``, private
    but present since 2.1); where those are missing, reads the CPU flags from ``/proc/cpuinfo``.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    probes = [p for p in probes if callable(p)]
    if probes:
        try:
            return any(bool(p()) for p in probes)
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to be native"
            pass
    return any(flag in cpu_features() for flag in _BF16_FLAGS)


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU that supports it, or a CPU with
    :func:`cpu_has_native_bf16`. The one rule behind ``amp="auto"`` in training
    (:func:`tbkd_lib.train.amp_dtype`) and attribution (:func:`tbkd_lib.localize.amp_dtype_for`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()  # emulated bf16 is slower than fp32


def _cpuinfo(key: str) -> str | None:
    """The value of the first ``key`` line of ``/proc/cpuinfo`` (None where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The CPU flags of ``/proc/cpuinfo`` (empty where it cannot be read, e.g. not Linux)."""
    return frozenset((_cpuinfo("flags") or "").split())


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform.processor()`` or the machine type)."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()
