"""Matrix products for the layers, where torch's default kernel is not the fastest on the CPU.

Measured speeds are in docs/benchmarks.md; these docstrings keep the reasons."""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. On the CPU computed as (weight @ x.T).T: with torch 2.13's CPU kernels,
    F.linear is several times slower for the few rows of a decode step. The result is then a
    transposed view, which every operation takes as it takes a contiguous tensor: the layers
    feed it to the next product or element-wise operation, and reading it in place saves a
    copy per product; the model makes its logits contiguous for sampling."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    return (weight @ rows.T).T.view(*x.shape[:-1], weight.shape[0])


class PackedWeight:
    """oneDNN's blocked copy of a CPU float32 weight, made on first use and again whenever the
    weight is replaced, moved or written in place (writes through `.data` are not seen). For a
    wide, shallow product such as the output head (vocabulary x dim) it is faster than
    `linear`, with the weights cold. For the layers' smaller weights it is slower, so only the
    head uses it. It holds a second copy of the weight."""

    ROWS_HINT = 32  # the row count oneDNN picks its blocking for; any count works

    def __init__(self):
        self._source: weakref.ref | None = None  # the weight packed
        self._state: tuple | None = None  # its storage, dtype and version then
        self._packed: torch.Tensor | None = None
        # Off without oneDNN, or once torch's internal ops failed (a release changed them).
        self.enabled = torch.backends.mkldnn.is_available()

    def usable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Eager CPU float32 only: torch.compile cannot trace the repacking bookkeeping."""
        return (self.enabled and x.device.type == "cpu" and weight.dtype == torch.float32
                and not torch.compiler.is_compiling())

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T, contiguous."""
        try:
            state = (weight.data_ptr(), weight.dtype,
                     None if weight.is_inference() else weight._version)  # no version there
            if self._source is None or self._source() is not weight or self._state != state:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                       self.ROWS_HINT)
                self._source, self._state = weakref.ref(weight), state
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        except (AttributeError, RuntimeError) as e:
            log.warning("oneDNN's packed linear failed (%s: %s); using the plain product",
                        type(e).__name__, e)
            self.enabled = False
            return linear(x, weight)


# How `int8_linear` multiplies, as measured on the CPU (torch 2.13, 2 cores; a 7B's w1 at 1 and
# 32 rows, scripts/bench_int8.py): in bf16 torch's int8 kernel, 2.3 and 35 ms, where bf16's own
# product takes 4.6 and 145 ms; in float32 the kernel takes 23 and 754 ms and dequantized row
# blocks 6.7 and 39 ms (float32's own product: 7.7 and 28 ms), so float32 takes the blocks.
# CUDA's kernel (in recent torch only) computes one output per thread on CUDA cores, and some
# releases return float32 whatever the input: eagerly a GPU takes dequantized blocks on its
# tensor cores, and a compiled step the pattern inductor fuses (unmeasured: gpu_check.sh's int8
# phase and tests/test_cuda.py's int8 cases are to tell).
DEQUANTIZED_BLOCK_ELEMENTS = 2**22  # at most this much of a weight in full precision at once


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T for an int8 `weight` (out, in) with one scale per output
    row, in x's dtype, without a full-precision copy of the weight: torch's kernel
    (`torch._weight_int8pack_mm`) or blocks of dequantized rows, whichever is faster (see
    above); compiled on a GPU, the pattern inductor fuses (it casts inside its product, or
    lowers the pattern to the same kernel)."""
    rows = x.reshape(-1, x.shape[-1])
    shape = (*x.shape[:-1], weight.shape[0])
    cpu = x.device.type == "cpu"
    if torch.compiler.is_compiling() and not cpu:
        return F.linear(x, weight.to(x.dtype)) * scales
    if cpu and x.dtype != torch.float32 and "cpu" in INT8_KERNEL_DEVICES:
        return torch._weight_int8pack_mm(rows.contiguous(), weight, scales).view(shape)
    return dequantized_blocks_linear(rows, weight, scales).view(shape)


def dequantized_blocks_linear(rows: torch.Tensor, weight: torch.Tensor,
                              scales: torch.Tensor) -> torch.Tensor:
    """`int8_linear` of 2-D `rows` by blocks of the weight's rows, each dequantized to the
    rows' dtype for one full-precision product: the weight is never whole in full precision."""
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    step = max(1, DEQUANTIZED_BLOCK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        block = slice(start, start + step)
        torch.mul(F.linear(rows, weight[block].to(rows.dtype)), scales[block],
                  out=out[:, block])
    return out


# The device types this torch has `_weight_int8pack_mm` for (CUDA only in recent ones), looked
# up once: a compiled step cannot ask the dispatcher.
INT8_KERNEL_DEVICES = frozenset(
    device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("mps", "MPS"))
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", key))
