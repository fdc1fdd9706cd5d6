"""refine() end to end on a tiny random Llama: what is written, what is not, and bad input."""

import json

import pytest
import torch
from safetensors import safe_open

from vllm_surgery import ConfigError, SurgeryConfig, load_adapter, refine
from vllm_surgery.errors import AdapterError, CalibrationError
from vllm_surgery.policies import constrain, reweight
from vllm_surgery.spectral import lora_svd

RESIDUAL = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def forced(tiny_base, tiny_adapter, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("refined") / "v1"
    result = refine(tiny_base, tiny_adapter, tiny_calibration, out, force=True, progress=False)
    return result, out


def test_written_adapter_equals_the_edit_formula(forced, tiny_adapter):
    result, out = forced
    assert result.output_path == out and result.decision in ("accept", "forced")
    orig, new = load_adapter(tiny_adapter), load_adapter(out)
    assert set(result.modules) == {m for m in orig.modules if m.endswith(RESIDUAL)}
    for name, mod in result.modules.items():
        spec = lora_svd(orig.lora_a(name), orig.lora_b(name))
        g = torch.tensor(mod.sensitivity)
        expected = constrain(spec.sigma, reweight(spec.sigma, g, "grad_direction"), "l1")
        assert mod.sigma_new == pytest.approx(expected.tolist(), rel=1e-6)
        want = spec.U.double() @ torch.diag(expected) @ spec.V.double().T
        got = new.lora_b(name).double() @ new.lora_a(name).double()
        assert torch.allclose(got, want, atol=1e-6), name
        # the l1 constraint kept the nuclear norm of the update
        assert sum(mod.sigma_new) == pytest.approx(sum(mod.sigma), rel=1e-5)
        assert new.lora_a(name).dtype == orig.lora_a(name).dtype


def test_modules_outside_scope_are_byte_identical(forced, tiny_adapter):
    _, out = forced
    with (
        safe_open(out / "adapter_model.safetensors", "pt") as f,
        safe_open(tiny_adapter / "adapter_model.safetensors", "pt") as g,
    ):
        for key in g.keys():  # noqa: SIM118
            same = f.get_tensor(key).numpy().tobytes() == g.get_tensor(key).numpy().tobytes()
            in_scope = any(f".{leaf}." in key for leaf in RESIDUAL)
            assert same is not in_scope, key  # out of scope: same bytes; in scope: edited
    assert (out / "adapter_config.json").read_bytes() == (tiny_adapter / "adapter_config.json").read_bytes()


def test_provenance_and_report(forced, tiny_adapter, tiny_calibration):
    result, out = forced
    prov = json.loads((out / "surgery.json").read_text())
    assert prov["method"] == "spectral-surgery" and prov["policy"] == "grad_direction"
    assert prov["constraint"] == "l1" and prov["config"]["modules"] == "residual"
    assert prov["adapter_hash"] == load_adapter(tiny_adapter).content_hash()
    assert len(prov["calibration"]["sha256"]) == 64 and prov["calibration"]["examples"] == 12
    assert prov["calibration"]["heldout_examples"] == 4
    assert prov["quality_before"]["loss"] > 0 and prov["quality_after"]["loss"] > 0
    assert set(prov["versions"]) >= {"torch", "transformers", "peft", "safetensors"}
    assert {"load", "prepare", "sensitivity", "evaluation"} <= set(prov["timings"])
    for name, mod in prov["modules"].items():
        assert len(mod["sigma"]) == len(mod["sigma_new"]) == len(mod["sensitivity"]) == 8, name
    report = result.to_dict()
    assert report["decision"] == result.decision and report["modules"].keys() == prov["modules"].keys()


def test_refined_adapter_loads_in_peft_and_generates(forced, tiny_base, tiny_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = forced
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = tok("what is 1 + 2 ?", return_tensors="pt")
    logits = {}
    for tag, path in (("orig", tiny_adapter), ("new", out)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), path).eval()
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
            logits[tag] = model(**ids).logits
        assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    assert not torch.allclose(logits["orig"], logits["new"])  # the edit changed the function


def test_keep_original_writes_nothing(tiny_base, tiny_adapter, tiny_calibration, tmp_path):
    out = tmp_path / "never"
    result = refine(
        tiny_base, tiny_adapter, tiny_calibration, out, policy="auto", min_improvement=0.9, progress=False
    )
    assert result.decision == "keep_original" and result.output_path is None
    assert "no candidate measurably beats the original" in result.reason
    assert set(result.candidates) == {"grad_direction", "abs_select", "smooth_abs"}
    assert result.policy == min(result.candidates, key=lambda p: result.candidates[p]["loss"])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_scope_layers_and_explicit_modules(tiny_base, tiny_adapter, tiny_calibration):
    r = refine(tiny_base, tiny_adapter, tiny_calibration, None, modules="mlp", layers="1:", progress=False)
    assert sorted(r.modules) == [f"model.layers.1.mlp.{m}" for m in ("down_proj", "gate_proj", "up_proj")]
    r = refine(
        tiny_base,
        tiny_adapter,
        tiny_calibration,
        None,
        modules="q_proj,model.layers.0.mlp.up_proj",
        constraint="l2",
        policy="smooth_abs",
        progress=False,
    )
    assert sorted(r.modules) == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    for mod in r.modules.values():
        l2 = lambda x: sum(v * v for v in x) ** 0.5  # noqa: E731
        assert l2(mod.sigma_new) == pytest.approx(l2(mod.sigma), rel=1e-5)


def test_same_seed_same_result(tiny_base, tiny_adapter, tiny_calibration):
    kw = {"policy": "random_index", "samples": 10, "seed": 7, "progress": False}
    a = refine(tiny_base, tiny_adapter, tiny_calibration, None, **kw)
    b = refine(tiny_base, tiny_adapter, tiny_calibration, None, **kw)
    assert {k: v.sigma_new for k, v in a.modules.items()} == {k: v.sigma_new for k, v in b.modules.items()}
    assert a.quality_before == b.quality_before and a.calibration == b.calibration


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"policy": "best"}, ConfigError, "unknown policy"),
        ({"constraint": "l0"}, ConfigError, "unknown constraint"),
        ({"modules": "lm_head"}, ConfigError, "matches no module"),
        ({"layers": "5:9"}, ConfigError, "selects no module"),
        ({"layers": "x"}, ConfigError, "START:END"),
        ({"heldout_fraction": 1.0}, ConfigError, "heldout_fraction"),
        ({"policy": "auto", "heldout_fraction": 0.0}, ConfigError, "must be > 0"),
        ({"policy_params": {"eta": 1}}, ConfigError, "no parameter 'eta'"),
    ],
)
def test_bad_settings_are_refused_and_nothing_written(
    tiny_base, tiny_adapter, tiny_calibration, tmp_path, kwargs, error, message
):
    with pytest.raises(error, match=message):
        refine(
            tiny_base, tiny_adapter, tiny_calibration, tmp_path / "out", force=True, progress=False, **kwargs
        )
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_leave_no_output(tiny_base, tiny_adapter, adapter_copy, tmp_path):
    bad_cal = tmp_path / "bad.jsonl"
    bad_cal.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    out = tmp_path / "out"
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: missing 'completion'"):
        refine(tiny_base, tiny_adapter, bad_cal, out, force=True, progress=False)
    (adapter_copy / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="peft_type"):
        refine(tiny_base, adapter_copy, bad_cal, out, force=True, progress=False)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "adapter_model.safetensors").write_bytes(b"precious")
    with pytest.raises(AdapterError, match="already exists"):
        refine(tiny_base, tiny_adapter, bad_cal, existing, force=True, progress=False)
    assert (existing / "adapter_model.safetensors").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "bad.jsonl", "existing"]


