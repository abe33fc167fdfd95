"""The update report: one self-contained HTML page per update check, built from the pipeline's outputs.

Contents, in reading order:

1. **Verdict** (``decision.json``): promote or reject, the candidate, the reasons, and every rule
   the promoted (or selected) candidate met or broke, with its value and threshold.
2. **Candidates table**, per evaluated split (confirmation split first): accuracy, robust accuracy,
   NFR, RNFR and S-NFR of each candidate with 95% percentile-bootstrap intervals over samples
   (:func:`rcat.statistics.bootstrap_interval` on the per-sample 0/1 indicators of its
   ``flips.parquet``: ``new_clean_correct``, ``new_robust``, ``negative_flip``,
   ``robust_negative_flip`` and ``negative_flip or robust_negative_flip``), the old model as
   reference row. Point estimates are checked against the candidate's ``metrics.json``.
3. **Trade-off plot** (:mod:`rcat.plots`): RNFR against clean and against robust accuracy per
   candidate on the confirmation split, the intervals as error bars, the Pareto frontier and the
   gate's ``max_rnfr`` as guides.
4. **Per-class counts** of negative flips (NF) and robustness negative flips (RNF) per candidate,
   by true class, on the confirmation split (table and bar plot).
5. **Gallery** of a few RNF samples of the promoted candidate (else the candidate selected on the
   selection split, else the raw update ``new``): the clean image, the old model's adversarial
   point (its attack failed) and the candidate's (its attack succeeded), with predictions.
   The report never attacks: each evaluation saved the adversarial points of its first RNF samples
   (``gallery.safetensors``, :func:`rcat.stages.attacking.write_gallery`), and the report checks
   each with one forward pass (inside the eps-ball, the recorded adversarial prediction), stating
   any disagreement in the caption.

Images are inline base64 PNG (matplotlib's Agg for plots, nearest-neighbour upscaling for
samples), styles inline, no script: the file opens anywhere, offline. The plot data also goes
to two CSV files that ``dvc plots show`` renders (``dvc.yaml``'s top-level ``plots:``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from rcat.config import Params
from rcat.data import load_split
from rcat.errors import InputError
from rcat.models import LoadedModel, load_model
from rcat.pixels import as_float_images
from rcat.results import GALLERY_FILE, GALLERY_SAMPLES, Layout
from rcat.runtime import resolve_device
from rcat.safe_io import atomic_path, read_json, read_parquet, read_tensors
from rcat.statistics import bootstrap_interval
from rcat.tracking import Tracker

CONFIDENCE = 0.95
GALLERY_SIZE = GALLERY_SAMPLES
"""Robustness-negative-flip samples shown in the gallery (at most: what each evaluation saves)."""
IMAGE_PIXELS = 112
"""Target side of a gallery image in pixels; images are upscaled by an integer factor (nearest)."""
METRIC_TOLERANCE = 1e-9

RATE_COLUMNS = {
    # metric -> how its per-sample 0/1 indicator is read from a flips frame
    "accuracy": lambda f: f["new_clean_correct"],
    "robust_accuracy": lambda f: f["new_robust"],
    "nfr": lambda f: f["negative_flip"],
    "rnfr": lambda f: f["robust_negative_flip"],
    "snfr": lambda f: f["negative_flip"] | f["robust_negative_flip"],
}
METRIC_JSON_KEYS = {"accuracy": "accuracy_new", "robust_accuracy": "robust_accuracy_new", "nfr": "nfr", "rnfr": "rnfr", "snfr": "snfr"}
HEADERS = {"accuracy": "Accuracy", "robust_accuracy": "Robust accuracy", "nfr": "NFR", "rnfr": "RNFR", "snfr": "S-NFR"}


def report_dir(layout: Layout) -> Path:
    return layout.root / "report"


def report_path(layout: Layout) -> Path:
    return report_dir(layout) / "report.html"


def tradeoff_csv(layout: Layout) -> Path:
    return report_dir(layout) / "tradeoff.csv"


def per_class_csv(layout: Layout) -> Path:
    return report_dir(layout) / "per_class_flips.csv"


# ---------------------------------------------------------------- figures


@dataclass(frozen=True)
class Estimate:
    """A rate over n samples with its bootstrap interval ``[low, high]`` (NaN when n = 0)."""

    value: float
    low: float
    high: float


def estimate(indicator: pd.Series | np.ndarray, seed: int = 0) -> Estimate:
    """Mean of a 0/1 indicator and its percentile-bootstrap interval at :data:`CONFIDENCE`."""
    values = np.asarray(indicator, dtype=float)
    if values.size == 0:
        return Estimate(math.nan, math.nan, math.nan)
    low, high = bootstrap_interval(values, confidence=CONFIDENCE, seed=seed)
    return Estimate(float(values.mean()), low, high)


def candidate_estimates(flips: pd.DataFrame, seed: int = 0) -> dict[str, Estimate]:
    """Every rate of :data:`RATE_COLUMNS` for one candidate on one split, plus the old model's
    ``accuracy_old`` / ``robust_accuracy_old`` (the reference row)."""
    out = {name: estimate(read(flips), seed) for name, read in RATE_COLUMNS.items()}
    out["accuracy_old"] = estimate(flips["old_clean_correct"], seed)
    out["robust_accuracy_old"] = estimate(flips["old_robust"], seed)
    return out


def per_class_counts(flips_by_candidate: dict[str, pd.DataFrame], class_names: list[str]) -> pd.DataFrame:
    """Negative and robustness negative flips per candidate and true class (one split's flips).

    Returns one row per (candidate, class) with columns ``candidate``, ``class_index``, ``class``,
    ``n_samples`` (samples of that class), ``negative_flips`` (#old correct and new wrong, clean)
    and ``robust_negative_flips`` (#old robust and new not robust); every class appears, with 0
    where it has no flip.
    """
    rows = []
    for candidate, flips in flips_by_candidate.items():
        labels = flips["label"].to_numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise InputError(f"flips of {candidate!r}: label {int(labels.max())} outside the {len(class_names)} classes of the manifest; "
                             "rerun 'dvc repro' from prepare")
        for index, name in enumerate(class_names):
            mask = labels == index
            rows.append({"candidate": candidate, "class_index": index, "class": name, "n_samples": int(mask.sum()),
                         "negative_flips": int(flips["negative_flip"].to_numpy()[mask].sum()),
                         "robust_negative_flips": int(flips["robust_negative_flip"].to_numpy()[mask].sum())})
    return pd.DataFrame(rows, columns=["candidate", "class_index", "class", "n_samples", "negative_flips", "robust_negative_flips"])


def read_flips(layout: Layout, candidate: str, split: str) -> pd.DataFrame | None:
    """A candidate's per-sample flips on one split, sorted by ``sample_index`` (None when not evaluated)."""
    path = layout.evaluation(candidate) / "flips.parquet"
    if not path.is_file():
        return None
    frame = read_parquet(path)
    return frame[frame["split"] == split].sort_values("sample_index").reset_index(drop=True)


def check_against_metrics(estimates: dict[str, Estimate], metrics: dict[str, Any] | None, n: int, where: Path) -> None:
    """The rates recomputed from flips must equal the stored ``metrics.json``: otherwise the two files are from different runs."""
    if metrics is None:
        return
    for name, key in METRIC_JSON_KEYS.items():
        stored = metrics.get(key)
        if stored is not None and abs(float(stored) - estimates[name].value) > METRIC_TOLERANCE:
            raise InputError(f"{where}: {key} = {stored} but its flips.parquet gives {estimates[name].value} over {n} samples; "
                             "the two files come from different runs, rerun 'dvc repro evaluate'")


# ---------------------------------------------------------------- gallery


@dataclass
class GalleryItem:
    """One RNF sample: the three images (base64 PNG) with predictions and how the recomputation went."""

    sample_index: int
    label: str
    clean_png: str
    old_png: str
    new_png: str
    old_prediction: str
    new_prediction: str
    new_clean_prediction: str
    old_linf: float
    new_linf: float
    notes: list[str] = field(default_factory=list)


def image_png(image: torch.Tensor, pixels: int = IMAGE_PIXELS) -> str:
    """A ``(C, H, W)`` image in [0, 1] as a base64 PNG, upscaled by an integer factor with nearest neighbours."""
    from PIL import Image

    array = (image.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array[:3].transpose(1, 2, 0), "RGB")
    scale = max(1, round(pixels / max(picture.size)))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _load(path: Path, params: Params, device: torch.device, stage: str) -> LoadedModel:
    if not path.is_file():
        raise InputError(f"{path}: not found; run the '{stage}' stage first (dvc repro {stage})")
    return load_model(path, device, params.trusted_factories())


def _model_path(layout: Layout, role: str) -> tuple[Path, str]:
    if role in {"old", "new"}:
        return layout.model(role), f"train_{role}"
    return layout.finetuned(role), f"finetune@{role}"


def _cached_outcomes(layout: Layout, role: str, split: str) -> pd.DataFrame:
    """The evaluated outcomes of ``role`` on ``split`` (old and new from the attack cache, methods from their evaluation)."""
    path = (layout.attack_cache if role in {"old", "new"} else layout.evaluation(role)) / "outcomes.parquet"
    frame = read_parquet(path)
    return frame[(frame["model"] == role) & (frame["split"] == split)].set_index("sample_index")


def _prediction(value: Any, classes: list[str]) -> str:
    index = int(value)
    return classes[index] if 0 <= index < len(classes) else str(index)


def build_gallery(params: Params, layout: Layout, candidate: str, split_name: str, flips: pd.DataFrame, classes: list[str],
                  size: int = GALLERY_SIZE) -> list[GalleryItem]:
    """Up to ``size`` RNF samples of ``candidate`` on ``split_name``, rendered from the adversarial points its
    evaluation saved (``gallery.safetensors``): nothing is attacked here.

    Each saved point is checked with one forward pass (no attack): it must lie in the attack's eps-ball
    and give the adversarial prediction the evaluation recorded, for the old model and for the
    candidate; a sample of ``flips`` that the evaluation did not save, or a point that does not
    reproduce, is shown with a note saying so instead of being hidden.
    """
    chosen = flips[flips["robust_negative_flip"]]
    if chosen.empty or size <= 0:
        return []
    if not layout.split(split_name).is_file():
        raise InputError(f"{layout.split(split_name)}: not found; run the 'prepare' stage first (dvc repro prepare)")
    split = load_split(layout.split(split_name))
    gallery_path = layout.evaluation(candidate) / GALLERY_FILE
    stage = "attack_cache" if candidate == "new" else f"evaluate@{candidate}"
    if not gallery_path.is_file():
        raise InputError(f"{gallery_path}: not found; rerun 'dvc repro {stage}' (evaluations save their gallery since this version)")
    saved, metadata = read_tensors(gallery_path)
    if metadata.get("split_digest") != split.digest:
        raise InputError(f"{gallery_path}: saved for another {split_name} split; rerun 'dvc repro {stage}'")
    saved_at = {int(index): row for row, index in enumerate(saved["sample_index"].tolist())}
    position_of = {int(index): position for position, index in enumerate(split.sample_index.tolist())}
    wanted = sorted(position_of[int(i)] for i in chosen["sample_index"] if int(i) in position_of)[:size]
    device = resolve_device(params.device)
    models = {}
    for role in ("old", candidate):
        path, model_stage = _model_path(layout, role)
        models[role] = _load(path, params, device, model_stage)
    cached = {role: _cached_outcomes(layout, role, split_name) for role in ("old", candidate)}
    eps = params.attack.max_eps
    items = []
    for p in wanted:
        index = int(split.sample_index[p])
        notes: list[str] = []
        clean = as_float_images(split.images[p])
        if index in saved_at:
            row = saved_at[index]
            points = {"old": saved["old_adversarial"][row], candidate: saved["candidate_adversarial"][row]}
        else:
            points = {"old": clean, candidate: clean}
            notes.append("not among the samples the evaluation saved: shown without its adversarial points")
        predictions = {}
        for role, point in points.items():
            with torch.no_grad():
                predictions[role] = int(models[role].network(point.unsqueeze(0).to(device)).argmax(1).item())
            recorded = cached[role].loc[index] if index in cached[role].index else None
            name = "old model" if role == "old" else role
            if float((point - clean).abs().max()) > eps + 1e-6:
                notes.append(f"{name}: the saved point lies outside the eps-ball ({float((point - clean).abs().max()):.4f} > {eps:g})")
            if recorded is not None and index in saved_at and predictions[role] != int(recorded["adversarial_prediction"]):
                notes.append(f"{name}: the saved point is classified {_prediction(predictions[role], classes)}, not the evaluated "
                             f"{_prediction(recorded['adversarial_prediction'], classes)} (the file does not match its evaluation)")
        old_row, new_row = cached["old"].loc[index], cached[candidate].loc[index]
        if not bool(new_row["clean_correct"]):
            notes.append(f"{candidate} misclassifies the clean image already (also a clean negative flip): clean mistakes are not attacked")
        items.append(GalleryItem(index, _prediction(split.labels[p], classes), image_png(clean), image_png(points["old"]), image_png(points[candidate]),
                                 _prediction(old_row["adversarial_prediction"], classes), _prediction(new_row["adversarial_prediction"], classes),
                                 _prediction(new_row["clean_prediction"], classes), float(old_row["linf_distance"]), float(new_row["linf_distance"]), notes))
    return items


# ---------------------------------------------------------------- plots


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def tradeoff_plot(rows: pd.DataFrame, max_rnfr: float | None, old_robust_accuracy: float | None, chosen: str | None) -> str:
    """RNFR against clean and against robust accuracy per candidate, bootstrap error bars, the Pareto frontier (base64 PNG)."""
    from rcat.plots import FrontierPoint, frontier_figure

    points = [FrontierPoint(row.candidate, row.accuracy, row.robust_accuracy, row.rnfr, accuracy_interval=(row.accuracy_low, row.accuracy_high),
                            robust_accuracy_interval=(row.robust_accuracy_low, row.robust_accuracy_high), rnfr_interval=(row.rnfr_low, row.rnfr_high))
              for row in rows.itertuples()]
    reference = "" if old_robust_accuracy is None else f"; the old model's robust accuracy is {100 * old_robust_accuracy:.1f}%"
    return _png(frontier_figure(points, f"candidates: the trade-off (95% bootstrap intervals){reference}", chosen, max_rnfr))


def per_class_plot(counts: pd.DataFrame) -> str:
    """Grouped bars: NF and RNF counts per class, one bar per candidate (base64 PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    candidates = list(dict.fromkeys(counts["candidate"]))
    classes = list(dict.fromkeys(counts["class"]))
    figure = Figure(figsize=(min(10.5, max(6.4, 0.12 * len(classes) * (len(candidates) + 1))), 6.0))
    width = 0.8 / max(1, len(candidates))
    positions = np.arange(len(classes))
    for axes, column, title in ((figure.add_subplot(2, 1, 1), "negative_flips", "negative flips (clean)"),
                                (figure.add_subplot(2, 1, 2), "robust_negative_flips", "robustness negative flips")):
        for k, candidate in enumerate(candidates):
            part = counts[counts["candidate"] == candidate].set_index("class").reindex(classes)
            axes.bar(positions + (k - (len(candidates) - 1) / 2) * width, part[column].to_numpy(), width, label=candidate)
        axes.set_xticks(positions, classes)
        axes.set_ylabel("samples")
        axes.set_title(title, fontsize=10)
        # a new axes' default major locator is an AutoLocator, a MaxNLocator
        cast(MaxNLocator, axes.yaxis.get_major_locator()).set_params(integer=True)
    figure.axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.axes[1].set_xlabel("true class")
    figure.tight_layout()
    return _png(figure)


# ---------------------------------------------------------------- HTML

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1a202c;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #e2e8f0;padding-bottom:.3rem}
.verdict{padding:1rem 1.25rem;border-radius:8px;margin:1rem 0}
.promote{background:#e6f6ec;border:2px solid #2f855a}.reject{background:#fdecec;border:2px solid #c53030}
.verdict .word{font-size:1.5rem;font-weight:700;letter-spacing:.04em}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #e2e8f0;padding:.3rem .55rem;text-align:right}
th{background:#f7fafc}td.name,th.name{text-align:left}.ci{color:#718096;font-size:.8rem}
tr.chosen td{background:#f0fff4;font-weight:600}.pass{color:#2f855a}.fail{color:#c53030;font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:1rem}.item{border:1px solid #e2e8f0;border-radius:6px;padding:.6rem;width:340px}
.item .row{display:flex;gap:.4rem}.item figure{margin:0;text-align:center;font-size:.75rem;flex:1 1 0}
.item img{image-rendering:pixelated;border:1px solid #cbd5e0;width:100%}.note{color:#b7791f;font-size:.78rem}
.small{font-size:.8rem;color:#4a5568}img{max-width:100%}code{background:#edf2f7;padding:0 .2rem;border-radius:3px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _cell(item: Estimate | None) -> str:
    if item is None or math.isnan(item.value):
        return "<td>n/a</td>"
    return f"<td>{_pct(item.value)}<br><span class=\"ci\">[{100 * item.low:.1f}, {100 * item.high:.1f}]</span></td>"


def _check_rows(checks: list[dict[str, Any]]) -> str:
    rows = []
    for check in checks:
        value, threshold = check.get("value"), check.get("threshold")
        shown = f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _e(value if value is not None else check.get("detail", "n/a"))
        limit = f"{threshold:.4g}" if isinstance(threshold, (int, float)) else "&ndash;"
        status = '<span class="pass">met</span>' if check.get("passed") else '<span class="fail">broken</span>'
        notes = [str(check["estimate"])] if check.get("estimate") not in (None, "point") else []
        if check.get("class") is not None:
            notes.append(f"class {check['class']}")
        name = _e(check.get("rule")) + (f" <span class=\"ci\">({_e(', '.join(notes))})</span>" if notes else "")
        rows.append(f"<tr><td class=\"name\">{name}</td><td>{shown}</td><td>{limit}</td><td>{status}</td></tr>")
    return "".join(rows)


def _verdict_section(decision: dict[str, Any]) -> str:
    verdict = str(decision.get("verdict", "reject"))
    chosen = decision.get("candidate")
    selection, confirmation = decision.get("selection_split", "validation"), decision.get("confirmation_split", "test")
    selected = decision.get(f"selected_on_{selection}")
    parts = [f'<section class="verdict {"promote" if verdict == "promote" else "reject"}" id="verdict">',
             f'<div class="word">{_e(verdict.upper())}{" " + _e(chosen) if chosen else ""}</div>',
             (f"<p>Candidates selected on the <b>{_e(selection)}</b> split by <b>{_e(decision.get('rank_by'))}</b>, "
              f"confirmed on the <b>{_e(confirmation)}</b> split.</p><ul>")]
    parts += [f"<li>{_e(reason)}</li>" for reason in decision.get("reasons") or ["no reason recorded"]]
    parts.append("</ul>")
    if decision.get("problems"):
        parts.append("<p><b>Problems reading the evaluations:</b></p><ul>" + "".join(f"<li>{_e(p)}</li>" for p in decision["problems"]) + "</ul>")
    parts.append("</section>")
    focus = chosen or selected
    info = decision.get("candidates", {}).get(focus) if focus else None
    if info:
        parts.append(f"<h2>Rules for {_e(focus)}</h2><table><tr><th class=\"name\">rule</th><th>value</th><th>threshold</th><th>status</th></tr>")
        parts.append(f"<tr><th class=\"name\" colspan=4>{_e(selection)} split (selection)</th></tr>" + _check_rows(info.get("selection_checks", [])))
        if info.get("confirmation_checks"):
            parts.append(f"<tr><th class=\"name\" colspan=4>{_e(confirmation)} split (confirmation)</th></tr>" + _check_rows(info["confirmation_checks"]))
        parts.append("</table>")
    others = [(name, info) for name, info in decision.get("candidates", {}).items() if name != focus]
    if others:
        parts.append("<p class=\"small\">Other candidates on the selection split: " + "; ".join(
            f"<b>{_e(name)}</b> " + ("admissible" if info.get("admissible") else "inadmissible (" + _e(", ".join(
                c["rule"] for c in info.get("selection_checks", []) if not c.get("passed"))) + ")") for name, info in others) + ".</p>")
    return "".join(parts)


def old_model_label(decision: dict[str, Any]) -> str:
    """What the candidates were compared against: the registry version (``models:/<name>/<version>``, the champion when
    ``train_old.reference: champion``), another reference as configured, or the model the pipeline trained itself."""
    inputs = decision.get("inputs") or {}
    reference = inputs.get("old_reference")
    if not reference:
        return "current model (trained by train_old)"
    if str(reference).startswith("models:/"):
        return f"current model: registry version {reference}"
    return f"current model: {reference}"


def _table_section(split: str, estimates: dict[str, dict[str, Estimate] | None], counts: dict[str, dict[str, int]], decision: dict[str, Any]) -> str:
    chosen = decision.get("candidate")
    columns = list(HEADERS)
    header = "".join(f"<th>{_e(HEADERS[c])}</th>" for c in columns)
    rows = [(f'<table class="candidates" data-split="{_e(split)}"><tr><th class="name">candidate</th><th class="name">gate</th>{header}'
             "<th>NF</th><th>RNF</th><th>n</th></tr>")]
    reference = next((e for e in estimates.values() if e is not None), None)
    if reference is not None:
        rows.append(f'<tr><td class="name">old (reference)</td><td class="name">{_e(old_model_label(decision))}</td>{_cell(reference["accuracy_old"])}'
                    f'{_cell(reference["robust_accuracy_old"])}<td>&ndash;</td><td>&ndash;</td><td>&ndash;</td><td></td><td></td><td></td></tr>')
    for name, values in estimates.items():
        info = decision.get("candidates", {}).get(name, {})
        gate = "promoted" if name == chosen else "admissible" if info.get("admissible") else "inadmissible"
        cls = ' class="chosen"' if name == chosen else ""
        if values is None:
            rows.append(f'<tr{cls}><td class="name">{_e(name)}</td><td class="name">{gate}</td><td colspan="{len(columns) + 3}">no evaluation found</td></tr>')
            continue
        n = counts[name]
        rows.append(f'<tr{cls}><td class="name">{_e(name)}</td><td class="name">{gate}</td>' + "".join(_cell(values[c]) for c in columns)
                    + f"<td>{n['nf']}</td><td>{n['rnf']}</td><td>{n['n']}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _per_class_section(counts: pd.DataFrame, split: str) -> str:
    candidates = list(dict.fromkeys(counts["candidate"]))
    head = "".join(f"<th colspan=2>{_e(c)}</th>" for c in candidates)
    sub = "<th>NF</th><th>RNF</th>" * len(candidates)
    rows = [f'<table class="per-class" data-split="{_e(split)}"><tr><th class="name" rowspan=2>class</th><th rowspan=2>n</th>{head}</tr><tr>{sub}</tr>']
    for _class_index, part in counts.groupby("class_index", sort=True):
        part = part.set_index("candidate")
        cells = "".join(f"<td>{int(part.loc[c, 'negative_flips'])}</td><td>{int(part.loc[c, 'robust_negative_flips'])}</td>" for c in candidates)
        rows.append(f'<tr><td class="name">{_e(part["class"].iloc[0])}</td><td>{int(part["n_samples"].iloc[0])}</td>{cells}</tr>')
    rows.append("</table>")
    return "".join(rows)


def _gallery_section(items: list[GalleryItem], candidate: str | None, why: str, split: str, n_rnf: int) -> str:
    if candidate is None:
        return f"<p>{_e(why)}</p>"
    intro = (f"<p>{_e(why)} {n_rnf} robustness negative flip(s) of <b>{_e(candidate)}</b> on the {_e(split)} split; "
             f"{len(items)} shown. Adversarial points recomputed with the configured attack (same batch and seed as the evaluation); "
             "where an attack fails it returns the input itself, so the old model's image can equal the clean one.</p>")
    if not items:
        return intro
    cards = []
    for item in items:
        notes = "".join(f'<div class="note">{_e(n)}</div>' for n in item.notes) or '<div class="small">recomputed outcome matches the evaluation</div>'
        cards.append(
            f'<div class="item" data-sample="{item.sample_index}"><div class="small">sample {item.sample_index}, true class <b>{_e(item.label)}</b></div><div class="row">'
            f'<figure><img alt="clean" src="data:image/png;base64,{item.clean_png}"><figcaption>clean<br>{_e(candidate)} says {_e(item.new_clean_prediction)}</figcaption></figure>'
            f'<figure><img alt="old adversarial" src="data:image/png;base64,{item.old_png}"><figcaption>old model attacked<br>predicts {_e(item.old_prediction)} (attack failed)'
            f"<br>L&infin; {item.old_linf:.3f}{' (no point found: the input itself)' if item.old_linf == 0 else ''}</figcaption></figure>"
            f'<figure><img alt="new adversarial" src="data:image/png;base64,{item.new_png}"><figcaption>{_e(candidate)} attacked<br>predicts {_e(item.new_prediction)} (attack succeeded)'
            f"<br>L&infin; {item.new_linf:.3f}</figcaption></figure></div>{notes}</div>")
    return intro + '<div class="gallery">' + "".join(cards) + "</div>"


# ---------------------------------------------------------------- the stage


def gallery_candidate(decision: dict[str, Any]) -> tuple[str, str]:
    """Whose RNF samples the gallery shows, and why: the promoted candidate, else the one selected
    on the selection split (it failed confirmation), else the raw update ``new``."""
    if decision.get("verdict") == "promote" and decision.get("candidate"):
        return decision["candidate"], f"The promoted candidate {decision['candidate']}:"
    selected = decision.get(f"selected_on_{decision.get('selection_split', 'validation')}")
    if selected:
        return selected, f"Nothing promoted; {selected} was selected on the selection split and failed confirmation:"
    return "new", "Nothing promoted; the raw update (old to new, no fine-tuning):"


def describe_report(summary: dict[str, Any]) -> str:
    """The stage's one line on stdout: where the report is and what it says."""
    return (f"report: {summary['path']} ({summary['verdict']} {summary['candidate'] or ''}; "
            f"{summary['gallery']} gallery samples of {summary['gallery_candidate']})")


def build_report(params: Params, layout: Layout, tracker: Tracker | None = None, gallery_size: int = GALLERY_SIZE) -> dict[str, Any]:
    """Write ``report.html`` and the plot data (``tradeoff.csv``, ``per_class_flips.csv``) under ``<root>/report``;
    log the HTML to the update check's parent MLflow run. Returns a summary."""
    decision = read_json(layout.decision) if layout.decision.is_file() else None
    if decision is None:
        raise InputError(f"{layout.decision}: not found; run the 'decide' stage first (dvc repro decide)")
    if decision.get("verdict") not in {"promote", "reject"}:
        raise InputError(f"{layout.decision}: field 'verdict' is {decision.get('verdict')!r}, not promote or reject; rerun 'dvc repro decide'")
    manifest = read_json(layout.manifest)
    classes = [str(c) for c in manifest.get("classes") or range(int(manifest["num_classes"]))]
    confirmation, selection = decision.get("confirmation_split", "test"), decision.get("selection_split", "validation")
    candidates = list(dict.fromkeys(["new", *sorted(decision.get("candidates", {}))]))
    splits = list(dict.fromkeys([confirmation, selection]))

    estimates: dict[str, dict[str, dict[str, Estimate] | None]] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    flips_by_split: dict[str, dict[str, pd.DataFrame]] = {}
    for split in splits:
        estimates[split], counts[split], flips_by_split[split] = {}, {}, {}
        for candidate in candidates:
            flips = read_flips(layout, candidate, split)
            if flips is None or flips.empty:
                estimates[split][candidate] = None
                continue
            values = candidate_estimates(flips, params.seed)
            metrics_path = layout.evaluation(candidate) / "metrics.json"
            stored = read_json(metrics_path) if metrics_path.is_file() else {}
            check_against_metrics(values, stored.get(split), len(flips), metrics_path)
            estimates[split][candidate] = values
            counts[split][candidate] = {"n": len(flips), "nf": int(flips["negative_flip"].sum()), "rnf": int(flips["robust_negative_flip"].sum())}
            flips_by_split[split][candidate] = flips

    chosen = decision.get("candidate")
    evaluated = {c: v for c, v in estimates[confirmation].items() if v is not None}
    tradeoff = pd.DataFrame([{"candidate": c, **{f"{m}{s}": getattr(v[m], a) for m in ("robust_accuracy", "rnfr", "accuracy", "nfr", "snfr")
                                                   for s, a in (("", "value"), ("_low", "low"), ("_high", "high"))}} for c, v in evaluated.items()])
    per_class = per_class_counts(flips_by_split[confirmation], classes)

    focus, why = gallery_candidate(decision)
    focus_flips = flips_by_split[confirmation].get(focus)
    if focus_flips is None:
        items, n_rnf, why = [], 0, f"{why} no evaluation of {focus} on the {confirmation} split, so no gallery."
        focus_shown = None
    else:
        items = build_gallery(params, layout, focus, confirmation, focus_flips, classes, gallery_size)
        n_rnf, focus_shown = int(focus_flips["robust_negative_flip"].sum()), focus

    rules = decision.get("rules") or {}
    reference = next(iter(evaluated.values()), None)
    sections = [
        (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>rcat update report: {_e(decision['verdict'])}</title>"
         f"<style>{STYLE}</style></head><body><h1>rcat update report</h1>"),
        _verdict_section(decision),
    ]
    for split in splits:
        role = "confirmation" if split == confirmation else "selection"
        sections.append(f"<h2>Candidates on the {_e(split)} split ({role})</h2>")
        sections.append(_table_section(split, estimates[split], counts[split], decision))
    sections.append(f"<p class=\"small\">Rates over all n samples of the split, against the old model; in brackets the {int(100 * CONFIDENCE)}% "
                    "percentile-bootstrap interval over samples (2,000 resamples). NF / RNF: counts of negative / robustness negative flips; "
                    "S-NFR: share of samples with either.</p>")
    if not tradeoff.empty:
        plot = tradeoff_plot(tradeoff, rules.get("max_rnfr"), reference["robust_accuracy_old"].value if reference else None, chosen)
        sections.append(f"<h2>RNFR against clean and robust accuracy, the Pareto frontier ({_e(confirmation)} split)</h2>"
                        f'<img alt="RNFR against clean and robust accuracy" src="data:image/png;base64,{plot}">')
    if not per_class.empty:
        sections.append(f"<h2>Flips per class ({_e(confirmation)} split)</h2>" + _per_class_section(per_class, confirmation)
                        + f'<img alt="flips per class" src="data:image/png;base64,{per_class_plot(per_class)}">')
    sections.append("<h2>Robustness negative flips, up close</h2>" + _gallery_section(items, focus_shown, why, confirmation, n_rnf))
    inputs = decision.get("inputs", {})
    sections.append("<h2>Inputs</h2><p class=\"small\">code revision <code>" + _e(inputs.get("code_revision", "unknown")) + "</code>; attack <code>"
                    + _e(params.attack.label()) + "</code>; data digests " + ", ".join(f"{_e(k)} <code>{_e(str(v)[:12])}</code>" for k, v in inputs.get("data", {}).items())
                    + "; model digests " + ", ".join(f"{_e(k)} <code>{_e(str(v)[:12])}</code>" for k, v in inputs.get("models", {}).items())
                    + ". Full record: <code>data/decide/decision.json</code>.</p></body></html>\n")
    page = "".join(sections)

    for path, frame in ((tradeoff_csv(layout), tradeoff), (per_class_csv(layout), per_class)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    with atomic_path(report_path(layout)) as tmp:
        tmp.write_text(page, encoding="utf-8")
    if tracker is not None:
        tracker.parent().artifact(report_path(layout))
    return {"path": str(report_path(layout)), "verdict": decision["verdict"], "candidate": chosen, "gallery_candidate": focus,
            "gallery": len(items), "gallery_notes": sum(len(i.notes) for i in items), "candidates": list(evaluated)}
