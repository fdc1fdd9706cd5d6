"""SurgeryConfig: every setting of a refinement, validated up front, and which modules it edits."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .gate import STATISTICS as GATE_STATISTICS
from .policies import AUTO_POLICIES, CONSTRAINTS, POLICIES, SEARCHED_POLICIES, policy_params

SCOPES: dict[str, tuple[str, ...]] = {
    # The residual-stream writers: the paper's default and its best-behaved scope.
    "residual": ("o_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
_LAYER = re.compile(r"\.(\d+)\.")
_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")
SEED_LIMIT = 2**63  # torch.manual_seed takes seeds below 2^63
# Settings that existed once, with what took their place (named in the error a stale caller gets).
_REPLACED = {"min_z": "max_false_accept (the gate's false-acceptance probability, default 0.025)"}


def _setting(
    default: Any = MISSING, *, help: str, affects_result: bool, cli: Mapping | None = None, **kw: Any
):
    """A SurgeryConfig field with its help text (also the CLI's), whether it changes refine()'s result,
    and how the CLI exposes it (`cli`: argparse keywords plus "flag"; None: not a plain CLI option)."""
    metadata: dict[str, Any] = {"help": help, "affects_result": affects_result}
    if cli is not None:
        metadata["cli"] = dict(cli)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class SurgeryConfig:
    """Settings of one refinement. Defaults are the paper's headline configuration plus our safety check.

    Every field is checked when the config is built (from Python, the CLI or the server's HTTP route);
    a bad value raises ConfigError naming the field, the value and what is expected. Each field's help
    text is in its metadata (`dataclasses.fields(SurgeryConfig)`); `result_fields()` names the fields
    that change what refine() computes.
    """

    policy: str = _setting(
        "grad_direction",
        help="how sensitivities become new singular values: "
        f"{' | '.join(POLICIES)} | auto (tries {', '.join(AUTO_POLICIES)}; the lowest loss on the selection "
        "split is the one candidate the gate tests). grad_direction is the paper's fixed step; grad_search "
        "chooses its step on the selection split; sigma_descent takes several small steps on the "
        "singular values, each from a fresh sensitivity pass, stopped on the selection split",
        affects_result=True,
        cli={"choices": ["auto", *POLICIES]},
    )
    policy_params: Mapping[str, Any] = _setting(
        help="overrides of the policy's parameters, e.g. {'eta_s': 1.0}; with auto, a mapping from policy "
        "name to overrides, e.g. {'grad_direction': {'eta_s': 1.0}}",
        affects_result=True,
        default_factory=dict,
    )
    constraint: str = _setting(
        "l1",
        help="magnitude kept per module: l1 (nuclear norm), l2 (Frobenius norm) or none (unsafe)",
        affects_result=True,
        cli={"choices": list(CONSTRAINTS)},
    )
    modules: str | list[str] = _setting(  # noqa: RUF009 (a str default, normalised in __post_init__)
        "residual",
        help="residual|attention|mlp|all or NAME,NAME,...",
        affects_result=True,
        cli={},
    )
    layers: tuple[int | None, int | None] | None = _setting(
        None,
        help="layer range START:END (half open)",
        affects_result=True,
        cli={},
    )
    heldout_fraction: float = _setting(
        0.25,
        help="share of the calibration examples held out to measure every candidate, in [0, 1)",
        affects_result=True,
        cli={"type": float},
    )
    selection_fraction: float = _setting(
        0.15,
        help="share of the calibration examples set aside to choose step sizes, stop iterations and pick "
        "among auto's candidates, in [0, 1); neither the sensitivity pass nor the gate sees them (used only "
        "by grad_search, sigma_descent and auto)",
        affects_result=True,
        cli={"type": float},
    )
    correction_weight: float = _setting(
        1.0,
        help='weight of calibration lines labelled "feedback": "correction" in the loss the sensitivity '
        "passes differentiate (a correction marks where the adapter is wrong); selection and gate losses "
        "stay unweighted",
        affects_result=True,
        cli={"type": float},
    )
    min_improvement: float = _setting(
        0.005,
        help="relative held-out loss gain required",
        affects_result=True,
        cli={"type": float},
    )
    min_loss_reduction: float = _setting(
        0.001,
        help="held-out loss reduction (nats per answer token) required as well: a large relative gain on a "
        "loss that is already near zero changes no answer (0 switches this floor off)",
        affects_result=True,
        cli={"type": float},
    )
    max_false_accept: float = _setting(
        0.025,
        help="largest acceptable probability that a candidate no better than the original replaces it "
        "(one-sided sign-flip test, corrected for the number of candidates; 1 switches the test off)",
        affects_result=True,
        cli={"type": float},
    )
    gate_statistic: str = _setting(
        "both",
        help="what the gate's sign-flip test sums over held-out examples: both (default: the candidate must "
        "pass on the loss differences and on their signed ranks, so the loss falls on average and on most "
        "examples), t (the differences alone: a few large gains can outweigh many small losses) or "
        "signed_rank (Wilcoxon signed ranks alone: many small gains can outweigh a few large losses)",
        affects_result=True,
        cli={"choices": list(GATE_STATISTICS)},
    )
    samples: int | None = _setting(
        None,
        help="use N examples of the calibration file",
        affects_result=True,
        cli={"type": int},
    )
    max_length: int = _setting(
        1024,
        help="longest example in tokens; longer prompts lose tokens on the left, never answer tokens",
        affects_result=True,
        cli={"type": int},
    )
    max_batch_tokens: int | None = _setting(
        None,
        help="token budget per batch (default: planned from free GPU memory and the model's shape on CUDA, 512 on the CPU; an out-of-memory batch halves it for the rest of the run)",
        affects_result=False,
        cli={"flag": "--batch-tokens", "type": int, "metavar": "BATCH_TOKENS"},
    )
    device: str = _setting("auto", help="auto|cpu|cuda[:N]", affects_result=False, cli={})
    seed: int = _setting(
        0,
        help="seeds sampling, the held-out split, random_index and the gate's random sign flips",
        affects_result=True,
        cli={"type": int},
    )
    force: bool = _setting(
        False,
        help="write the refined adapter even if it does not win",
        affects_result=False,
        cli={"action": "store_true"},
    )
    progress: bool = _setting(True, help="show progress bars", affects_result=False)

    def __post_init__(self) -> None:
        self.policy = _choice("policy", self.policy, ("auto", *POLICIES))
        self.constraint = _choice("constraint", self.constraint, CONSTRAINTS)
        self.gate_statistic = _choice("gate_statistic", self.gate_statistic, GATE_STATISTICS)
        self.policy_params = _policy_overrides(self.policy, self.policy_params)
        self.modules = _modules(self.modules)
        self.layers = _layers(self.layers)
        self.heldout_fraction = _number("heldout_fraction", self.heldout_fraction, "a number in [0, 1)", 0, 1)
        self.selection_fraction = _number(
            "selection_fraction", self.selection_fraction, "a number in [0, 1)", 0, 1
        )
        self.correction_weight = _number(
            "correction_weight",
            self.correction_weight,
            "a number in (0, 100]",
            0,
            100,
            low_open=True,
            high_open=False,
        )
        self.min_improvement = _number("min_improvement", self.min_improvement, "a number in [0, 1)", 0, 1)
        self.min_loss_reduction = _number(
            "min_loss_reduction", self.min_loss_reduction, "a finite number >= 0", 0, math.inf
        )
        self.max_false_accept = _number(
            "max_false_accept",
            self.max_false_accept,
            "a probability in (0, 1]",
            0,
            1,
            low_open=True,
            high_open=False,
        )
        self.samples = _integer("samples", self.samples, "a positive integer or None", 1, optional=True)
        self.max_length = _integer("max_length", self.max_length, "an integer >= 2", 2)
        self.max_batch_tokens = _integer(
            "max_batch_tokens", self.max_batch_tokens, "a positive integer or None", 1, optional=True
        )
        self.seed = _integer("seed", self.seed, "an integer in [0, 2**63)", 0, SEED_LIMIT)
        for name in ("force", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.policy == "auto" and self.heldout_fraction == 0:
            raise ConfigError(
                "policy auto tests its candidate on held-out data; heldout_fraction must be > 0"
            )
        searched = [p for p in self.candidate_params() if p in SEARCHED_POLICIES]
        if (self.policy == "auto" or searched) and self.selection_fraction == 0:
            raise ConfigError(
                f"policy {self.policy} chooses on the selection split; selection_fraction must be > 0"
            )
        if (self.policy == "auto" or searched) and self.heldout_fraction + self.selection_fraction >= 1:
            raise ConfigError(
                f"heldout_fraction ({self.heldout_fraction:g}) + selection_fraction ({self.selection_fraction:g}) "
                "must be below 1: the sensitivity pass needs examples of its own"
            )

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> SurgeryConfig:
        """A config from keyword settings (refine(**settings), a JSON body); unknown names raise ConfigError."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in settings if k not in known)
        if unknown:
            hints = "".join(f"; {k} was replaced by {_REPLACED[k]}" for k in unknown if k in _REPLACED)
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)} (settings: {', '.join(known)}){hints}"
            )
        return cls(**settings)

    @classmethod
    def result_fields(cls) -> tuple[str, ...]:
        """Names of the fields that change what refine() computes (a cache key needs exactly these).

        The others (max_batch_tokens, device, force, progress) change speed, float rounding, or
        whether a losing candidate is written, not the candidates or the decision.
        """
        return tuple(f.name for f in fields(cls) if f.metadata["affects_result"])

    def candidate_params(self) -> dict[str, dict[str, Any]]:
        """Policy name -> parameter overrides for every policy this config will try."""
        if self.policy != "auto":
            return {self.policy: dict(self.policy_params)}
        return {p: dict(self.policy_params.get(p, {})) for p in AUTO_POLICIES}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy_params"] = {
            k: dict(v) if isinstance(v, Mapping) else v for k, v in self.policy_params.items()
        }
        return d


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}: {name} must be one of {', '.join(allowed)}")
    return value


