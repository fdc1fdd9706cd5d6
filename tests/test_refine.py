"""refine() end to end on a tiny random Llama: what is written, what is not, and bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_surgery import ConfigError, SurgeryConfig, load_adapter, refine
from vllm_surgery.errors import AdapterError, CalibrationError
from vllm_surgery.testing import build_gain_case

RESIDUAL = ("o_proj", "down_proj")


@pytest.fixture(scope="module")
def forced(tiny_base, tiny_adapter, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("refined") / "v1"
    result = refine(tiny_base, tiny_adapter, tiny_calibration, out, force=True, progress=False)
    return result, out


def lora_pair(adapter_dir, name):
    """(A, B) of one module, read straight from the safetensors file, in float64."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = f"base_model.model.{name}"
    return tensors[f"{prefix}.lora_A.weight"].double(), tensors[f"{prefix}.lora_B.weight"].double()


def test_forced_decision_on_four_heldout_examples(forced):
    result, _ = forced
    # 16 examples, a quarter held out: 4 examples, whose smallest possible p-value (1/16) is above the
    # default max_false_accept (0.025), so nothing can pass and force writes the candidate anyway.
    assert result.decision == "forced" and result.policy == "grad_direction"
    assert result.calibration["heldout_examples"] == 4
    assert "with 4 held-out examples no p-value can fall below 0.0625" in result.reason
    assert result.gate["smallest_p_value"] == 1 / 16 and result.gate["sign_flips"] == 16
    assert result.gate["candidates"] == 1 and result.gate["max_false_accept"] == 0.025


def test_written_adapter_equals_the_edit_formula(forced, tiny_adapter):
    """sigma' = sigma * exp(-(2.0 * max(gh, 0) + 0.2 * min(gh, 0))), gh = g / mean|g|, rescaled to keep
    sum(sigma) (l1), from an independent float64 SVD of B @ A; the written B' @ A' = U diag(sigma') V^T."""
    result, out = forced
    assert result.output_path == out
    assert set(result.modules) == {m for m in load_adapter(tiny_adapter).modules if m.endswith(RESIDUAL)}
    for name, mod in result.modules.items():
        a, b = lora_pair(tiny_adapter, name)
        u, sigma, vh = torch.linalg.svd(b @ a, full_matrices=False)
        u, sigma, vh = u[:, :8], sigma[:8], vh[:8]
        g = torch.tensor(mod.sensitivity, dtype=torch.float64)
        gh = g / g.abs().mean()
        raw = sigma * torch.exp(-(2.0 * gh.clamp(min=0) + 0.2 * gh.clamp(max=0)))
        expected = raw * sigma.sum() / raw.sum()
        assert mod.sigma == pytest.approx(sigma.tolist(), rel=1e-5), name
        assert mod.sigma_new == pytest.approx(expected.tolist(), rel=1e-5), name
        a_new, b_new = lora_pair(out, name)
        want = u @ torch.diag(expected) @ vh
        assert torch.allclose(b_new @ a_new, want, atol=1e-6), name
        assert load_adapter(out).lora_a(name).dtype == torch.float32


