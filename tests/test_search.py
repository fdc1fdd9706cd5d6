"""The selection split, weighted corrections, grad_search and sigma_descent on the tiny model.

Expected values come from elsewhere: PEFT's own forward for losses of written adapters, separate
sensitivity passes for the weighted one, the SVD of the original adapter for "U and V stay fixed".
"""

from __future__ import annotations

import json

import pytest
import torch
from test_refine import heldout_loss_by_peft
from transformers import AutoTokenizer

from vllm_surgery import load_adapter, refine
from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.calibration import load_calibration, split_examples, split_heldout, weighted
from vllm_surgery.errors import CalibrationError
from vllm_surgery.refine import load_base_model
from vllm_surgery.sensitivity import compute_sensitivities
from vllm_surgery.spectral import lora_svd
from vllm_surgery.testing import write_calibration


@pytest.fixture(scope="module")
def calibration40(tmp_path_factory):
    return write_calibration(tmp_path_factory.mktemp("search") / "calibration.jsonl", n=40, seed=3)


def examples_of(base, calibration):
    return load_calibration(calibration, AutoTokenizer.from_pretrained(base)).examples


def test_three_way_split_is_disjoint_seeded_and_keeps_the_gates_heldout(tiny_base, calibration40):
    examples = examples_of(tiny_base, calibration40)
    fit, selection, heldout = split_examples(examples, 0.25, 0.2, seed=5)
    assert (len(fit), len(selection), len(heldout)) == (22, 8, 10)
    sources = [e.source for part in (fit, selection, heldout) for e in part]
    assert sorted(sources) == sorted(e.source for e in examples)  # disjoint and complete
    assert heldout == split_heldout(examples, 0.25, seed=5)[1]  # the gate's data does not depend on selection
    assert split_examples(examples, 0.25, 0.2, seed=5) == (fit, selection, heldout)
    assert split_examples(examples, 0.25, 0.2, seed=6)[1] != selection
    assert split_examples(examples, 0.25, 0.0, seed=5) == (*split_heldout(examples, 0.25, 5)[:1], [], heldout)
    with pytest.raises(CalibrationError, match="leave none for the sensitivity pass"):
        split_examples(examples[:2], 0.5, 0.4, seed=0)
    with pytest.raises(CalibrationError, match=r"selection fraction must lie in \[0, 1\)"):
        split_examples(examples, 0.25, 1.0, seed=0)


def test_feedback_labels_are_checked(tmp_path, tiny_base):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": " b", "feedback": "correction"})
        + "\n"
        + json.dumps({"prompt": "a", "completion": " c", "feedback": "great"})
        + "\n"
    )
    with pytest.raises(CalibrationError, match=r"c.jsonl:2: 'feedback' must be one of correction, good, "):
        examples_of(tiny_base, path)
    path.write_text(json.dumps({"prompt": "a", "completion": " b", "feedback": "correction"}) + "\n")
    (example,) = examples_of(tiny_base, path)
    assert example.feedback == "correction" and example.weight == 1.0
    assert weighted([example], 3.0)[0].weight == 3.0


def test_weighted_sensitivities_are_the_token_weighted_mix_of_separate_passes(
    tiny_base, tiny_adapter, tmp_path
):
    """With corrections weighted w, dL/dsigma = (w T_c g_c + T_g g_g) / (w T_c + T_g), where g_c and g_g are
    the plain passes over the corrections and the good answers alone and T their answer tokens."""
    path = tmp_path / "mixed.jsonl"
    plain = write_calibration(tmp_path / "plain.jsonl", n=10, seed=1).read_text().splitlines()
    path.write_text(
        "\n".join(
            json.dumps({**json.loads(line), "feedback": "correction" if i % 3 == 0 else "good"})
            for i, line in enumerate(plain)
        )
        + "\n"
    )
    examples = examples_of(tiny_base, path)
    corrections = [e for e in examples if e.feedback == "correction"]
    goods = [e for e in examples if e.feedback == "good"]
    lora = load_adapter(tiny_adapter)
    model, tok = load_base_model(tiny_base, torch.device("cpu"), progress=False)
    spectra = {n: lora_svd(lora.lora_a(n), lora.lora_b(n)) for n in lora.modules}
    w = 3.0
    with AdaptedModel(model, lora, spectra) as adapted:
        kw = {"pad_id": tok.pad_token_id or 0, "progress": False}
        mixed, stats = compute_sensitivities(adapted, weighted(examples, w), **kw)
        g_c, stats_c = compute_sensitivities(adapted, corrections, **kw)
        g_g, stats_g = compute_sensitivities(adapted, goods, **kw)
    t_c, t_g = stats_c.answer_tokens, stats_g.answer_tokens
    for name in mixed:
        want = (w * t_c * g_c[name].double() + t_g * g_g[name].double()) / (w * t_c + t_g)
        assert torch.allclose(mixed[name].double(), want, rtol=1e-4, atol=1e-7), name
    want_loss = (w * t_c * stats_c.loss + t_g * stats_g.loss) / (w * t_c + t_g)
    assert stats.loss == pytest.approx(want_loss, rel=1e-5)


