"""One picture of a refinement: what Spectral Surgery changed, why, and whether it paid off.

Why a picture: the JSON report of :func:`vllm_surgery.refine` holds thousands of numbers (r singular
values before and after, and r sensitivities, for every edited module, plus the held-out losses). A
reviewer deciding whether to trust a refined adapter wants to see at a glance (a) which modules and
components were amplified or suppressed and by how much, (b) whether those edits follow the
calibration gradient or are spread evenly (a flat sensitivity map means the calibration set barely
distinguishes the components), and (c) whether any candidate beat the original on held-out data by
the required margin, which is what the decision rests on.

matplotlib is an optional dependency (the ``demo`` extra), imported only when a plot is drawn. It is
used through its object-oriented API with the Agg canvas, never through ``pyplot``: drawing a report
neither needs a display nor changes the backend of a notebook or application that calls it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .refine import SurgeryResult

__all__ = ["plot_report", "short_module_name"]

INSTALL_HINT = "pip install 'vllm-surgery[demo]'"
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_MAX_TICK_LABELS = 64  # beyond this many modules, only every n-th row is labelled
_MAX_RATIO = 16.0  # colour range of panel (a): x1/16 .. x16


def short_module_name(name: str) -> str:
    """ "model.layers.12.self_attn.o_proj" -> "L12.o_proj"; names without a layer index keep their leaf."""
    leaf = name.rsplit(".", 1)[-1]
    m = _LAYER.search(name)
    return f"L{m.group(1)}.{leaf}" if m else leaf


def plot_report(report: Mapping[str, Any] | SurgeryResult, path: str | os.PathLike) -> Path:
    """Draw a refinement report as a PNG at `path` (written atomically) and return the path.

    Panels: (a) sigma_new / sigma per edited module and component (diverging colours centred at 1:
    red amplified, blue suppressed); (b) the sensitivity g = dL/dsigma normalised per module by
    mean(|g|), the quantity every policy acts on (red: raising sigma_k raises the loss); (c) the
    held-out answer loss of the original adapter and of every candidate policy, with the line a
    candidate had to get under to be accepted, and the decision in the title.

    Args:
        report: A :class:`~vllm_surgery.refine.SurgeryResult` or its ``to_dict()`` (e.g. the
            ``report.json`` a refinement wrote).
        path: Where the PNG goes; its folder is created if needed. An existing file is replaced only
            once the new one is complete (temporary file in the same folder, then ``os.replace``).

    Raises:
        ValueError: The report lacks ``modules`` or a module's arrays are missing or inconsistent.
        ImportError: matplotlib is not installed.
    """
    data = _as_mapping(report)
    names, ratio, sens = _module_arrays(data)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            f"plot_report needs matplotlib, which is not installed; install it with `{INSTALL_HINT}` "
            "(or `pip install matplotlib`)"
        ) from e

    n_mod = len(names)
    heat_h = min(max(3.6, 0.16 * n_mod + 1.0), 16.0)
    fig = Figure(figsize=(15.0, heat_h + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 3, width_ratios=(1.0, 1.0, 0.9))
    ax_ratio, ax_sens, ax_loss = (fig.add_subplot(grid[0, i]) for i in range(3))

    # (a) sigma_new / sigma on a log scale centred at 1, so that x2 and x0.5 look equally strong.
    shown, limit_ratio = _log_symmetric(ratio)
    im = ax_ratio.imshow(
        shown,
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r",
        norm=LogNorm(vmin=1.0 / limit_ratio, vmax=limit_ratio),
    )
    clipped = any(
        v == 0 or (math.isfinite(v) and max(v, 1.0 / v) > limit_ratio) for row in ratio for v in row
    )
    bar = fig.colorbar(
        im,
        ax=ax_ratio,
        label="sigma_new / sigma (log scale)",
        shrink=0.9,
        extend="both" if clipped else "neither",
    )
    ticks = _ratio_ticks(limit_ratio)
    bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    bar.minorticks_off()
    policy = data.get("policy")
    applied = {"accept": "written", "forced": "written (forced)", "keep_original": "not written"}
    detail = f"{policy}, {applied.get(str(data.get('decision')), '?')}" if policy else ""
    ax_ratio.set_title("(a) singular values after / before" + (f"\n({detail})" if detail else ""))
    _label_heatmap(ax_ratio, names, len(ratio[0]))

    # (b) normalised sensitivity, centred at 0; clipped at the 98th percentile so one outlier
    # does not wash out every other module.
    limit = _finite_absmax([v for row in sens for v in row], floor=1e-12, quantile=0.98)
    im = ax_sens.imshow(sens, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(im, ax=ax_sens, label="g / mean|g| (per module)", shrink=0.9)
    ax_sens.set_title("(b) sensitivity dL/dsigma, normalised")
    _label_heatmap(ax_sens, names, len(sens[0]))

    # (c) held-out losses and the decision.
    _loss_panel(ax_loss, data)

    reason = str(data.get("reason") or "")
    if reason:
        fig.suptitle("\n".join(textwrap.wrap(reason, 150)), fontsize=10)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return out


# --------------------------------------------------------------------------------------------------
# Checking the report
# --------------------------------------------------------------------------------------------------


def _as_mapping(report: Any) -> Mapping[str, Any]:
    if hasattr(report, "to_dict") and callable(report.to_dict):
        report = report.to_dict()
    if not isinstance(report, Mapping):
        raise ValueError(
            f"plot_report needs a SurgeryResult or its to_dict() mapping, got {type(report).__name__}"
        )
    return report


def _floats(values: Any, what: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"report: {what} must be a non-empty list of numbers")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"report: {what} must be a list of numbers ({e})") from e


def _module_arrays(
    data: Mapping[str, Any],
) -> tuple[list[str], list[list[float]], list[list[float]]]:
    """Module labels and the two heat maps as row lists, NaN-padded to the largest rank."""
    modules = data.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError(
            "report has no 'modules' (a non-empty mapping from module name to sigma, sigma_new and "
            "sensitivity); pass SurgeryResult.to_dict() or the report.json of a refinement"
        )
    names: list[str] = []
    ratios: list[list[float]] = []
    sens: list[list[float]] = []
    for name in sorted(modules, key=_module_sort_key):
        mod = modules[name]
        if not isinstance(mod, Mapping):
            raise ValueError(f"report: modules[{name!r}] must be a mapping")
        sigma = _floats(mod.get("sigma"), f"modules[{name!r}].sigma")
        sigma_new = _floats(mod.get("sigma_new"), f"modules[{name!r}].sigma_new")
        g = _floats(mod.get("sensitivity"), f"modules[{name!r}].sensitivity")
        if not len(sigma) == len(sigma_new) == len(g):
            raise ValueError(
                f"report: modules[{name!r}] has {len(sigma)} sigma, {len(sigma_new)} sigma_new and "
                f"{len(g)} sensitivity values; they must match"
            )
        ratios.append([b / a if a > 0 else math.nan for a, b in zip(sigma, sigma_new, strict=True)])
        scale = sum(abs(v) for v in g) / len(g)
        sens.append([v / scale if scale > 0 else 0.0 for v in g])
        names.append(short_module_name(str(name)))
    width = max(len(row) for row in ratios)
    pad = lambda row: row + [math.nan] * (width - len(row))  # noqa: E731
    return names, [pad(r) for r in ratios], [pad(r) for r in sens]


def _module_sort_key(name: str) -> tuple[int, str]:
    """Layer order (L2 before L10), then name."""
    m = _LAYER.search(name)
    return (int(m.group(1)) if m else -1, name)


def _log_symmetric(ratio: list[list[float]]) -> tuple[list[list[float]], float]:
    """Ratios clipped to [1/m, m], m the largest factor either way (at least 1.01, at most 16).

    grad_direction can suppress a component by e^-8 or more while it rarely amplifies one by more
    than x4: a range set by the extreme suppressions would wash out every amplification, so factors
    beyond x16 either way share the end colours (the colour bar then shows arrows). A component set
    to exactly 0 is drawn fully suppressed; an undefined ratio (sigma = 0 before) is left blank.
    """
    positive = [v for row in ratio for v in row if math.isfinite(v) and v > 0]
    m = max([1.01, *positive, *(1.0 / v for v in positive)])
    m = min(m, _MAX_RATIO)
    shown = [[min(max(v, 1.0 / m), m) if math.isfinite(v) else math.nan for v in row] for row in ratio]
    return shown, m


def _ratio_ticks(m: float) -> list[float]:
    """Colour-bar ticks for [1/m, m]: powers of two when the range spans x2, else the ends and 1."""
    k = math.floor(math.log2(m) + 1e-9)
    if k < 1:
        return [1.0 / m, 1.0, m]
    step = max(1, math.ceil(k / 4))
    top = (k // step) * step
    return [2.0**e for e in range(-top, top + 1, step)]


def _finite_absmax(values: list[float], *, floor: float, quantile: float = 1.0) -> float:
    finite = sorted(abs(v) for v in values if math.isfinite(v))
    if not finite:
        return floor
    idx = min(len(finite) - 1, max(0, math.ceil(quantile * len(finite)) - 1))
    return max(finite[idx], floor)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _label_heatmap(ax: Any, names: list[str], width: int) -> None:
    step = max(1, math.ceil(len(names) / _MAX_TICK_LABELS))
    rows = list(range(0, len(names), step))
    ax.set_yticks(rows, [names[i] for i in rows], fontsize=7 if len(names) > 24 else 9)
    xstep = max(1, math.ceil(width / 16))
    ax.set_xticks(list(range(0, width, xstep)))
    ax.set_xlabel("component k (largest sigma first)")


def _loss_panel(ax: Any, data: Mapping[str, Any]) -> None:
    decision = str(data.get("decision") or "?")
    chosen = data.get("policy")
    before = data.get("quality_before")
    candidates = data.get("candidates")
    title = f"(c) decision: {decision}" + (f" ({chosen})" if chosen and decision != "keep_original" else "")
    ax.set_title(title)
    if not isinstance(before, Mapping) or "loss" not in before or not isinstance(candidates, Mapping):
        ax.text(
            0.5, 0.5, "no held-out check in this report", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_axis_off()
        return
    base = float(before["loss"])
    labels = ["original"]
    losses = [base]
    errors = [0.0]
    colours = ["0.55"]
    for policy, row in candidates.items():
        if not isinstance(row, Mapping) or "loss" not in row:
            continue
        labels.append(str(policy))
        losses.append(float(row["loss"]))
        se = row.get("relative_improvement_se")
        errors.append(float(se) * base if isinstance(se, (int, float)) and math.isfinite(se) else 0.0)
        won = policy == chosen and decision in ("accept", "forced")
        colours.append("tab:green" if won and decision == "accept" else ("tab:orange" if won else "tab:blue"))
    xs = list(range(len(labels)))
    ax.bar(xs, losses, color=colours, yerr=errors, capsize=4, error_kw={"elinewidth": 1})
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.set_ylabel("held-out answer loss (nats/token)")

    margin = (data.get("config") or {}).get("min_improvement")
    top = max(v + e for v, e in zip(losses, errors, strict=True))
    bottom = min(v - e for v, e in zip(losses, errors, strict=True))
    if isinstance(margin, (int, float)):
        bar_line = base * (1.0 - float(margin))
        ax.axhline(
            bar_line,
            color="tab:red",
            linestyle="--",
            linewidth=1.2,
            label=f"accept below ({100 * float(margin):.1f}% under the original)",
        )
        bottom = min(bottom, bar_line)
        ax.legend(loc="upper right", fontsize=8)
    span = max(top - bottom, 1e-3 * max(abs(top), 1e-9))
    ax.set_ylim(max(0.0, bottom - 0.6 * span), top + 1.0 * span)
    for x, v, e in zip(xs, losses, errors, strict=True):
        change = "" if x == 0 or base <= 0 else f"\nΔ {100 * (v - base) / base:+.2f}%"
        ax.annotate(
            f"{v:.4f}{change}",
            (x, v + e),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xlabel("error bars: SE of the paired difference\n(the y axis does not start at 0)", fontsize=7)
