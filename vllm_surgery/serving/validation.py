"""Whether an adapter directory can be served by THIS server: one check, used by the resolver, hot-swap,
the adapter listing and the guarded runtime-load route, so that what the listing calls servable is
exactly what a swap accepts.

An adapter that `load_adapter` accepts (valid PEFT files, finite tensors, shapes that agree with its
own rank) can still break a running server:

- a rank above the server's ``--max-lora-rank`` makes the engine refuse the load;
- tensors that fit their own rank but not the base model (``lora_A`` with 96 input features for a
  128-wide layer) are served silently or fail inside the engine;
- finite weights too large for the serving dtype overflow inside the engine: vLLM 0.32 then answered
  400 for that adapter and for the next request to another adapter.

`AdapterValidator.validate` checks all of these (against `ServingLimits`: the base model's layer
shapes from its configuration, the max rank and the serving dtype) and caches the verdict per
(resolved path, inode, size, mtime) of the adapter's files, so listing many versions stays cheap.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, load_adapter
from ..base_model import LayerShape, check_adapter_fits
from ..errors import AdapterError

# The overflow bound. vLLM computes a LoRA layer in the serving dtype as (x @ A^T) @ (s * B)^T, with
# the scaling s folded into B when the adapter is loaded. For one input row x:
#   |(A x)_i|      <= ||A x||_2      <= sigma_max(A) * ||x||_2           (the intermediate)
#   |(s B A x)_i|  <= ||s B A x||_2  <= sigma_max(s * B @ A) * ||x||_2   (the update added to W x)
# so nothing overflows while max(sigma_max(A), sigma_max(s B A)) * ||x||_2 stays below the dtype's
# largest finite value. ||x||_2 = sqrt(in_features) * rms(x). The inputs of adapted projections are
# RMSNorm outputs (q/k/v/gate/up: rms about the mean |gamma|, O(1)) or attention / SwiGLU outputs
# (o/down: rms O(1)-O(10) in trained models; single outlier channels reach 1e3 but the RMS of a row
# stays far below 1e2). With rms(x) <= 100 the bound is a worst case (input aligned with the top
# singular vector) that a trained adapter passes by orders of magnitude: in float16 (max 65504) a
# 4096-wide layer allows sigma_max up to ~10, where trained LoRA updates have sigma_max of ~0.01-1;
# in bfloat16/float32 (max ~3.4e38) only absurd weights (like 1e30 entries) are refused.
ACTIVATION_RMS_BOUND = 100.0
CACHE_SIZE = 1024


@dataclass(frozen=True)
class ServingLimits:
    """What the running engine accepts. None means unknown (that check is not made; the engine's own
    check then applies, and start-up logs say which checks are off)."""

    max_rank: int | None = None
    dtype: torch.dtype | None = None
    shapes: Mapping[str, LayerShape] | None = None


def _largest_singular_value(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2)) if m.numel() else 0.0


def check_overflow(adapter: LoraAdapter, dtype: torch.dtype) -> None:
    """Raise AdapterError naming the tensor or module whose values overflow `dtype` when served."""
    if not dtype.is_floating_point:
        return
    limit = float(torch.finfo(dtype).max)
    where = adapter.path / WEIGHTS_NAME
    for name, mod in adapter.modules.items():
        a = adapter.tensors[mod.a_key].double()
        b_scaled = adapter.tensors[mod.b_key].double() * mod.scaling
        for key, t, what in ((mod.a_key, a, ""), (mod.b_key, b_scaled, f" x scaling {mod.scaling:g}")):
            if not bool(torch.isfinite(t.to(dtype)).all()):
                raise AdapterError(
                    f"{where}: tensor {key!r}{what} has values beyond {dtype}'s largest finite value "
                    f"{limit:.4g} (largest |value| {float(t.abs().max()):.4g}); this server computes in {dtype}"
                )
        sigma_a = _largest_singular_value(a)
        # sigma_max(s B A) from the r x r core: B = Qb Rb, A^T = Qa Ra  =>  s B A = Qb (Rb Ra^T) Qa^T
        core = torch.linalg.qr(b_scaled).R @ torch.linalg.qr(a.T).R.T
        sigma_update = _largest_singular_value(core)
        worst = max(sigma_a, sigma_update) * math.sqrt(mod.in_features) * ACTIVATION_RMS_BOUND
        if not worst <= limit:
            raise AdapterError(
                f"{where}: module {name!r} overflows {dtype} when served: largest singular value "
                f"{sigma_update:.4g} of the update (scaling x lora_B @ lora_A) and {sigma_a:.4g} of lora_A "
                f"can reach {worst:.4g} for an input of RMS {ACTIVATION_RMS_BOUND:g}, above {dtype}'s "
                f"largest finite value {limit:.4g}"
            )


def check_limits(adapter: LoraAdapter, limits: ServingLimits) -> None:
    """Raise AdapterError if the loaded `adapter` exceeds the server's rank, shapes or dtype."""
    if limits.max_rank is not None:
        ranks = {name: mod.rank for name, mod in adapter.modules.items()}
        # vLLM compares max(r, *rank_pattern.values()) with --max-lora-rank (lora/peft_helper.py)
        ranks["r (adapter_config.json)"] = int(adapter.config["r"])
        for pattern, r in (adapter.config.get("rank_pattern") or {}).items():
            if isinstance(r, int):
                ranks[f"rank_pattern {pattern!r}"] = r
        where, rank = max(ranks.items(), key=lambda kv: kv[1])
        if rank > limits.max_rank:
            raise AdapterError(
                f"{adapter.path}: rank {rank} ({where}) exceeds this server's --max-lora-rank "
                f"{limits.max_rank}; restart the server with --max-lora-rank {rank} or more to serve it"
            )
    if limits.shapes is not None:
        check_adapter_fits(adapter, limits.shapes)
    if limits.dtype is not None:
        check_overflow(adapter, limits.dtype)


