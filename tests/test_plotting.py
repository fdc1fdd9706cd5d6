"""plot_report: a PNG from a refinement report, written atomically; bad reports fail clearly."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest

from vllm_surgery.plotting import plot_report, short_module_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_report(decision: str = "accept", r: int = 4) -> dict:
    """A report shaped like SurgeryResult.to_dict(): three modules of rank r, three candidates."""
    modules = {}
    for layer, leaf in ((0, "self_attn.o_proj"), (1, "self_attn.o_proj"), (10, "mlp.down_proj")):
        sigma = [2.0 / (k + 1) for k in range(r)]
        factors = [1.2, 1.0, 0.9, 0.7][:r] + [1.0] * max(0, r - 4)
        sensitivity = [(-1) ** k * 0.01 * (k + 1) * (layer + 1) for k in range(r)]
        modules[f"model.layers.{layer}.{leaf}"] = {
            "rank": r,
            "scaling": 2.0,
            "sigma": sigma,
            "sigma_new": [s * f for s, f in zip(sigma, factors, strict=True)],
            "sensitivity": sensitivity,
        }
    return {
        "method": "spectral-surgery",
        "decision": decision,
        "reason": "grad_direction lowers held-out answer loss from 0.5000 to 0.4800 (+4.00%; margin 0.50%)",
        "policy": "grad_direction",
        "constraint": "l1",
        "quality_before": {"loss": 0.5, "answer_tokens": 160, "perplexity": math.exp(0.5)},
        "quality_after": {"loss": 0.48, "answer_tokens": 160, "perplexity": math.exp(0.48)},
        "candidates": {
            "grad_direction": {"loss": 0.48, "relative_improvement": 0.04, "relative_improvement_se": 0.01},
            "abs_select": {"loss": 0.499, "relative_improvement": 0.002, "relative_improvement_se": 0.004},
            "smooth_abs": {"loss": 0.505, "relative_improvement": -0.01, "relative_improvement_se": 0.005},
        },
        "config": {"min_improvement": 0.005},
        "modules": modules,
    }


def check_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # three panels with colour maps, not an empty canvas
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_plot_report_writes_png(tmp_path: Path) -> None:
    out = plot_report(synthetic_report(), tmp_path / "surgery.png")
    assert out == tmp_path / "surgery.png"
    check_png(out)


@pytest.mark.parametrize("decision", ["keep_original", "forced"])
def test_plot_report_other_decisions_and_replacement(tmp_path: Path, decision: str) -> None:
    target = tmp_path / "sub" / "surgery.png"
    plot_report(synthetic_report(), target)  # creates the folder
    plot_report(synthetic_report(decision), target)  # replaces the file in place
    check_png(target)


def test_plot_report_without_heldout_and_mixed_ranks(tmp_path: Path) -> None:
    report = synthetic_report()
    report["quality_before"] = report["quality_after"] = None
    report["candidates"] = {}
    report["modules"]["model.layers.3.mlp.down_proj"] = synthetic_report(r=2)["modules"][
        "model.layers.0.self_attn.o_proj"
    ]
    report["modules"]["model.layers.0.self_attn.o_proj"]["sigma"][3] = 0.0  # ratio undefined: drawn blank
    check_png(plot_report(report, tmp_path / "p.png"))


def test_plot_report_accepts_a_surgery_result_like_object(tmp_path: Path) -> None:
    class Result:
        def to_dict(self) -> dict:
            return synthetic_report()

    check_png(plot_report(Result(), tmp_path / "r.png"))  # type: ignore[arg-type]


def test_missing_modules_raises_value_error(tmp_path: Path) -> None:
    report = synthetic_report()
    del report["modules"]
    with pytest.raises(ValueError, match="modules"):
        plot_report(report, tmp_path / "bad.png")
    assert not any(tmp_path.iterdir()), "nothing may be written for a bad report"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda m: m.pop("sigma_new"),
        lambda m: m["sensitivity"].pop(),
        lambda m: m.__setitem__("sigma", "not a list"),
    ],
    ids=["missing sigma_new", "length mismatch", "not numbers"],
)
def test_inconsistent_module_raises_value_error(tmp_path: Path, breakage) -> None:
    report = copy.deepcopy(synthetic_report())
    breakage(report["modules"]["model.layers.1.self_attn.o_proj"])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj"):
        plot_report(report, tmp_path / "bad.png")


def test_non_mapping_report_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SurgeryResult"):
        plot_report([1, 2, 3], tmp_path / "bad.png")  # type: ignore[arg-type]


def test_short_module_name() -> None:
    assert short_module_name("model.layers.12.self_attn.o_proj") == "L12.o_proj"
    assert short_module_name("base_model.model.model.layers.3.mlp.down_proj") == "L3.down_proj"
    assert short_module_name("lm_head") == "lm_head"


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.colors", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"vllm-surgery\[demo\]"):
        plot_report(synthetic_report(), tmp_path / "x.png")
    assert not any(tmp_path.iterdir())
