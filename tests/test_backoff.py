"""Out-of-memory back-off, layer recomputation and chunked logits leave every result as it was."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_surgery import memory, refine
from vllm_surgery.adapted_model import AdaptedModel
from vllm_surgery.adapter import load_adapter
from vllm_surgery.calibration import collate, load_calibration
from vllm_surgery.config import select_modules
from vllm_surgery.errors import DeviceMemoryError
from vllm_surgery.evaluation import evaluation_budget, heldout_quality
from vllm_surgery.memory import DeviceMemory
from vllm_surgery.sensitivity import compute_sensitivities
from vllm_surgery.spectral import lora_svd

ONE_BATCH = 100_000  # tokens: every tiny example in one batch


class OutOfMemoryOnce:
    """Raises torch.OutOfMemoryError on the first `times` batches of more than `tokens` tokens.

    in_backward: raised from the gradient of the first decoder layer's output, i.e. after the later
    layer's sigma gradients have already been accumulated (what a real mid-backward failure leaves).
    """

    def __init__(
        self, model, tokens: int, *, in_backward: bool, times: int = 1, evaluation_only: bool = False
    ) -> None:
        self.tokens, self.in_backward, self.left, self.fired = tokens, in_backward, times, 0
        self.evaluation_only = evaluation_only
        self.handle = model.get_decoder().layers[0].register_forward_hook(self.hook)

    def hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self.left == 0 or hidden.shape[0] * hidden.shape[1] <= self.tokens:
            return None
        if self.evaluation_only and (torch.is_grad_enabled() or hidden.shape[0] == 1):
            return None  # evaluations only: not the pass, nor the one-example logits check of each pass
        if self.in_backward and not hidden.requires_grad:  # a forward without a graph (the logits check)
            return None
        self.left -= 1
        self.fired += 1
        if not self.in_backward:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")

        def fail(grad):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")

        hidden.register_hook(fail)
        return None


@pytest.fixture(scope="module")
def setup(tiny_base, tiny_adapter, tiny_calibration):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = load_calibration(tiny_calibration, tok).examples
    adapter = load_adapter(tiny_adapter)
    edited = select_modules(adapter.modules, "all")
    spectra = {n: lora_svd(adapter.lora_a(n), adapter.lora_b(n)) for n in edited}
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    return tok, examples, adapter, spectra, model


def sensitivities(setup, **kwargs):
    tok, examples, adapter, spectra, model = setup
    with AdaptedModel(model, adapter, spectra) as adapted:
        return compute_sensitivities(adapted, examples, pad_id=tok.pad_token_id, progress=False, **kwargs)


def assert_same_gradients(got, want):
    assert set(got) == set(want)
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6 * scale), name


@pytest.mark.parametrize("in_backward", [False, True])
def test_pass_backs_off_and_gives_the_same_gradients(setup, in_backward):
    model = setup[-1]
    want, plain = sensitivities(setup, max_batch_tokens=ONE_BATCH)
    assert plain.batches == 1 and plain.backoffs == []
    failure = OutOfMemoryOnce(model, 64, in_backward=in_backward)
    try:
        got, stats = sensitivities(setup, max_batch_tokens=ONE_BATCH)
    finally:
        failure.handle.remove()
    assert failure.fired == 1
    assert_same_gradients(got, want)
    padded = plain.padded_tokens  # the failed batch: every example, padded to the longest
    assert stats.batch_tokens == ONE_BATCH and stats.final_batch_tokens == padded // 2
    assert stats.batches > 1 and stats.answer_tokens == plain.answer_tokens
    assert len(stats.backoffs) == 1
    assert (
        f"a batch of {padded} tokens ran out of memory; budget {ONE_BATCH} -> {padded // 2}"
        in (stats.backoffs[0])
    )


def test_evaluation_backs_off_for_the_rest_of_the_run_and_gives_the_same_quality(setup):
    tok, examples, adapter, spectra, model = setup
    with AdaptedModel(model, adapter, spectra) as adapted:
        want = heldout_quality(adapted, examples, pad_id=tok.pad_token_id, max_batch_tokens=ONE_BATCH)
        budget = evaluation_budget(adapted, ONE_BATCH)
        failure = OutOfMemoryOnce(model, 64, in_backward=False)
        try:
            got = heldout_quality(adapted, examples, pad_id=tok.pad_token_id, budget=budget)
        finally:
            failure.handle.remove()
        assert failure.fired == 1
        assert got.answer_tokens == want.answer_tokens
        assert got.per_example == pytest.approx(want.per_example, rel=1e-6)
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        assert budget.tokens < ONE_BATCH and len(budget.backoffs) == 1
        assert "held-out evaluation: a batch of" in budget.backoffs[0]
        # the halved budget holds for the next evaluation of the run
        halved = budget.tokens
        heldout_quality(adapted, examples, pad_id=tok.pad_token_id, budget=budget)
        assert budget.tokens == halved


def test_one_example_that_does_not_fit_names_the_remedies(setup):
    model = setup[-1]
    failure = OutOfMemoryOnce(model, 0, in_backward=True, times=1000)
    try:
        with pytest.raises(DeviceMemoryError) as err:
            sensitivities(setup, max_batch_tokens=ONE_BATCH)
    finally:
        failure.handle.remove()
    message = str(err.value)
    assert "does not fit in device memory" in message and "calibration.jsonl:" in message
    assert "--max-length" in message and "--gpu-memory-utilization" in message


def test_refine_report_says_it_backed_off(tiny_base, tiny_adapter, tiny_calibration, setup):
    tok, model = setup[0], setup[-1]
    kwargs = {"model": model, "tokenizer": tok, "max_batch_tokens": ONE_BATCH, "progress": False}
    plain = refine(None, tiny_adapter, tiny_calibration, None, policy="auto", **kwargs)
    assert plain.stats["backoffs"] == []
    in_pass = OutOfMemoryOnce(model, 32, in_backward=True)
    in_evaluation = OutOfMemoryOnce(model, 32, in_backward=False, evaluation_only=True)
    try:
        result = refine(None, tiny_adapter, tiny_calibration, None, policy="auto", **kwargs)
    finally:
        in_pass.handle.remove()
        in_evaluation.handle.remove()
    assert in_pass.fired == 1 and in_evaluation.fired == 1
    backoffs = result.stats["backoffs"]
    assert len(backoffs) == 2
    assert backoffs[0].startswith("sensitivity pass: a batch of")
    # the first evaluation after the pass is the selection split's (auto chooses its steps there); the
    # budget it backed off to holds for the held-out evaluations too
    assert backoffs[1].startswith("selection original evaluation: a batch of")
    assert result.decision == plain.decision and result.policy == plain.policy
    assert result.quality_before.loss == pytest.approx(plain.quality_before.loss, rel=1e-6)
    for name, mod in plain.modules.items():
        assert result.modules[name].sensitivity == pytest.approx(mod.sensitivity, rel=1e-4, abs=1e-7)


def test_recomputed_layers_give_the_same_gradients_and_run_the_hooks_again(setup):
    model = setup[-1]
    want, _ = sensitivities(setup, max_batch_tokens=ONE_BATCH, recompute="off")
    calls = []

    def count(*args):
        if torch.is_grad_enabled():  # not the logits check's forwards (no graph)
            calls.append(1)

    handle = model.get_decoder().layers[1].mlp.down_proj.register_forward_hook(count)
    try:
        got, stats = sensitivities(setup, max_batch_tokens=ONE_BATCH, recompute="all")
    finally:
        handle.remove()
    assert stats.recomputed_layers == 2 and stats.batches == 1
    assert len(calls) == 2  # the forward, and again in the backward
    assert_same_gradients(got, want)
    assert all("forward" not in layer.__dict__ for layer in model.get_decoder().layers)


def test_logits_in_chunks_give_the_same_gradients_and_losses(setup, monkeypatch):
    tok, examples, _, _, model = setup
    want, _ = sensitivities(setup, max_batch_tokens=ONE_BATCH)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = collate(examples, tok.pad_token_id)
    _, _, adapter, spectra, _ = setup
    with AdaptedModel(model, adapter, spectra) as adapted, torch.no_grad():
        whole = adapted.answer_losses(batch)
    monkeypatch.setattr(memory, "LOGITS_CHUNK_BYTES", 3 * 4 * vocab)  # 3 answer positions a chunk
    assert memory.logits_chunk_tokens(vocab) == 3 and batch.targets.numel() > 3
    got, _ = sensitivities(setup, max_batch_tokens=ONE_BATCH)
    assert_same_gradients(got, want)
    with AdaptedModel(model, adapter, spectra) as adapted, torch.no_grad():
        assert torch.allclose(adapted.answer_losses(batch), whole, rtol=1e-6, atol=1e-7)


def test_no_attention_mask_gives_the_masked_losses(setup):
    """Right padding + causal attention: dropping the mask changes no real position."""
    tok, examples, adapter, spectra, model = setup
    batch = collate(examples, tok.pad_token_id)
    assert (batch.attention_mask == 0).any()  # really padded
    with AdaptedModel(model, adapter, spectra) as adapted, torch.no_grad():
        unmasked = adapted.answer_losses(batch)  # the decoder runs without an attention mask
        hidden = adapted.model.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )[0]
        logits = adapted.output_logits(hidden[batch.rows, batch.cols])
        masked = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
        assert torch.allclose(unmasked, masked, rtol=1e-5, atol=1e-6)


class CountingMemory(DeviceMemory):
    """CUDA's memory counters, stood in for on the CPU: a fixed usable figure, and as peak
    `per_token` bytes times the most tokens a batch has had since start()."""

    def __init__(self, model, usable: int, per_token: int) -> None:
        self._usable, self.per_token, self.largest, self.batches = usable, per_token, 0, []
        self.handle = model.get_decoder().register_forward_pre_hook(self.seen, with_kwargs=True)

    def seen(self, module, args, kwargs):
        tokens = kwargs["input_ids"].numel()
        self.batches.append(tokens)
        self.largest = max(self.largest, tokens)

    def usable(self) -> int:
        return self._usable

    def start(self) -> None:
        self.largest = 0

    def peak(self) -> int:
        return self.largest * self.per_token


@pytest.mark.parametrize("lean", ["off", "on"])
def test_planned_budget_probes_first_then_replans_with_the_measured_cost(setup, lean):
    model = setup[-1]
    want, _ = sensitivities(setup, max_batch_tokens=ONE_BATCH)
    shape = memory.ModelShape.of(model.config, 4)
    per_token = shape.pass_bytes_per_token(0, lean=lean == "on")
    # room for exactly 256 tokens at the estimate; the first batch is a probe of at most 256 / 4
    counters = CountingMemory(model, shape.logits_bytes + 256 * per_token, 2 * per_token)
    try:
        got, stats = sensitivities(setup, recompute="off", lean=lean, memory=counters)
    finally:
        counters.handle.remove()
    assert counters.batches[0] <= 64
    # the probe measured twice the estimate: the rest is planned at 256 / 2 tokens a batch
    assert stats.budget_source == "device memory" and stats.batch_tokens == 128
    assert all(tokens <= 128 for tokens in counters.batches[1:]) and max(counters.batches[1:]) > 64
    assert stats.peak_bytes == max(counters.batches) * 2 * per_token and stats.backoffs == []
    assert_same_gradients(got, want)


def test_lean_activations_give_the_same_gradients_and_keep_less(setup):
    from vllm_surgery.activations import LeanActivations

    tok, examples, _, _, model = setup
    want, _ = sensitivities(setup, max_batch_tokens=ONE_BATCH, lean="off")
    got, stats = sensitivities(setup, max_batch_tokens=ONE_BATCH, lean="on")
    assert stats.lean_modules == 2 * 3  # per layer: two RMSNorms and the MLP
    assert_same_gradients(got, want)
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored

    def kept_bytes(lean: bool) -> int:
        """Bytes autograd saves for the backward of one forward (tensors counted once)."""
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype, t.shape)] = t.numel() * t.element_size()
            return t

        batch = collate(examples, tok.pad_token_id)
        x = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        positions = torch.arange(x.shape[1])[None]
        rope = model.get_decoder().rotary_emb(x, positions)
        with LeanActivations(model, lean), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_decoder().layers[0](x, position_embeddings=rope)
        return sum(seen.values())

    # float32: the norms' upcast is their input itself, so the saving is mostly the MLP's act(gate)
    intermediate = model.config.intermediate_size
    tokens = collate(examples, tok.pad_token_id).input_ids.numel()
    assert kept_bytes(False) - kept_bytes(True) >= intermediate * 4 * tokens
