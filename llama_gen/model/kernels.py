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