@pytest.fixture(scope="module")
def searched(tiny_base, tiny_adapter, calibration40, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("searched")
    for policy in ("grad_search", "sigma_descent"):
        result = refine(
            tiny_base, tiny_adapter, calibration40, root / policy, policy=policy, force=True, progress=False
        )
        out[policy] = (result, root / policy)
    return out


def selection_split(tiny_base, calibration40):
    # refine's defaults: heldout_fraction 0.25, selection_fraction 0.15, seed 0
    return split_examples(examples_of(tiny_base, calibration40), 0.25, 0.15, seed=0)


@pytest.mark.parametrize("policy", ["grad_search", "sigma_descent"])
def test_the_reported_selection_loss_is_the_written_adapters_loss_under_peft(
    searched, policy, tiny_base, calibration40
):
    result, out = searched[policy]
    fit, selection, _ = selection_split(tiny_base, calibration40)
    assert result.calibration["examples"] == len(fit) and result.selection["examples"] == len(selection) == 6
    peft_loss, _ = heldout_loss_by_peft(tiny_base, out, selection)
    row = result.candidates[policy]
    assert row["selection_loss"] == pytest.approx(peft_loss, rel=1e-6)
    assert row["tested"] is True and result.gate["selected_from"] == 1
    trace = result.selection["candidates"][policy]["trace"]
    assert row["selection_loss"] == min(step["selection_loss"] for step in trace)  # the best was kept


def test_grad_search_tries_a_ladder_of_steps(searched):
    result, _ = searched["grad_search"]
    trace = result.selection["candidates"]["grad_search"]["trace"]
    assert [step["eta_s"] for step in trace] == [2.0 / 2**j for j in range(7)]
    assert [step["eta_e"] for step in trace] == pytest.approx([0.2 / 2**j for j in range(7)])
    chosen = result.candidates["grad_search"]["chosen"]
    best = min(trace, key=lambda step: step["selection_loss"])
    assert chosen == {"eta_s": best["eta_s"], "eta_e": best["eta_e"]}


def test_sigma_descent_keeps_directions_and_magnitude_and_takes_fresh_passes(searched, tiny_adapter):
    result, out = searched["sigma_descent"]
    original, refined = load_adapter(tiny_adapter), load_adapter(out)
    trace = result.selection["candidates"]["sigma_descent"]["trace"]
    assert result.stats["sensitivity_passes"] == len(trace)  # one per step, the first shared
    steps = result.candidates["sigma_descent"]["chosen"]["steps"]
    # defaults: at most 6 steps, stopped two steps after the best at the latest (patience 2)
    assert 1 <= steps <= len(trace) <= min(6, steps + 2)
    assert [row["step"] for row in trace] == list(range(1, len(trace) + 1))
    assert trace[1]["fit_loss"] < trace[0]["fit_loss"]  # the first step lowered the loss it descends
    for name in result.modules:
        spec = lora_svd(original.lora_a(name), original.lora_b(name))
        delta = (refined.lora_b(name) @ refined.lora_a(name)).double()
        u, v = spec.U.double(), spec.V.double()
        core = u.T @ delta @ v  # in the original's singular bases
        assert torch.allclose(delta, u @ core @ v.T, atol=1e-6), name  # no new direction
        assert torch.allclose(core, torch.diag(torch.diagonal(core)), atol=1e-6), name  # only sigma moved
        sigma_new = torch.diagonal(core)
        assert float(sigma_new.sum()) == pytest.approx(float(spec.sigma.double().sum()), rel=1e-5)  # l1 kept
        assert torch.allclose(sigma_new, torch.tensor(result.modules[name].sigma_new).double(), atol=1e-5)


def test_auto_is_sigma_descent_with_its_gate(searched, tiny_base, tiny_adapter, calibration40):
    result = refine(tiny_base, tiny_adapter, calibration40, None, policy="auto", progress=False)
    forced, _ = searched["sigma_descent"]
    assert list(result.candidates) == ["sigma_descent"] and result.gate["candidates"] == 1
    assert (
        result.candidates["sigma_descent"]["selection_loss"]
        == forced.candidates["sigma_descent"]["selection_loss"]
    )
    for name, module in result.modules.items():
        assert module.sigma_new == forced.modules[name].sigma_new, name


def test_several_candidates_are_chosen_on_the_selection_split_and_only_the_choice_is_tested(
    monkeypatch, tiny_base, tiny_adapter, calibration40
):
    import vllm_surgery.config as config_module

    monkeypatch.setattr(config_module, "AUTO_POLICIES", ("grad_search", "abs_select"))
    result = refine(tiny_base, tiny_adapter, calibration40, None, policy="auto", progress=False)
    rows = result.candidates
    assert set(rows) == {"grad_search", "abs_select"}
    assert result.policy == result.selection["chosen"] == min(rows, key=lambda p: rows[p]["selection_loss"])
    assert [p for p in rows if rows[p]["tested"]] == [result.policy]
    assert all(rows[p]["p_value"] is None for p in rows if p != result.policy)
    assert result.gate["candidates"] == 1 and result.gate["selected_from"] == 2
    assert "chosen among 2 on 6 other examples" in result.reason