def test_adapter_for_another_base_model_is_refused(tiny_adapter, tiny_calibration, tmp_path):
    from vllm_surgery.testing import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", hidden=32, heads=2, kv_heads=1, intermediate=64)
    with pytest.raises(AdapterError, match="trained for another base model"):
        refine(other, tiny_adapter, tiny_calibration, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_config_object_and_keywords_are_exclusive(tiny_base, tiny_adapter, tiny_calibration):
    with pytest.raises(ConfigError, match="not both"):
        refine(tiny_base, tiny_adapter, tiny_calibration, None, SurgeryConfig(), policy="auto")


def test_gain_within_noise_is_not_accepted(tiny_base, tiny_adapter, tiny_calibration, tmp_path):
    """A candidate must beat the original by min_z standard errors, not only by the relative margin."""
    kw = {"policy": "grad_direction", "min_improvement": 0.0, "progress": False}
    lenient = refine(tiny_base, tiny_adapter, tiny_calibration, None, min_z=0.0, **kw)
    row = lenient.candidates["grad_direction"]
    assert row["relative_improvement"] > 0 and row["relative_improvement_se"] > 0
    z = row["relative_improvement"] / row["relative_improvement_se"]
    assert lenient.decision == "accept"
    strict = refine(tiny_base, tiny_adapter, tiny_calibration, tmp_path / "o", min_z=z + 0.01, **kw)
    assert strict.decision == "keep_original" and "standard errors" in strict.reason
    assert not (tmp_path / "o").exists()


def test_written_files_are_readable_by_other_users(forced):
    _, out = forced
    for f in out.iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f