def _fingerprint(path: Path) -> tuple:
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = (path / name).stat()
        except OSError:
            out.append((name, None))
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_contained(path: Path, inside: Path) -> Path:
    """`path` resolved, after checking that it and the files in it do not lead outside `inside`
    (a symlinked version directory or weights file pointing out of the store). Raises AdapterError."""
    base = inside.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(base) or resolved == base:
        raise AdapterError(f"{path}: resolves to {resolved}, outside {base}")
    if resolved.is_dir():
        for entry in resolved.iterdir():
            target = entry.resolve()
            if not target.is_relative_to(resolved):
                raise AdapterError(f"{entry}: a link to {target}, outside the version directory {resolved}")
    return resolved


class AdapterValidator:
    """Validates adapter directories against `limits`, caching verdicts by the files' identity."""

    def __init__(self, limits: ServingLimits | None = None) -> None:
        self.limits = limits or ServingLimits()
        self._cache: OrderedDict[tuple, tuple[bool, str]] = OrderedDict()
        self._lock = threading.Lock()

    def configure(self, limits: ServingLimits) -> None:
        """New limits (the engine's, known at init_state); forgets every cached verdict."""
        with self._lock:
            self.limits = limits
            self._cache.clear()

    def validate(self, path: Path, inside: Path | None = None) -> str:
        """The content hash of the servable adapter at `path` (blocking: reads the files once per change).

        `inside`: a directory the adapter and its files must not leave (the store). Raises AdapterError
        saying what is wrong (the same message every time for unchanged files).
        """
        resolved = check_contained(path, inside) if inside is not None else path.resolve()
        key = (str(resolved), _fingerprint(resolved))
        with self._lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
        if verdict is None:
            try:
                adapter = load_adapter(path)
                check_limits(adapter, self.limits)
                verdict = (True, adapter.content_hash())
            except AdapterError as e:
                verdict = (False, str(e))
            with self._lock:
                self._cache[key] = verdict
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        ok, text = verdict
        if not ok:
            raise AdapterError(text)
        return text
