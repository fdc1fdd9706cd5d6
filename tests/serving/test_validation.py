"""The one servability check (resolve, swap, listing, runtime load) on real adapter files, no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from bad_adapters import copy_adapter, narrow_first_lora_a, scaled

from vllm_surgery.base_model import base_layer_shapes
from vllm_surgery.errors import AdapterError
from vllm_surgery.serving import validation
from vllm_surgery.serving.validation import AdapterValidator, ServingLimits, check_contained
from vllm_surgery.testing import build_lora_adapter


@pytest.fixture(scope="module")
def limits(tiny_base: Path) -> ServingLimits:
    return ServingLimits(max_rank=8, dtype=torch.float16, shapes=base_layer_shapes(tiny_base))


def test_a_trained_like_adapter_passes_every_check(tiny_adapter: Path, limits: ServingLimits) -> None:
    from vllm_surgery.adapter import load_adapter

    assert AdapterValidator(limits).validate(tiny_adapter) == load_adapter(tiny_adapter).content_hash()


def test_shapes_that_fit_the_rank_but_not_the_base_model(tmp_path, tiny_adapter, limits) -> None:
    wide = copy_adapter(tiny_adapter, tmp_path / "wide", narrow_first_lora_a(48))  # base: 64 or 128 wide
    with pytest.raises(
        AdapterError,
        match=r"lora_A \(8, 48\).* map 48 -> 64 features, but the base model's linear layer maps 128 -> 64",
    ):
        AdapterValidator(limits).validate(wide)
    AdapterValidator(ServingLimits()).validate(wide)  # without the base model's shapes, nothing to compare


def test_rank_above_the_servers_max(tmp_path, tiny_base, limits) -> None:
    big = build_lora_adapter(tiny_base, tmp_path / "r16", r=16, alpha=32)
    with pytest.raises(AdapterError, match=r"rank 16 .* exceeds this server's --max-lora-rank 8"):
        AdapterValidator(limits).validate(big)
    AdapterValidator(ServingLimits(max_rank=16)).validate(big)


@pytest.mark.parametrize(
    ("factor", "dtype", "needle"),
    [
        (1e30, torch.float32, "overflows torch.float32"),  # finite in float32; the product is not
        (1e6, torch.float16, "beyond torch.float16's largest finite value"),  # a tensor itself overflows
        (300.0, torch.float16, "overflows torch.float16"),  # tensors fit float16, the update does not
    ],
)
def test_weights_that_overflow_the_serving_dtype(tmp_path, tiny_adapter, factor, dtype, needle) -> None:
    huge = copy_adapter(tiny_adapter, tmp_path / "huge", scaled(factor))
    with pytest.raises(AdapterError, match=needle):
        AdapterValidator(ServingLimits(dtype=dtype)).validate(huge)


def test_overflow_bound_is_what_the_comment_says(tmp_path, tiny_adapter) -> None:
    """sigma_max(s B A) * sqrt(in) * 100 against finfo.max, computed here independently by a full SVD."""
    from vllm_surgery.adapter import load_adapter

    adapter = load_adapter(tiny_adapter)
    worst = 0.0
    for mod in adapter.modules.values():
        a, b = adapter.lora_a(mod.name).double(), adapter.lora_b(mod.name).double()
        update = mod.scaling * b @ a
        sigma = max(torch.linalg.svdvals(update)[0].item(), torch.linalg.svdvals(a)[0].item())
        worst = max(worst, sigma * mod.in_features**0.5 * validation.ACTIVATION_RMS_BOUND)
    limit = torch.finfo(torch.float16).max
    # Scale every tensor by f: the update scales by f^2. Just below and just above the bound:
    below = copy_adapter(tiny_adapter, tmp_path / "below", scaled((0.9 * limit / worst) ** 0.5))
    above = copy_adapter(tiny_adapter, tmp_path / "above", scaled((1.1 * limit / worst) ** 0.5))
    checker = AdapterValidator(ServingLimits(dtype=torch.float16))
    checker.validate(below)
    with pytest.raises(AdapterError, match=r"overflows torch\.float16"):
        checker.validate(above)


def test_verdicts_are_cached_until_the_files_change(tmp_path, tiny_adapter, limits, monkeypatch) -> None:
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    calls: list[Path] = []
    real = validation.load_adapter

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(validation, "load_adapter", counting)
    checker = AdapterValidator(limits)
    first = checker.validate(adapter)
    assert checker.validate(adapter) == first and len(calls) == 1
    copy_adapter(tiny_adapter, tmp_path / "wide", narrow_first_lora_a(48))
    os.replace(tmp_path / "wide" / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    for _ in range(2):  # a refusal is cached too, with the same message
        with pytest.raises(AdapterError, match="48"):
            checker.validate(adapter)
    assert len(calls) == 2


def test_links_out_of_the_store_are_refused(tmp_path, tiny_adapter) -> None:
    store = tmp_path / "store" / "x"
    store.mkdir(parents=True)
    outside = copy_adapter(tiny_adapter, tmp_path / "outside")
    os.symlink(outside, store / "linked")
    with pytest.raises(AdapterError, match="outside"):
        check_contained(store / "linked", store)
    inside = copy_adapter(tiny_adapter, store / "v1")
    (inside / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", inside / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"a link to .* outside the version directory"):
        AdapterValidator().validate(inside, inside=store)
    assert check_contained(copy_adapter(tiny_adapter, store / "v2"), store) == (store / "v2").resolve()
