"""FLOP counting and model-FLOP utilisation (MFU), so speed figures compare across machines.

A wall time on a shared laptop or an unfamiliar GPU says little by itself. Each benchmark therefore
reports the FLOP/s it achieved as a fraction of the peak matmul FLOP/s measured *in the same
process on the same device and dtype* (`peak_matmul_flops`): the machine's load and clock affect
both alike. FLOPs are counted by torch's own `FlopCounterMode` (matmuls, convolutions and SDPA,
forward and backward), not estimated from a formula, so a change to the model changes the count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU flash kernel SDPA dispatches to here;
# the same formulas apply (two matmuls forward, five backward).
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with the CPU attention kernels counted too."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run `fn()` once under the FLOP counter; returns (total FLOPs, fn's result)."""
    with flop_counter() as counter:
        result = fn()
    return int(counter.get_total_flops()), result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, size: int | None = None,
                      repeats: int = 5, min_seconds: float = 0.2) -> float:
    """Best FLOP/s of a square `size` matmul on `device` in `dtype` (the roofline MFU divides by).

    The best of `repeats` timings, each long enough (`min_seconds`) to be measured reliably, so the
    figure is the machine's attainable peak at this moment, not an average dragged down by noise.
    """
    device = torch.device(device)
    if size is None:
        size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernels chosen, caches filled
    _sync(device)
    flops = 2.0 * size ** 3
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            n += 1
            _sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, n * flops / dt)
    return best


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Achieved FLOP/s over the peak: `flops / seconds / peak` (0 when nothing was timed)."""
    return flops / seconds / peak if seconds > 0 and peak > 0 else 0.0


class StepProfiler:
    """Lightning callback: wall time of every training batch, and the FLOPs of a few of them.

    A batch is timed from `on_train_batch_start` to `on_train_batch_end`, which covers the forward,
    the backward and the optimizer step(s) under automatic and manual optimisation alike (CUDA is
    synchronised at both ends). FLOPs are counted for the batches in `count_batches` (counting
    adds overhead, so those batches are left out of the timings).
    """

    def __init__(self, count_batches: tuple[int, ...] = (1,)):
        self.count_batches = set(count_batches)
        self.times: list[float] = []
        self.flops: list[int] = []
        self._t0 = 0.0
        self._counter: FlopCounterMode | None = None

    # Lightning accepts only Callback subclasses; `as_callback` wraps this object in one.
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        _sync(module.device)
        if batch_idx in self.count_batches:
            self._counter = flop_counter()
            self._counter.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        _sync(module.device)
        dt = time.perf_counter() - self._t0
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops.append(int(self._counter.get_total_flops()))
            self._counter = None
        else:
            self.times.append(dt)


def as_callback(profiler: StepProfiler):
    """`profiler` as a lightning Callback (kept separate so this module imports without lightning)."""
    from lightning.pytorch import Callback

    class _Profiler(Callback):
        def on_train_batch_start(self, *a):
            profiler.on_train_batch_start(*a)

        def on_train_batch_end(self, *a):
            profiler.on_train_batch_end(*a)

    return _Profiler()