def _number(
    name: str,
    value: Any,
    expected: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    """A finite real number (not a bool, not a string) within [low, high) or the bounds given."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def _integer(
    name: str, value: Any, expected: str, low: int, high: int | None = None, *, optional: bool = False
) -> int | None:
    """An integer (not a bool, float or string) with low <= value < high; None only when optional."""
    if value is None and optional:
        return None
    if not _is_integer(value) or value < low or (high is not None and value >= high):
        raise ConfigError(f"{name} must be {expected}; got {value!r}")
    return int(value)


def _policy_overrides(policy: str, params: Any) -> dict[str, Any]:
    """Validated overrides as plain floats: {name: value}, or with auto {policy: {name: value}}."""
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"policy_params must be a mapping of parameter names to numbers, e.g. {{'eta_s': 1.0}}; got {params!r}"
        )
    if policy != "auto":
        checked = policy_params(policy, params)
        return {key: checked[key] for key in params}
    unknown = sorted(map(str, set(params) - set(AUTO_POLICIES)))
    if unknown:
        raise ConfigError(
            f"with policy auto, policy_params maps policy names ({', '.join(AUTO_POLICIES)}) to "
            f"overrides; unknown: {', '.join(unknown)}"
        )
    out = {}
    for name, overrides in params.items():
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"policy_params[{name!r}] must be a mapping of {name}'s parameter names to numbers; "
                f"got {overrides!r}"
            )
        out[name] = _policy_overrides(name, overrides)
    return out


def _modules(value: Any) -> str | list[str]:
    expected = f"a scope ({', '.join(SCOPES)}, all), comma-separated module names or a list of module names"
    if isinstance(value, str):
        names = [m.strip() for m in value.split(",") if m.strip()]
        if len(names) == 1 and "," not in value and names[0] in (*SCOPES, "all"):
            return names[0]
    elif isinstance(value, (list, tuple)) and all(isinstance(m, str) for m in value):
        names = [m.strip() for m in value]
        if not all(names):
            raise ConfigError(f"modules must be {expected}; the list {value!r} holds an empty name")
    else:
        raise ConfigError(f"modules must be {expected}; got {value!r}")
    if not names:
        raise ConfigError(f"modules must be {expected}; got the empty {value!r}")
    return names


def _layers(value: Any) -> tuple[int | None, int | None] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_layers(value)
    ends_ok = isinstance(value, (list, tuple)) and len(value) == 2
    ends_ok = ends_ok and all(end is None or (_is_integer(end) and end >= 0) for end in value)
    if not ends_ok:
        raise ConfigError(
            "layers must be 'START:END' or [START, END] (a half-open range of layer indices >= 0, either "
            f"end may be None for open); got {value!r}"
        )
    return _check_range(
        None if value[0] is None else int(value[0]), None if value[1] is None else int(value[1]), value
    )


def _check_range(start: int | None, end: int | None, given: Any) -> tuple[int | None, int | None]:
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"layers {given!r} is empty (START must be below END)")
    return start, end


def parse_layers(text: str) -> tuple[int | None, int | None]:
    """'START:END' (half open, either side may be empty) or a single layer 'N'; indices are >= 0."""
    try:
        if ":" not in text:
            n = int(text)
            start, end = n, n + 1
        else:
            first, second = text.split(":", 1)
            start = int(first) if first.strip() else None
            end = int(second) if second.strip() else None
        if any(v is not None and v < 0 for v in (start, end)):
            raise ValueError(text)
    except ValueError as e:
        raise ConfigError(
            f"layers must look like START:END with layer indices >= 0, e.g. 4:12; got {text!r}"
        ) from e
    return _check_range(start, end, text)


def layer_index(module_name: str) -> int | None:
    m = _LAYER.search(module_name)
    return int(m.group(1)) if m else None


def select_modules(
    available: Iterable[str],
    modules: str | list[str],
    layers: tuple[int | None, int | None] | None = None,
) -> list[str]:
    """The adapter modules a scope and layer range select; an empty selection is an error, not a no-op."""
    available = sorted(available)
    if modules == "all":
        chosen = list(available)
    elif isinstance(modules, str):
        leaves = SCOPES[modules]
        chosen = [m for m in available if m.rsplit(".", 1)[-1] in leaves]
    else:
        chosen = []
        for wanted in modules:
            hits = [
                m
                for m in available
                if m == wanted or m.rsplit(".", 1)[-1] == wanted or m.endswith("." + wanted)
            ]
            if not hits:
                raise ConfigError(f"module {wanted!r} matches no module of the adapter")
            chosen.extend(h for h in hits if h not in chosen)
        chosen.sort()
    if layers is not None:
        lo, hi = layers
        chosen = [
            m
            for m in chosen
            if (i := layer_index(m)) is not None and (lo is None or i >= lo) and (hi is None or i < hi)
        ]
    if not chosen:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in available})
        raise ConfigError(
            f"scope {modules!r} with layers {layers} selects no module of this adapter "
            f"(it adapts: {', '.join(leaves)}); pass modules explicitly"
        )
    return chosen
