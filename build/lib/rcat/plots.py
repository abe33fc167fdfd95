"""The trade-off a user chooses on, drawn once: RNFR against clean and against robust accuracy, with the Pareto frontier.

Used by the decide stage (``plots/frontier.png`` on the check's MLflow run), the update report and
``benchmarks/compare_methods.py``. matplotlib is imported only when a figure is drawn, and only its
object API (no pyplot: no global figure state in a long-lived process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FrontierPoint:
    """One candidate (or grid point) on one split: fractions in [0, 1]; ``*_interval`` its 95% interval, if known."""

    name: str
    accuracy: float
    robust_accuracy: float
    rnfr: float
    group: str = ""
    accuracy_interval: tuple[float, float] | None = None
    robust_accuracy_interval: tuple[float, float] | None = None
    rnfr_interval: tuple[float, float] | None = None


def pareto_mask(accuracy: Sequence[float], rnfr: Sequence[float]) -> list[bool]:
    """True for the points that no other point beats on both: higher (or equal) accuracy and lower
    (or equal) RNFR, strictly better on at least one. Ties keep both; NaN points are never on it."""
    points = list(zip(accuracy, rnfr, strict=True))
    keep = []
    for a, r in points:
        if a != a or r != r:  # NaN
            keep.append(False)
            continue
        dominated = any(a2 >= a and r2 <= r and (a2 > a or r2 < r) for a2, r2 in points if a2 == a2 and r2 == r2)
        keep.append(not dominated)
    return keep


def frontier_figure(points: Sequence[FrontierPoint], title: str, chosen: str | None = None, max_rnfr: float | None = None) -> Any:
    """Two panels, RNFR (y) against clean accuracy and against robust accuracy (x); the frontier dashed; error bars when known."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    groups = list(dict.fromkeys(point.group or point.name for point in points))
    markers = "osD^v<>pPX*h"
    for axis, field, label in ((axes[0], "accuracy", "clean accuracy"), (axes[1], "robust_accuracy", "robust accuracy")):
        for index, group in enumerate(groups):
            members = [p for p in points if (p.group or p.name) == group]
            xs = [100 * getattr(p, field) for p in members]
            ys = [100 * p.rnfr for p in members]
            xerr = [[100 * (getattr(p, field) - (getattr(p, f"{field}_interval") or (getattr(p, field),) * 2)[0]) for p in members],
                    [100 * ((getattr(p, f"{field}_interval") or (getattr(p, field),) * 2)[1] - getattr(p, field)) for p in members]]
            yerr = [[100 * (p.rnfr - (p.rnfr_interval or (p.rnfr, p.rnfr))[0]) for p in members],
                    [100 * ((p.rnfr_interval or (p.rnfr, p.rnfr))[1] - p.rnfr) for p in members]]
            star = any(p.name == chosen for p in members)
            axis.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=markers[index % len(markers)], capsize=2, alpha=0.85,
                          markersize=11 if star else 6, label=group + (" (promoted)" if star else ""))
        mask = pareto_mask([getattr(p, field) for p in points], [p.rnfr for p in points])
        front = sorted((getattr(p, field), p.rnfr) for p, keep in zip(points, mask, strict=True) if keep)
        if front:
            axis.plot([100 * x for x, _ in front], [100 * y for _, y in front], "k--", linewidth=0.8, label="Pareto frontier")
        if max_rnfr is not None:
            axis.axhline(100 * max_rnfr, color="grey", linestyle=":", linewidth=1, label=f"max_rnfr = {max_rnfr:g}")
        axis.set_xlabel(f"{label} (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("RNFR (%)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(title, fontsize=10)
    return figure
