"""Thin SVD of a LoRA update and its inverse, without ever forming the d_out x d_in matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spectrum:
    """`B @ A == U @ diag(sigma) @ V.T`, float32; U is (d_out, r), V is (d_in, r), sigma descending."""

    U: torch.Tensor
    sigma: torch.Tensor
    V: torch.Tensor

    def to(self, device: torch.device | str) -> Spectrum:
        return Spectrum(self.U.to(device), self.sigma.to(device), self.V.to(device))


def lora_svd(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Spectrum:
    """SVD of `B @ A` through QR of each factor: O((d_in + d_out) r^2) instead of O(d_in d_out r).

    B = Qb Rb and A^T = Qa Ra give B A = Qb (Rb Ra^T) Qa^T, so only the r x r core needs an SVD.
    The core is decomposed in float64 (it is tiny) to keep the result at float32 precision.
    """
    a = lora_a.detach().to(torch.float32)
    b = lora_b.detach().to(torch.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a LoRA pair")
    qb, rb = torch.linalg.qr(b)  # (d_out, r), (r, r)
    qa, ra = torch.linalg.qr(a.T)  # (d_in, r), (r, r)
    core = rb.double() @ ra.double().T
    um, sigma, vmh = torch.linalg.svd(core, full_matrices=False)
    u = qb @ um.to(torch.float32)
    v = qa @ vmh.T.to(torch.float32)
    return Spectrum(U=u, sigma=sigma.to(torch.float32), V=v)


def lora_factors(
    spectrum: Spectrum, sigma: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA factors for new singular values: A' = diag(sqrt s) V^T, B' = U diag(sqrt s).

    Splitting sqrt(sigma) evenly keeps A' and B' on the same scale, as trained factors are.
    """
    root = sigma.detach().to(torch.float32).clamp_min(0).sqrt()
    lora_a = (root[:, None] * spectrum.V.T).to(dtype)
    lora_b = (spectrum.U * root[None, :]).to(dtype)
    return lora_a.contiguous(), lora_b.contiguous()
