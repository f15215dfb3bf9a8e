"""Host values onto the device without waiting for it."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype = torch.long
              ) -> torch.Tensor:
    """A tensor of `values` (numbers, or equal-length lists of them) on `device`. To a GPU it
    goes from pinned host memory, `non_blocking`: a copy from pageable memory would wait for the
    device. The caching host allocator keeps the pinned buffer until the copy has run, so the
    caller goes on at once."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
