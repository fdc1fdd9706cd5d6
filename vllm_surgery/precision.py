"""Which floating-point precision each part of a pass runs in, and the float32 logits that make it exact.

The decoder runs in the device's fast 16-bit type (bf16 autocast on CUDA, fp16 on GPUs without bf16,
exact float32 on CPU). Three things stay float32 whatever the device, because the surgery depends on
differences smaller than 16-bit rounding: a bf16 sigma moves in 0.4% steps, as large as the default 0.5%
acceptance margin, and bf16 logits are off by up to 0.4% of their size before the loss.

- the spectral path of every edited module (x @ V -> * sigma -> @ U^T: r numbers per token), see
  adapted_model;
- the answer-position logits, computed from 16-bit operands with a float32 result (`float32_linear`);
- the loss.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch
import torch.nn.functional as F

# Largest |ours - model's own| logit difference accepted by the self-check, relative to the largest logit:
# 16-bit rounding of the model's own logits (2^-8 for bf16, 2^-11 for fp16) with a margin; float32 only
# differs in summation order.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype the decoder runs in on `device`: bf16 on CUDA where supported, else fp16; float32 on CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            return (
                torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
            )
    return torch.float32


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `compute_dtype(device)` on CUDA (tensor cores); exact float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=compute_dtype(device))
    return contextlib.nullcontext()


def active_dtype(reference: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `reference`'s device produce right now: the autocast dtype if it is on."""
    device = reference.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return reference.dtype


@lru_cache(maxsize=8)
def _has_float32_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=float32) runs for 16-bit operands on this device (CUDA, torch>=2.9)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class _Float32Linear(torch.autograd.Function):
    """x @ W^T (+ b) from 16-bit operands with float32 accumulation AND a float32 result.

    The backward pass gives the input gradient in the input's dtype, as a 16-bit linear layer would; the
    weight never gets a gradient (no parameter of the model requires one).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        out = torch.mm(flat, weight.T, out_dtype=torch.float32)
        if bias is not None:
            out = out + bias.float()
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        grad_x = grad.to(weight.dtype) @ weight
        return grad_x.to(ctx.x_dtype), None, None


def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with a float32 result, whatever autocast or the operands' dtypes say.

    float32 operands: plain F.linear with autocast off (exact). 16-bit operands on CUDA: one 16-bit
    matmul with a float32 result (no 16-bit rounding of the output). Elsewhere: float32 copies.
    """
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype == weight.dtype == torch.float32:
            return F.linear(x, weight, bias)
        if weight.dtype in (torch.float16, torch.bfloat16) and _has_float32_mm(x.device.type, weight.dtype):
            return _Float32Linear.apply(x, weight, bias)
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
