import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_surgery.adapter import load_adapter, module_scaling, save_adapter
from vllm_surgery.errors import AdapterError

O_PROJ = "model.layers.0.self_attn.o_proj"


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def test_loads_standard_peft_adapter(tiny_adapter):
    ad = load_adapter(tiny_adapter)
    assert len(ad.modules) == 2 * 7
    m = ad.modules[O_PROJ]
    assert (m.rank, m.alpha, m.scaling) == (8, 16.0, 2.0)
    assert m.a_key == f"base_model.model.{O_PROJ}.lora_A.weight"
    assert ad.lora_a(O_PROJ).shape == (8, m.in_features) and ad.lora_b(O_PROJ).shape == (m.out_features, 8)


def test_rank_and_alpha_patterns_and_rslora(tiny_base, tmp_path):
    from vllm_surgery.testing import build_lora_adapter

    path = build_lora_adapter(
        tiny_base,
        tmp_path / "a",
        r=8,
        alpha=16,
        rank_pattern={"o_proj": 4},
        alpha_pattern={"layers.1.mlp.down_proj": 3},
        use_rslora=True,
    )
    ad = load_adapter(path)
    assert ad.modules[O_PROJ].rank == 4
    assert ad.modules[O_PROJ].scaling == pytest.approx(16 / 2.0)
    assert ad.modules["model.layers.1.mlp.down_proj"].scaling == pytest.approx(3 / 8**0.5)
    assert ad.modules["model.layers.0.mlp.down_proj"].scaling == pytest.approx(16 / 8**0.5)
    assert module_scaling(16, 32, False) == 2.0


def test_content_hash_is_stable_and_sensitive(tiny_adapter, adapter_copy, tmp_path):
    h = load_adapter(tiny_adapter).content_hash()
    assert h == load_adapter(adapter_copy).content_hash()
    # re-saved with tensors in another order and another base path: same function, same hash
    tensors = load_file(adapter_copy / "adapter_model.safetensors")
    save_file(dict(reversed(list(tensors.items()))), adapter_copy / "adapter_model.safetensors")
    _edit_config(adapter_copy, base_model_name_or_path="/elsewhere")
    assert load_adapter(adapter_copy).content_hash() == h
    _edit_tensors(adapter_copy, lambda t: t[f"base_model.model.{O_PROJ}.lora_B.weight"].mul_(1.001))
    edited = load_adapter(adapter_copy).content_hash()
    assert edited != h
    _edit_config(adapter_copy, lora_alpha=17)  # the scaling changes the function: a new hash
    assert load_adapter(adapter_copy).content_hash() not in (h, edited)


