"""A transformers causal LM with a LoRA adapter applied through forward hooks.

Hooks rather than PEFT wrappers because the edited modules must be expressed as
`s * U diag(sigma) V^T` with sigma a free tensor, and because the base model must stay untouched:
the same loaded model serves the sensitivity pass, every held-out evaluation and, in the server,
later refinements. No parameter of the model ever requires a gradient.

Every part of the adapter that load_adapter accepts is applied, as PEFT applies it: linear LoRA
(spectral or fixed), embedding LoRA (fixed), ``modules_to_save`` copies (they replace the layer's output,
the base weight is not touched), and saved base-layer copies are checked equal to the base model's.

The loss needs logits only at answer positions, so `answer_losses` runs the decoder and the output
embedding itself and then re-applies what the model class does to its logits (Cohere's `logit_scale`,
Granite's `logits_scaling`, Gemma-2's `final_logit_softcapping`). Because the next model class may do
something else, the first batch of every AdaptedModel is also run through the model's own forward and
the two sets of logits must agree (`check_logits`), or the pass stops with an error naming the class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import activations
from .adapter import LoraAdapter
from .base_model import check_adapter_fits, check_not_quantized, layer_shapes
from .calibration import Batch
from .errors import AdapterError, SurgeryError
from .precision import LOGIT_TOLERANCE, float32_linear
from .spectral import Spectrum

# Answer positions of the first example compared by the self-check (a few suffice to catch a wrong
# transform; the vocabulary dimension makes each one expensive).
CHECK_POSITIONS = 16

Delta = Callable[[torch.Tensor], torch.Tensor]


class _Patch:
    """What the adapter changes in one layer: a saved replacement of its weights and LoRA deltas."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.deltas: list[Delta] = []

    def replaced_output(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with the saved weights (modules_to_save), as PEFT's copy computes it."""
        m = self.module
        if isinstance(m, torch.nn.Embedding):
            out = F.embedding(x, self.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq)
            scale = _embed_scale(m)
            return out if scale is None else out * scale.to(out.dtype)
        return F.linear(x, self.weight, self.bias)

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        out = output if self.weight is None else self.replaced_output(x)
        for delta in self.deltas:
            out = out + delta(x).to(out.dtype)
        return out


def _embed_scale(module: torch.nn.Module) -> torch.Tensor | None:
    """PEFT's rule: a scalar `embed_scale` on an embedding layer (Gemma-3 style) also scales the LoRA part."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=module.weight.device, dtype=module.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def _lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Delta:
    """A fixed (not edited) linear LoRA: exact float32 on CPU, the ambient autocast precision on CUDA."""

    def delta(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        return scaling * F.linear(F.linear(x, a), b)

    return delta


def spectral_delta(vt: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, scaling: float) -> Delta:
    """An edited module's update `scaling * U diag(sigma) V^T x`, in float32 whatever autocast says.

    r numbers per token: cheap, and a 16-bit sigma would move in steps as large as the acceptance margin.
    """

    def delta(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.to(torch.float32), vt)
            return F.linear(z * sigma, u) * scaling

    return delta


def _embedding_delta(module: torch.nn.Embedding, a: torch.Tensor, b: torch.Tensor, scaling: float) -> Delta:
    """PEFT's embedding LoRA: `scaling * F.embedding(ids, A^T) @ B^T` (times embed_scale), in float32."""
    at, bt = a.T.contiguous(), b.T.contiguous()

    def delta(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids.device.type, enabled=False):
            after_a = F.embedding(
                ids, at, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq
            )
            out = (after_a @ bt) * scaling
        scale = _embed_scale(module)
        return out if scale is None else out * scale.to(out.dtype)

    return delta


def _same_values(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal up to the rounding of the coarser of the two dtypes (a float32 copy of a bf16 weight is equal)."""
    if saved.shape != weight.shape:
        return False
    eps = max(torch.finfo(saved.dtype).eps, torch.finfo(weight.dtype).eps)
    a, b = saved.to(weight.device, torch.float32), weight.detach().float()
    return bool(torch.allclose(a, b, rtol=eps, atol=eps * float(b.abs().max())))


def finish_logits(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What known model classes do to `lm_head(hidden)` before returning logits; check_logits guards the rest."""
    scale = getattr(model, "logit_scale", None)  # Cohere, Cohere2: logits * logit_scale
    if isinstance(scale, (int, float, torch.Tensor)) and not isinstance(scale, bool):
        logits = logits * scale
    divisor = getattr(model.config, "logits_scaling", None)  # Granite family: logits / logits_scaling
    if divisor:
        logits = logits / divisor
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class AdaptedModel:
    """`model` with `adapter` applied; modules in `spectra` use a free `sigma[name]` (float32 leaf).

    Raises AdapterError before any work if the adapter does not fit the model (shapes, layer kinds), the
    model is quantized, or a base-layer copy saved with the adapter differs from the model's weight.
    """

    def __init__(self, model: torch.nn.Module, adapter: LoraAdapter, spectra: Mapping[str, Spectrum]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.sigma: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._patches: dict[torch.nn.Module, _Patch] = {}
        self._logits_checked = False
        check_not_quantized(model.config, type(model).__name__)
        check_adapter_fits(adapter, layer_shapes(model))
        self._check_base_copies(adapter)
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for name, mod in adapter.modules.items():
                if name in spectra:
                    spec = spectra[name].to(self.device)
                    sigma = spec.sigma.clone().requires_grad_(True)
                    self.sigma[name] = sigma
                    delta = spectral_delta(spec.V.T.contiguous(), sigma, spec.U, mod.scaling)
                else:
                    a = adapter.lora_a(name).to(self.device, torch.float32)
                    b = adapter.lora_b(name).to(self.device, torch.float32)
                    delta = _lora_delta(a, b, mod.scaling)
                self._patch(name).deltas.append(delta)
            for name, mod in adapter.embeddings.items():
                a = adapter.tensors[mod.a_key].to(self.device, torch.float32)
                b = adapter.tensors[mod.b_key].to(self.device, torch.float32)
                patch = self._patch(name)
                patch.deltas.append(_embedding_delta(patch.module, a, b, mod.scaling))
            for name, saved in adapter.saved_modules.items():
                patch = self._patch(name)
                own = dict(patch.module.named_parameters(recurse=False))
                values = {
                    p: adapter.tensors[k].to(self.device, own[p].dtype) for p, k in saved.tensors.items()
                }
                patch.weight = values["weight"]
                patch.bias = values.get("bias", own.get("bias"))
            for module, patch in self._patches.items():
                self._handles.append(module.register_forward_hook(patch.hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def _patch(self, name: str) -> _Patch:
        module = self.model.get_submodule(name)
        if module not in self._patches:
            self._patches[module] = _Patch(module)
        return self._patches[module]

    def _check_base_copies(self, adapter: LoraAdapter) -> None:
        for name, key in adapter.base_copies.items():
            weight = self.model.get_submodule(name).weight
            if not _same_values(adapter.tensors[key], weight):
                raise AdapterError(
                    f"{adapter.weights_path}: tensor {key!r} is a copy of the base layer {name!r} saved with the "
                    "adapter, and it differs from the base model's weight: PEFT would load the copy, vLLM uses "
                    "the base model's own, so the two would serve different functions. Use the base model the "
                    "adapter was trained on, or re-save the adapter without it (save_embedding_layers=False)"
                )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> AdaptedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextmanager
    def sigma_values(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Temporarily evaluate the model with other singular values (a candidate adapter)."""
        saved = {k: self.sigma[k].detach().clone() for k in values}
        with torch.no_grad():
            for k, v in values.items():
                self.sigma[k].copy_(v.to(self.sigma[k]))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    self.sigma[k].copy_(v)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        decoder = self.model.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for final hidden states (n, d): the adapted output embedding, then the model's
        own logit transforms. The product is formed from 16-bit operands with a float32 result."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            return finish_logits(self.model, head(hidden).float())
        patch = self._patches.get(head)
        weight, bias = head.weight, head.bias
        if patch is not None and patch.weight is not None:
            weight, bias = patch.weight, patch.bias
        logits = float32_linear(hidden, weight, bias)
        for delta in patch.deltas if patch is not None else ():
            logits = logits + delta(hidden).float()
        return finish_logits(self.model, logits)

    def answer_losses(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy (float32) of every answer token, with logits only where an answer token is predicted.

        Skipping the vocabulary projection at prompt and padding positions saves most of the memory
        and much of the time of a full forward pass with labels (see `activations`). The first call
        checks the logits against the model's own forward (check_logits).
        """
        self._check_logits_once(batch)
        return activations.answer_losses(self, batch)

    def backward_answer_loss(self, batch: Batch, total: float) -> torch.Tensor:
        """Backpropagate sum(answer-token losses of `batch`, weighted) / total into the sigma leaves; returns the
        (detached) losses. The first call checks the logits against the model's own forward."""
        self._check_logits_once(batch)
        return activations.backward_answer_loss(self, batch, total)

    def _check_logits_once(self, batch: Batch) -> None:
        if not self._logits_checked:
            self.check_logits(batch)
            self._logits_checked = True

    def _model_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            return self.model(**kwargs, logits_to_keep=cols).logits[0]
        return self.model(**kwargs).logits[0, cols]

    def check_logits(self, batch: Batch) -> float:
        """Compare our answer-position logits with the model's own `model(input_ids, attention_mask)`.

        Runs on the first example of `batch` (up to CHECK_POSITIONS answer positions), with the adapter
        applied, in whatever precision context the caller set. Returns the largest absolute difference.
        Raises SurgeryError naming the model class if the difference exceeds the rounding of the
        model's logits' dtype, or if either set of logits is not finite.
        """
        first = (batch.rows == 0).nonzero().squeeze(1)[:CHECK_POSITIONS]
        cols = batch.cols[first]
        length = int(cols.max()) + 1
        ids, mask = batch.input_ids[:1, :length], batch.attention_mask[:1, :length]
        with torch.no_grad():
            ours = self.output_logits(self._hidden(ids, mask)[0, cols])
            theirs = self._model_logits(ids, mask, cols)
        name = type(self.model).__name__
        if not (bool(torch.isfinite(theirs).all()) and bool(torch.isfinite(ours).all())):
            raise SurgeryError(
                f"{name}: the logits are not finite in {theirs.dtype} on {self.device} (overflow); run on the "
                "CPU (float32) or on a GPU with bfloat16"
            )
        diff = float((ours - theirs.float()).abs().max())
        largest = float(theirs.float().abs().max())
        tolerance = LOGIT_TOLERANCE.get(theirs.dtype, 3e-2) * max(largest, 0.1)
        if diff > tolerance:
            raise SurgeryError(
                f"{name}: the answer-position logits vllm-surgery computes differ from the model's own forward "
                f"by up to {diff:.4g} (largest logit {largest:.4g}, tolerance {tolerance:.3g} in {theirs.dtype}): "
                "this model class transforms its logits in a way vllm-surgery does not reproduce, so its "
                "sensitivities and held-out losses would be wrong. Please report the model class"
            )
        return diff