def heldout_loss_by_peft(base_dir, adapter_dir, examples) -> tuple[float, int]:
    """Answer-token mean cross-entropy of PEFT's own model: one full forward per example."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([list(e.prompt_ids + e.answer_ids)])).logits[0].double()
            start = len(e.prompt_ids)
            predicting = logits[start - 1 : start - 1 + len(e.answer_ids)]
            total += F.cross_entropy(predicting, torch.tensor(e.answer_ids), reduction="sum").item()
            tokens += len(e.answer_ids)
    return total / tokens, tokens


def test_measured_equals_written(forced, tiny_base, tiny_adapter, tiny_calibration):
    """The held-out loss PEFT computes with the written adapter is the reported quality_after, and with
    the original adapter the reported quality_before."""
    from transformers import AutoTokenizer

    from vllm_surgery.calibration import load_calibration, split_heldout

    result, out = forced
    examples = load_calibration(tiny_calibration, AutoTokenizer.from_pretrained(tiny_base)).examples
    _, heldout = split_heldout(examples, 0.25, seed=0)  # refine's defaults: heldout_fraction 0.25, seed 0
    assert len(heldout) == result.calibration["heldout_examples"]
    after, tokens = heldout_loss_by_peft(tiny_base, out, heldout)
    assert tokens == result.quality_after.answer_tokens
    assert result.quality_after.loss == pytest.approx(after, rel=1e-6, abs=0)  # observed: ~5e-9
    before, _ = heldout_loss_by_peft(tiny_base, tiny_adapter, heldout)
    assert result.quality_before.loss == pytest.approx(before, rel=1e-6, abs=0)
    assert abs(after - before) > 1e-4 * before  # the two adapters really differ on these examples


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
    # the hash of the adapter refined from, not of the one written
    assert (
        prov["adapter_hash"] == load_adapter(tiny_adapter).content_hash() != load_adapter(out).content_hash()
    )
    assert len(prov["calibration"]["sha256"]) == 64 and prov["calibration"]["examples"] == 12
    assert prov["calibration"]["heldout_examples"] == 4
    assert prov["quality_before"]["loss"] > 0 and prov["quality_after"]["loss"] > 0
    assert prov["quality_before"]["answer_tokens"] == prov["quality_after"]["answer_tokens"] > 0
    row = prov["candidates"]["grad_direction"]
    assert set(row) == {
        *("loss", "relative_improvement", "relative_improvement_se", "z", "p_value", "p_values"),
        *("selection_loss", "chosen", "tested"),
    }
    assert row["tested"] is True and row["selection_loss"] is None and row["chosen"] == {}
    assert row["loss"] == prov["quality_after"]["loss"]
    gain = (prov["quality_before"]["loss"] - row["loss"]) / prov["quality_before"]["loss"]
    assert row["relative_improvement"] == pytest.approx(gain, rel=1e-9)
    assert prov["gate"]["p_value"] == row["p_value"] and prov["gate"]["chosen"] == "grad_direction"
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
    assert set(result.candidates) == {"sigma_descent"} and result.policy == "sigma_descent"
    assert result.candidates["sigma_descent"]["tested"] is True
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
    assert a.quality_before == b.quality_before and a.calibration == b.calibration and a.gate == b.gate


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"policy": "best"}, ConfigError, "unknown policy 'best'"),
        ({"constraint": "l0"}, ConfigError, "unknown constraint 'l0'"),
        ({"modules": "lm_head"}, ConfigError, "module 'lm_head' matches no module of the adapter"),
        ({"layers": "5:9"}, ConfigError, "selects no module"),
        ({"layers": "x"}, ConfigError, "START:END"),
        ({"heldout_fraction": 1.0}, ConfigError, r"heldout_fraction must be a number in \[0, 1\); got 1.0"),
        ({"policy": "auto", "heldout_fraction": 0.0}, ConfigError, "must be > 0"),
        ({"policy_params": {"eta": 1}}, ConfigError, "no parameter 'eta'"),
        (
            {"policy_params": {"eta_s": float("nan")}},
            ConfigError,
            "grad_direction.eta_s must be a finite number",
        ),
        ({"min_z": 2.0}, ConfigError, "min_z was replaced by max_false_accept"),
        # finite parameters whose exp() overflows: refused before anything is measured or written
        (
            {"policy_params": {"eta_e": 1e6}},
            ConfigError,
            r"policy grad_direction \(eta_s=2, eta_e=1e\+06\) gives non-finite singular values for model\.",
        ),
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


def test_a_config_changed_after_construction_is_validated_again(tiny_base, tiny_adapter, tiny_calibration):
    config = SurgeryConfig()
    config.max_false_accept = float("nan")
    with pytest.raises(ConfigError, match=r"max_false_accept must be a probability in \(0, 1\]; got nan"):
        refine(tiny_base, tiny_adapter, tiny_calibration, None, config)


@pytest.fixture(scope="module")
def gain_case(tmp_path_factory):
    """The shared case on which the gate accepts a real gain: 48 examples, half held out (24)."""
    return build_gain_case(tmp_path_factory.mktemp("gain"))


def test_a_measured_gain_is_accepted_and_a_stricter_rate_keeps_the_original(gain_case, tmp_path):
    kw = {**gain_case.settings, "progress": False}
    accepted = refine(gain_case.base, gain_case.adapter, gain_case.calibration, tmp_path / "a", **kw)
    assert accepted.decision == "accept" and accepted.written
    gate = accepted.gate
    # 48 examples: 24 held out for the gate, 7 to choose steps on, 17 for the sensitivity passes
    assert (gate["candidates"], gate["selected_from"], gate["heldout_examples"], gate["exact"]) == (
        1,
        1,
        24,
        False,
    )
    assert (gate["selection_examples"], accepted.calibration["examples"]) == (7, 17)
    assert gate["p_value"] <= 0.025 and gate["relative_improvement"] >= 0.001
    assert accepted.quality_after.loss < accepted.quality_before.loss  # accept means better on held-out data
    assert (
        accepted.policy == gate["chosen"]
        and accepted.candidates[accepted.policy]["p_value"] == gate["p_value"]
    )
    # The same run with a false-acceptance rate well below the measured p-value keeps the original (far
    # enough below that the p-value is not borderline: a borderline one would draw more sign flips).
    strict = refine(
        gain_case.base,
        gain_case.adapter,
        gain_case.calibration,
        tmp_path / "s",
        max_false_accept=gate["p_value"] / 20,
        **kw,
    )
    assert strict.decision == "keep_original" and not (tmp_path / "s").exists()
    assert strict.reason.startswith("no candidate measurably beats the original")
    assert strict.gate["p_value"] == gate["p_value"]  # same seed, same sign flips


def test_auto_never_accepts_a_candidate_that_does_not_lower_the_loss(
    tiny_base, tiny_adapter, tiny_calibration
):
    """With the test switched off and no floor, acceptance still needs a lower held-out loss."""
    for seed in range(3):
        r = refine(
            tiny_base,
            tiny_adapter,
            tiny_calibration,
            None,
            policy="auto",
            min_improvement=0.0,
            min_loss_reduction=0.0,
            max_false_accept=1.0,
            seed=seed,
            progress=False,
        )
        best_loss = min(row["loss"] for row in r.candidates.values())
        if best_loss < r.quality_before.loss:
            assert r.decision == "accept" and r.quality_after.loss == best_loss
        else:
            assert r.decision == "keep_original"
        assert math.isfinite(r.candidates[r.policy]["p_value"])


def test_written_files_are_readable_by_other_users(forced):
    _, out = forced
    for f in out.iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f