def test_save_copies_untouched_tensors_bit_for_bit_and_config_verbatim(tiny_adapter, tmp_path):
    ad = load_adapter(tiny_adapter)
    key = ad.modules[O_PROJ].a_key
    new = torch.randn_like(ad.tensors[key])
    out = save_adapter(ad, tmp_path / "v1", {key: new}, {"method": "test"})
    assert (out / "adapter_config.json").read_bytes() == (tiny_adapter / "adapter_config.json").read_bytes()
    assert json.loads((out / "surgery.json").read_text()) == {"method": "test"}
    with (
        safe_open(out / "adapter_model.safetensors", "pt") as f,
        safe_open(tiny_adapter / "adapter_model.safetensors", "pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())
        assert f.metadata() == g.metadata()
        for k in g.keys():  # noqa: SIM118
            if k == key:
                assert torch.equal(f.get_tensor(k), new)
            else:
                assert f.get_tensor(k).numpy().tobytes() == g.get_tensor(k).numpy().tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_save_never_overwrites_and_leaves_nothing_on_failure(tiny_adapter, tmp_path):
    ad = load_adapter(tiny_adapter)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(ad, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    key = ad.modules[O_PROJ].a_key
    with pytest.raises(AdapterError, match="has shape"):
        save_adapter(ad, tmp_path / "bad", {key: torch.zeros(3, 3)})
    # a failure in the middle of writing (unserialisable provenance) leaves no directory behind
    with pytest.raises(TypeError):
        save_adapter(ad, tmp_path / "half", None, {"x": object.__new__(type("T", (), {"__str__": None}))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _corrupt(kind, path):
    a_key = f"base_model.model.{O_PROJ}.lora_A.weight"
    b_key = f"base_model.model.{O_PROJ}.lora_B.weight"
    if kind == "no_config":
        os.remove(path / "adapter_config.json")
    elif kind == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
    elif kind == "no_r":
        _edit_config(path, r=None)
    elif kind == "no_alpha":
        _edit_config(path, lora_alpha=None)
    elif kind == "no_targets":
        _edit_config(path, target_modules=None)
    elif kind == "ia3":
        _edit_config(path, peft_type="IA3")
    elif kind == "dora":
        _edit_config(path, use_dora=True)
    elif kind == "bias":
        _edit_config(path, bias="all")
    elif kind == "pissa":
        _edit_config(path, init_lora_weights="pissa_niter_4")
    elif kind == "pickle":
        torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
        os.remove(path / "adapter_model.safetensors")
    elif kind == "no_weights":
        os.remove(path / "adapter_model.safetensors")
    elif kind == "truncated":
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "orphan_a":
        _edit_tensors(path, lambda t: t.pop(b_key))
    elif kind == "orphan_b":
        _edit_tensors(path, lambda t: t.pop(a_key))
    elif kind == "rank":
        _edit_tensors(path, lambda t: t.update({a_key: t[a_key][:4].clone(), b_key: t[b_key][:, :4].clone()}))
    elif kind == "nan":
        _edit_tensors(path, lambda t: t[b_key].__setitem__((0, 0), float("nan")))
    elif kind == "inf":
        _edit_tensors(path, lambda t: t[a_key].__setitem__((0, 0), float("inf")))
    elif kind == "magnitude":
        _edit_tensors(
            path, lambda t: t.update({f"base_model.model.{O_PROJ}.lora_magnitude_vector": torch.ones(3)})
        )
    elif kind == "conv":
        _edit_tensors(path, lambda t: t.update({a_key: t[a_key][:, :, None, None].clone()}))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no_config", "adapter_config.json: missing"),
        ("bad_json", "not valid JSON"),
        ("no_r", "missing field 'r'"),
        ("no_alpha", "missing field 'lora_alpha'"),
        ("no_targets", "missing field 'target_modules'"),
        ("ia3", "only LORA adapters"),
        ("dora", "DoRA"),
        ("bias", "biases"),
        ("pissa", "rewrites the base weights"),
        ("pickle", "refusing to unpickle"),
        ("no_weights", "adapter_model.safetensors: missing"),
        ("truncated", "cannot be read as safetensors"),
        ("orphan_a", f"{O_PROJ}.lora_A.weight' has no matching lora_B"),
        ("orphan_b", f"{O_PROJ}.lora_B.weight' has no matching lora_A"),
        ("rank", "inconsistent with rank r=8"),
        ("nan", f"{O_PROJ}.lora_B.weight' contains NaN or Inf"),
        ("inf", f"{O_PROJ}.lora_A.weight' contains NaN or Inf"),
        ("magnitude", "DoRA magnitude"),
        ("conv", r"only linear \(2-D\)"),
    ],
)
def test_bad_adapters_get_clear_errors(adapter_copy, kind, message):
    _corrupt(kind, adapter_copy)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(adapter_copy)
    assert str(adapter_copy) in str(info.value)  # the error names the file


def test_not_a_directory(tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        load_adapter(tmp_path / "nope")


def test_save_refuses_non_finite_tensors_and_leaves_nothing(tiny_adapter, tmp_path):
    ad = load_adapter(tiny_adapter)
    key = ad.modules[O_PROJ].b_key
    bad = ad.tensors[key].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AdapterError) as info:
        save_adapter(ad, tmp_path / "v1", {key: bad}, {"method": "test"})
    assert str(info.value) == (
        f"{tmp_path / 'v1' / 'adapter_model.safetensors'}: tensor {key!r} would be written with NaN or Inf "
        "values; nothing was written"
    )
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_values_that_overflow_the_adapter_dtype(adapter_copy, tmp_path):
    """A float32 replacement finite as computed can overflow a float16 adapter when cast."""
    _edit_tensors(adapter_copy, lambda t: t.update({k: v.half() for k, v in t.items()}))
    ad = load_adapter(adapter_copy)
    key = ad.modules[O_PROJ].a_key
    big = torch.full(ad.tensors[key].shape, 1e6)  # float16 tops out at 65504
    with pytest.raises(AdapterError, match=rf"tensor '{key}' would be written with NaN or Inf values"):
        save_adapter(ad, tmp_path / "out" / "v1", {key: big})
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
