"""The update report: built from a tiny pipeline run (stages in-process), its content checked against
the flips recomputed independently, rendered in headless Chromium, logged to MLflow, and its plot
data rendered by `dvc plots show`."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import copy_project, reduced_params

METHODS = {"at": {"loss": "at"}, "rcat": {"loss": "rcat", "alpha": 0.5, "beta": 0.4}}


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, keyed by the table's class attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._current: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            attributes = dict(attrs)
            key = f"{attributes.get('class', '')}:{attributes.get('data-split', '')}"
            self._current = self.tables.setdefault(key, [])
        elif tag == "tr" and self._current is not None:
            self._current.append([])
        elif tag in {"td", "th"} and self._current is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in {"td", "th"} and self._cell is not None and self._current is not None:
            self._current[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._current = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data + " ")


def tables_of(page: str) -> dict[str, list[list[str]]]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """A tiny project (git + DVC, the repo's dvc.yaml) whose stages ran in-process, then the report.

    The attack batch (64) is smaller than the split and the engine's chunk (128) spans two batches,
    so the gallery's recomputation must find each sample's batch and seed as the engine did.
    """
    from rcat import pipeline
    from rcat.config import parse_params
    from rcat.report import build_report

    work = copy_project(tmp_path_factory.mktemp("report") / "project")
    raw = reduced_params(work)
    raw["tracking"]["enabled"] = False
    raw["device"] = "cpu"
    raw["attack"]["batch_size"] = 64
    raw["engine"] = {"cache_dir": str(work / ".rcat_cache"), "chunk_size": 128}
    # small models and little training: the report needs flips, not good models
    raw["train_new"].update(architecture="mlp", architecture_kwargs={"hidden": [64]}, data_fraction=0.5, epochs=3)
    raw["train_old"]["epochs"] = 3
    raw["finetune"]["epochs"] = 1
    raw["finetune"]["methods"] = METHODS
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    layout = pipeline.Layout(work / "data")
    pipeline.prepare(params, layout)
    for role in ("old", "new"):
        pipeline.train(params, role, layout)
    pipeline.attack_cache(params, layout)
    for method in METHODS:
        pipeline.finetune_method(params, method, layout)
        pipeline.evaluate_method(params, method, layout)
    decision = pipeline.decide(params, layout)
    summary = build_report(params, layout)
    return {"work": work, "params": params, "layout": layout, "decision": decision, "summary": summary,
            "page": (layout.root / "report" / "report.html").read_text(encoding="utf-8")}


def confirmation_flips(layout, candidate: str, split: str) -> pd.DataFrame:
    frame = pd.read_parquet(layout.evaluation(candidate) / "flips.parquet")
    return frame[frame["split"] == split]


@pytest.mark.slow
def test_report_leads_with_the_verdict_and_tabulates_every_candidate(report_run):
    page, decision, layout = report_run["page"], report_run["decision"], report_run["layout"]
    verdict_at = page.index('id="verdict"')
    assert verdict_at < page.index("<table")  # the verdict comes before any table
    headline = decision["verdict"].upper() + (f" {decision['candidate']}" if decision["candidate"] else "")
    assert f'<div class="word">{html.escape(headline)}</div>' in page
    for reason in decision["reasons"]:
        assert html.escape(reason) in page

    split = decision["confirmation_split"]
    rows = tables_of(page)[f"candidates:{split}"]
    assert rows[0][:7] == ["candidate", "gate", "Accuracy", "Robust accuracy", "NFR", "RNFR", "S-NFR"]
    by_name = {row[0]: row for row in rows[1:]}
    assert set(by_name) == {"old (reference)", "new", *METHODS}
    assert by_name["old (reference)"][1] == "current model (trained by train_old)"  # the embedded default trains its own
    for candidate in ("new", *METHODS):
        flips = confirmation_flips(layout, candidate, split)
        metrics = json.loads((layout.evaluation(candidate) / "metrics.json").read_text())[split]
        row = by_name[candidate]
        # each cell: the rate in percent, then its bootstrap interval, which contains it
        for cell, key in zip(row[2:7], ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr")):
            value, interval = cell.split("[")
            assert value.strip() == f"{100 * metrics[key]:.2f}%"
            low, high = (float(x) for x in interval.rstrip("]").split(","))
            assert low - 0.05 <= 100 * metrics[key] <= high + 0.05
        assert row[7:] == [str(int(flips["negative_flip"].sum())), str(int(flips["robust_negative_flip"].sum())), str(len(flips))]
        gate = "promoted" if candidate == decision["candidate"] else "admissible" if decision["candidates"][candidate]["admissible"] else "inadmissible"
        assert row[1] == gate
    assert f"candidates:{decision['selection_split']}" in tables_of(page)


@pytest.mark.slow
def test_tradeoff_data_carries_intervals_that_contain_the_rates(report_run):
    layout, split = report_run["layout"], report_run["decision"]["confirmation_split"]
    tradeoff = pd.read_csv(layout.root / "report" / "tradeoff.csv").set_index("candidate")
    assert set(tradeoff.index) == {"new", *METHODS}
    for candidate, row in tradeoff.iterrows():
        flips = confirmation_flips(layout, candidate, split)
        assert row["rnfr"] == pytest.approx(flips["robust_negative_flip"].mean())
        assert row["robust_accuracy"] == pytest.approx(flips["new_robust"].mean())
        for metric in ("rnfr", "robust_accuracy", "accuracy", "nfr", "snfr"):
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"]
    assert '<img alt="RNFR against clean and robust accuracy" src="data:image/png;base64,' in report_run["page"]


@pytest.mark.slow
def test_per_class_counts_match_the_flips(report_run):
    """Per-class NF / RNF in the CSV and in the page equal a groupby of each candidate's flips parquet."""
    layout, page = report_run["layout"], report_run["page"]
    split = report_run["decision"]["confirmation_split"]
    manifest = json.loads(layout.manifest.read_text())
    counts = pd.read_csv(layout.root / "report" / "per_class_flips.csv")
    rows = tables_of(page)[f"per-class:{split}"]
    candidates = ["new", *sorted(METHODS)]
    assert rows[0][2:] == candidates
    for k, candidate in enumerate(candidates):
        flips = confirmation_flips(layout, candidate, split)
        expected = flips.groupby("label")[["negative_flip", "robust_negative_flip"]].sum().reindex(range(manifest["num_classes"]), fill_value=0)
        mine = counts[counts["candidate"] == candidate].set_index("class_index")
        assert mine["negative_flips"].tolist() == expected["negative_flip"].astype(int).tolist()
        assert mine["robust_negative_flips"].tolist() == expected["robust_negative_flip"].astype(int).tolist()
        for class_index, row in enumerate(rows[2:]):
            assert row[0] == manifest["classes"][class_index]
            assert row[2 + 2 * k : 4 + 2 * k] == [str(int(expected.loc[class_index, "negative_flip"])), str(int(expected.loc[class_index, "robust_negative_flip"]))]


@pytest.mark.slow
def test_gallery_shows_the_saved_rnf_samples_of_the_right_candidate_without_attacking(report_run, monkeypatch):
    from rcat.report import GALLERY_SIZE, gallery_candidate

    decision, layout, summary, page = report_run["decision"], report_run["layout"], report_run["summary"], report_run["page"]
    focus, _ = gallery_candidate(decision)
    assert summary["gallery_candidate"] == focus
    flips = confirmation_flips(layout, focus, decision["confirmation_split"])
    rnf = flips[flips["robust_negative_flip"]]
    assert len(rnf) > 0, "the tiny run has no RNF sample: the gallery test would prove nothing"
    assert summary["gallery"] == min(GALLERY_SIZE, len(rnf)) == page.count('<div class="item"')
    shown = [int(part.split('"')[0]) for part in page.split('<div class="item" data-sample="')[1:]]
    assert set(shown) <= set(rnf["sample_index"])
    assert page.count('alt="clean"') == page.count('alt="old adversarial"') == page.count('alt="new adversarial"') == summary["gallery"]
    # every saved point reproduces its evaluation (in the ball, the recorded adversarial prediction)
    assert "does not match its evaluation" not in page and "outside the eps-ball" not in page and "not among the samples" not in page
    # the report never attacks: building it again with every attack disabled gives the same gallery
    from rcat import attacks as attacks_module
    from rcat.report import build_report

    def no_attack(*args, **kwargs):
        raise AssertionError("the report attacked")

    monkeypatch.setattr(attacks_module, "attack_outcomes", no_attack)
    monkeypatch.setattr(attacks_module, "build_attack", no_attack)
    assert build_report(report_run["params"], layout)["gallery"] == summary["gallery"]


@pytest.mark.slow
def test_gallery_says_when_a_saved_point_does_not_match_its_evaluation(report_run, tmp_path):
    """A gallery file whose adversarial point was swapped for the clean image: the caption says the point does not
    give the evaluated prediction, instead of showing it as if it did."""
    import shutil

    from rcat.pipeline import Layout
    from rcat.report import build_gallery
    from rcat.safe_io import read_tensors, write_tensors

    decision, layout, params = report_run["decision"], report_run["layout"], report_run["params"]
    split = decision["confirmation_split"]
    copy = Layout(tmp_path / "data")
    shutil.copytree(layout.root, copy.root)
    tensors, metadata = read_tensors(copy.evaluation("new") / "gallery.safetensors")
    assert len(tensors["sample_index"]) >= 1
    from rcat.data import load_split

    images = load_split(copy.split(split)).images
    tensors["candidate_adversarial"][0] = images[int(tensors["position"][0])]  # the clean image, correctly classified
    write_tensors(copy.evaluation("new") / "gallery.safetensors", tensors, metadata)
    flips = confirmation_flips(copy, "new", split)
    manifest = json.loads(copy.manifest.read_text())
    items = build_gallery(params, copy, "new", split, flips, manifest["classes"], size=1)
    assert len(items) == 1 and items[0].sample_index == int(tensors["sample_index"][0])
    assert any("does not match its evaluation" in note for note in items[0].notes), items[0].notes


@pytest.mark.slow
def test_report_is_logged_to_the_parent_run(report_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from rcat.config import parse_params
    from rcat.report import build_report
    from rcat.tracking import Tracker

    raw = report_run["params"].model_dump(mode="json")
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "rcat-report-test"}
    params = parse_params(raw)
    tracker = Tracker(params, root=report_run["work"])
    build_report(params, report_run["layout"], tracker)
    client = MlflowClient(tracking_uri=params.tracking.uri)
    parent = tracker.parent().run_id
    assert "report.html" in {item.path for item in client.list_artifacts(parent)}
    local = client.download_artifacts(parent, "report.html", str(tmp_path))
    assert Path(local).read_text(encoding="utf-8") == report_run["page"]


@pytest.mark.slow
def test_dvc_plots_show_renders_the_report_plots(report_run):
    work = report_run["work"]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=work, check=True, env=env)
    result = subprocess.run(["dvc", "plots", "show", "--json"], cwd=work, check=False, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    plots = json.loads(result.stdout)["data"]
    tradeoff = plots["robust accuracy against RNFR (confirmation split)"][0]["content"]
    assert {row["candidate"] for row in tradeoff["data"]["values"]} == {"new", *METHODS}
    assert tradeoff["layer"][-1]["encoding"]["x"]["field"] == "rnfr"
    per_class = plots["robustness negative flips per class (confirmation split)"][0]["content"]
    assert len(per_class["data"]["values"]) == 10 * (1 + len(METHODS))
    assert per_class["encoding"]["color"]["field"] == "candidate"


def test_missing_decision_names_the_stage_to_run(tmp_path):
    from rcat import pipeline
    from rcat.config import parse_params
    from rcat.errors import InputError
    from rcat.report import build_report

    params = parse_params(reduced_params(tmp_path))
    with pytest.raises(InputError, match=r"decision\.json: not found; run the 'decide' stage first \(dvc repro decide\)"):
        build_report(params, pipeline.Layout(tmp_path / "data"))


def test_the_old_model_is_named_by_its_registry_version():
    from rcat.report import old_model_label

    assert old_model_label({"inputs": {"old_reference": "models:/rcat-digits/3"}}) == "current model: registry version models:/rcat-digits/3"
    assert old_model_label({"inputs": {"old_reference": "models/old.safetensors"}}) == "current model: models/old.safetensors"
    assert old_model_label({"inputs": {"old_reference": None}}) == old_model_label({}) == "current model (trained by train_old)"


def test_per_class_counting_on_hand_made_frames():
    from rcat.errors import InputError
    from rcat.report import per_class_counts

    def frame(labels, nf, rnf):
        return pd.DataFrame({"label": labels, "negative_flip": np.array(nf, bool), "robust_negative_flip": np.array(rnf, bool)})

    a = frame([0, 0, 1, 2, 2, 2], [1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0])
    b = frame([0, 1, 1], [0, 0, 0], [0, 0, 1])
    counts = per_class_counts({"a": a, "b": b}, ["zero", "one", "two", "three"]).set_index(["candidate", "class"])
    assert counts.loc["a", ["n_samples", "negative_flips", "robust_negative_flips"]].values.tolist() == [[2, 1, 1], [1, 0, 1], [3, 2, 1], [0, 0, 0]]
    assert counts.loc["b", ["n_samples", "negative_flips", "robust_negative_flips"]].values.tolist() == [[1, 0, 0], [2, 0, 1], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(InputError, match="label 5 outside the 4 classes"):
        per_class_counts({"c": frame([5], [1], [0])}, ["zero", "one", "two", "three"])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(report_run, tmp_path):
    """Chromium renders the page (no network needed): the verdict and the candidates table are in the
    rendered DOM, and the screenshot is a real picture, not a blank page."""
    from PIL import Image

    browser = _chromium()
    url = (report_run["layout"].root / "report" / "report.html").resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    env = dict(os.environ, HOME=str(tmp_path))
    dom = subprocess.run([*common, "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    decision = report_run["decision"]
    assert decision["verdict"].upper() in dom.stdout
    rendered = tables_of(dom.stdout)[f"candidates:{decision['confirmation_split']}"]
    assert {row[0] for row in rendered[1:]} == {"old (reference)", "new", *METHODS}
    shot = tmp_path / "report.png"
    result = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2000", url], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables, plots: many colours, not a blank page
    # the verdict box (green for promote, red for reject) is painted near the top of the page
    verdict_colour = (230, 246, 236) if decision["verdict"] == "promote" else (253, 236, 236)
    with Image.open(shot) as image:
        top = image.convert("RGB").crop((0, 0, 1200, 400))
        assert top.getcolors(maxcolors=1 << 20) and any(colour == verdict_colour for _, colour in top.getcolors(maxcolors=1 << 20))


def test_pareto_mask_by_hand():
    from rcat.plots import pareto_mask

    # (accuracy, rnfr): b dominates a; c is best on RNFR; d ties b exactly; e is NaN
    accuracy = [0.60, 0.70, 0.50, 0.70, float("nan")]
    rnfr = [0.05, 0.03, 0.01, 0.03, 0.0]
    assert pareto_mask(accuracy, rnfr) == [False, True, True, True, False]
    assert pareto_mask([], []) == []
