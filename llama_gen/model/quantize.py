"""Weight-only int8 (`--quantize int8`): symmetric, one scale per output row, quantized as the
checkpoint loads, slice by slice.

A weight row w becomes q = round(w / s) in int8 with s = max|w| / 127 over the whole row, so
|w - q s| <= s / 2 element by element. The scale is taken over the whole row before any
model-parallel split: a column-parallel layer holds whole rows, and a row-parallel layer's
ranks agree on each row's maximum (`RowParallelLinear.row_absmax`), so every model-parallel
size quantizes to the same numbers. The int8 layers are ours (`layers.py`, their product
`kernels.int8_linear`), not torchao's, whose int8 path swaps only `nn.Linear`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

INT8_MAX = 127
# What --quantize int8 stores in int8: every block's linear layers; with --quantize_head the
# output head too. (`ParallelLayers` builds them so; `engine.memory` counts them by these.)
BLOCK_LAYERS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
HEAD = "output"


def quantized_key(key: str, quantize_head: bool) -> bool:
    """Whether --quantize int8 stores the checkpoint's weight `key` in int8."""
    layer = key.removesuffix(".weight")
    return layer.endswith(BLOCK_LAYERS) if layer.startswith("layers.") else (
        quantize_head and layer == HEAD)


def quantize_rows(weight: torch.Tensor, row_absmax: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scales in `dtype`) for `weight` (out, in) with each row's max|w| over the
    whole row (`row_absmax`, which may come from more columns than `weight` holds).

    The scale is rounded to `dtype` before dividing, so q * scale is what the product computes.
    bf16 rounds a scale by at most 2^-9 of itself, so |w| / scale stays under 127.5 and round()
    never passes 127: the clamp only guards. A scale is at least the dtype's smallest normal
    number (fp16: 6.1e-5, so rows whose max|w| is under 0.0078 round coarser, within the same
    bound), and an all-zero row is zeros."""
    scales = (row_absmax.float() / INT8_MAX).clamp_min(torch.finfo(dtype).tiny).to(dtype)
    quantized = weight.to(torch.float32, copy=True).div_(scales.float()[:, None]).round_()
    return quantized.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def dequantize(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 one stands for, exactly (a 7-bit integer times a 16-bit
    scale fits float32's mantissa); for tests and checks, never on the hot path."""
    return weight.float() * scales.float()[:, None]


def int8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's int8 layers by their weight's key: those built with scales."""
    return {f"{name}.weight": module for name, module in model.named_modules()
            if getattr(module, "scales", None) is not None}


def quantized_state(model: nn.Module, slices: Iterable[tuple[str, torch.Tensor]],
                    device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict for `model` from this rank's checkpoint slices, one at a time: the int8
    layers' weights quantized on `device` (with their `scales`), the others cast to `dtype`.
    Each full-precision slice is dropped once quantized, so no more than one is ever whole.
    Every rank of a model-parallel group must call this with the same keys in the same order
    (a row-parallel layer's maximum is a collective)."""
    layers = int8_layers(model)
    return dict(_loaded(layers, slices, device, dtype))


def _loaded(layers: dict[str, nn.Module], slices: Iterable[tuple[str, torch.Tensor]],
            device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in slices:
        layer = layers.get(key)
        if layer is None:
            yield key, tensor.to(device=device, dtype=dtype)
            continue
        weight = tensor.to(device=device)  # in the checkpoint's dtype: no float32 copy yet
        quantized, scales = quantize_rows(weight, layer.row_absmax(weight), dtype)
        del weight
        yield key, quantized
        yield key.removesuffix("weight") + "scales", scales
