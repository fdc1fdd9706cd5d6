import pytest
import torch

from vllm_surgery.spectral import lora_factors, lora_svd


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(64, 48, 8), (17, 300, 16), (1536, 576, 16), (5, 7, 5)])
def test_thin_svd_reconstructs_product(d_out, d_in, r):
    g = torch.Generator().manual_seed(d_out + d_in + r)
    a = torch.randn(r, d_in, generator=g) * 0.1
    b = torch.randn(d_out, r, generator=g) * 0.1
    s = lora_svd(a, b)
    assert s.U.shape == (d_out, r) and s.V.shape == (d_in, r) and s.sigma.shape == (r,)
    assert s.U.dtype == s.V.dtype == s.sigma.dtype == torch.float32
    ref = b.double() @ a.double()
    got = s.U.double() @ torch.diag(s.sigma.double()) @ s.V.double().T
    assert torch.allclose(got, ref, atol=1e-6 * ref.abs().max().item(), rtol=0)
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(s.U.double().T @ s.U.double(), eye, atol=1e-5)
    assert torch.allclose(s.V.double().T @ s.V.double(), eye, atol=1e-5)
    assert torch.all(s.sigma[:-1] >= s.sigma[1:]) and torch.all(s.sigma >= 0)
    # the singular values are those of the full product
    assert torch.allclose(s.sigma.double(), torch.linalg.svdvals(ref)[:r], rtol=1e-5, atol=1e-7)


def test_factors_realise_new_singular_values():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 40, generator=g), torch.randn(30, 8, generator=g)
    s = lora_svd(a, b)
    new = s.sigma * torch.linspace(0.5, 1.5, 8)
    a2, b2 = lora_factors(s, new, torch.float32)
    assert a2.shape == a.shape and b2.shape == b.shape
    expected = s.U.double() @ torch.diag(new.double()) @ s.V.double().T
    assert torch.allclose((b2.double() @ a2.double()), expected, atol=1e-5)
    # unchanged singular values give back the same update (factors may differ by a rotation)
    a3, b3 = lora_factors(s, s.sigma, torch.float32)
    assert torch.allclose(b3 @ a3, b @ a, atol=1e-4)


def test_bf16_factors_keep_dtype_and_rank_deficient_input():
    a = torch.zeros(4, 10, dtype=torch.bfloat16)
    b = torch.randn(6, 4).to(torch.bfloat16)
    s = lora_svd(a, b)
    assert torch.allclose(s.sigma, torch.zeros(4))
    a2, b2 = lora_factors(s, s.sigma, torch.bfloat16)
    assert a2.dtype == b2.dtype == torch.bfloat16
    assert torch.count_nonzero(b2 @ a2) == 0


def test_rejects_mismatched_pair():
    with pytest.raises(ValueError, match="not a LoRA pair"):
        lora_svd(torch.zeros(4, 10), torch.zeros(6, 5))
