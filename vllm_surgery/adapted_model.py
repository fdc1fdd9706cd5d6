"""A transformers causal LM with a LoRA adapter applied through forward hooks.

Hooks rather than PEFT wrappers because the edited modules must be expressed as
`s * U diag(sigma) V^T` with sigma a free tensor, and because the base model must stay untouched:
the same loaded model serves the sensitivity pass, every held-out evaluation and, in the server,
later refinements. No parameter of the model ever requires a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .adapter import LoraAdapter
from .calibration import Batch
from .errors import AdapterError
from .spectral import Spectrum


class AdaptedModel:
    """`model` with `adapter` applied; modules in `spectra` use a free `sigma[name]` (float32 leaf)."""

    def __init__(self, model: torch.nn.Module, adapter: LoraAdapter, spectra: Mapping[str, Spectrum]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.sigma: dict[str, torch.Tensor] = {}
        self._handles = []
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for name, mod in adapter.modules.items():
                linear = self._linear(name, mod.in_features, mod.out_features)
                if name in spectra:
                    spec = spectra[name].to(self.device)
                    sigma = spec.sigma.clone().requires_grad_(True)
                    self.sigma[name] = sigma
                    hook = _spectral_hook(spec.V.T.contiguous(), sigma, spec.U, mod.scaling)
                else:
                    a = adapter.lora_a(name).to(self.device, torch.float32)
                    b = adapter.lora_b(name).to(self.device, torch.float32)
                    hook = _lora_hook(a, b, mod.scaling)
                self._handles.append(linear.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise

    def _linear(self, name: str, d_in: int, d_out: int) -> torch.nn.Module:
        try:
            linear = self.model.get_submodule(name)
        except AttributeError as e:
            raise AdapterError(f"adapter module {name!r} does not exist in the base model") from e
        shape = (getattr(linear, "in_features", None), getattr(linear, "out_features", None))
        if shape != (d_in, d_out):
            raise AdapterError(
                f"adapter module {name!r} maps {d_in} -> {d_out} features but the base model's layer is "
                f"{shape[0]} -> {shape[1]}: the adapter was trained for another base model"
            )
        return linear

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

    def answer_losses(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy of every answer token, computing logits only where an answer token is predicted.

        Skipping the vocabulary projection at prompt and padding positions saves most of the memory
        and much of the time of a full forward pass with labels.
        """
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        picked = hidden[batch.rows, batch.cols]
        logits = self.model.get_output_embeddings()(picked).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, batch.targets, reduction="none")


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scaling: float):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        delta = F.linear(F.linear(x.to(a.dtype) if not torch.is_autocast_enabled(x.device.type) else x, a), b)
        return output + (scaling * delta).to(output.dtype)

    return hook


def _spectral_hook(vt: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, scaling: float):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        z = F.linear(x.to(vt.dtype) if not torch.is_autocast_enabled(x.device.type) else x, vt)
        delta = F.linear(z * sigma.to(z.dtype), u)
        return output + (scaling * delta).to(output.dtype)

    return hook
