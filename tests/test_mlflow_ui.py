"""MLflow's compare page of one check's candidates, as a user sees it: a real ``mlflow server`` on 127.0.0.1 and
headless Chromium (Debian's, driven by Playwright; no browser is downloaded).

The page shows metrics in a virtualised grid (only the rows in view are in the DOM), so the test
scrolls it through and reads every row. It saves a screenshot and the DOM it read
(``compare.png``, ``compare.html`` in the test's temporary directory; ``RCAT_SCREENSHOTS=docs/images``
also copies the picture to ``docs/images/mlflow_compare.png``) and asserts:

* the key figures (``key/*``, :data:`rcat.stages.common.KEY_FIGURES`) are the first metric rows, with the
  values the tracking store holds for each candidate;
* every metric the candidate runs logged has a row, and no row is empty (NaN, "-") for every run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest
import yaml

from conftest import copy_evaluated, mlflow_server

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CELLS = """grid => Array.from(grid.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div'))
    .map(cell => [parseFloat(cell.style.top), parseFloat(cell.style.left), cell.innerText.trim()])"""
"""Each rendered cell of a react-virtualized grid: its row offset, column offset and text."""


@pytest.fixture
def tracked_check(evaluated_project, tmp_path):
    """A copy of the evaluated project whose decision ran with tracking on: one parent run and its candidate runs."""
    from rcat import pipeline
    from rcat.config import parse_params
    from rcat.tracking import Tracker

    root = copy_evaluated(evaluated_project, tmp_path / "project")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tracking"].update(enabled=True, uri=f"sqlite:///{root / 'mlflow.db'}", registered_model=None)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    pipeline.decide(params, pipeline.Layout(root / "data"), Tracker(params, root=root))
    return root, params


def _read_grid(page, total_height: float) -> tuple[dict[float, str], dict[float, dict[float, str]]]:
    """Scroll the compare page's metric grids from top to bottom; returns {row offset: metric} and {row offset: {column offset: value}}."""
    grids = page.locator(".ReactVirtualized__Grid")
    names_grid, values_grid = grids.nth(0), grids.nth(1)  # the metric names, and the values beside them (scrolled together)
    names: dict[float, str] = {}
    values: dict[float, dict[float, str]] = {}
    offset = 0.0
    while True:
        for top, _, text in names_grid.evaluate(CELLS):
            names[top] = text
        for top, left, text in values_grid.evaluate(CELLS):
            values.setdefault(top, {})[left] = text
        if offset >= total_height:
            return names, values
        offset += 150.0  # less than the grid's 300 px window: every row is rendered at least once
        values_grid.evaluate(f"grid => {{ grid.scrollTop = {offset}; grid.dispatchEvent(new Event('scroll')); }}")
        page.wait_for_timeout(100)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_compare_page_leads_with_the_key_figures(tracked_check, tmp_path):
    from mlflow.tracking import MlflowClient

    from rcat.stages.records import KEY_FIGURES

    root, params = tracked_check
    with mlflow_server(tmp_path, backend_store_uri=f"sqlite:///{root / 'mlflow.db'}") as url:
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        runs = client.search_runs([experiment.experiment_id])
        parent = next(run for run in runs if run.info.run_name.startswith("check "))
        candidates = sorted((run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                             and run.info.run_name.startswith("candidate:")), key=lambda run: run.info.run_name)
        assert [run.info.run_name for run in candidates] == ["candidate:at", "candidate:new", "candidate:pct"]
        logged = sorted(set().union(*(run.data.metrics for run in candidates)))
        ids = [run.info.run_id for run in candidates]
        page_url = (f"{url}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                    f"&experiments={urllib.parse.quote(json.dumps([experiment.experiment_id]))}")

        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1200})
                page.goto(page_url)
                page.get_by_text("key/accuracy", exact=True).first.wait_for(timeout=90_000)
                for section in ("Visualizations", "Run details", "Parameters"):  # fold what sits above the metrics
                    page.get_by_text(section, exact=True).first.click()
                page.wait_for_timeout(500)
                page.screenshot(path=str(tmp_path / "compare.png"))
                (tmp_path / "compare.html").write_text(page.content())
                total_height = page.locator(".ReactVirtualized__Grid").nth(1).evaluate("g => g.firstElementChild.scrollHeight")
                names, values = _read_grid(page, float(total_height))
            finally:
                browser.close()

    rows = [names[top] for top in sorted(names)]
    assert sorted(rows) == logged, f"the page's metric rows differ from the logged metrics (DOM in {tmp_path / 'compare.html'})"
    key_rows = sorted(f"key/{name.removesuffix('_new')}" for name in KEY_FIGURES)
    assert rows[:len(key_rows)] == key_rows  # the key figures lead
    by_row = {names[top]: [values.get(top, {}).get(left) for left in sorted(values.get(top, {}))] for top in names}
    empty = [row for row, cells in by_row.items() if not any(_number(cell) is not None for cell in cells)]
    assert not empty, f"metric rows empty for every run: {empty}"
    # the key figures shown are the store's; the page's columns follow the URL's run order and round to 3 decimals
    for row in key_rows:
        shown = [_number(cell) for cell in by_row[row]]
        assert shown == pytest.approx([run.data.metrics[row] for run in candidates], abs=5e-4), row
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    if os.environ.get("RCAT_SCREENSHOTS"):  # e.g. RCAT_SCREENSHOTS=docs/images: the picture in the README
        shutil.copy(tmp_path / "compare.png", Path(os.environ["RCAT_SCREENSHOTS"]) / "mlflow_compare.png")
