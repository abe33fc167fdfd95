"""The rcat pipeline as a Prefect 3 flow that shares DVC's outputs, lock file and cache.

Each task runs ``dvc repro --single-item <target>`` for one stage of ``dvc.yaml`` (or one
``foreach`` group, whose items DVC expands itself), in the pipeline's order. DVC decides what is
stale, so running the flow after ``dvc repro`` recomputes nothing, and ``dvc repro`` after the
flow finds everything up to date. The flow never computes anything itself; Prefect adds run
history, logs and a markdown artifact with the update decision (key ``rcat-decision``).

Run it from the project root: ``python pipelines/update_pipeline.py [--force]``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

STAGE_TARGETS: tuple[str, ...] = ("prepare", "train_old", "train_new", "attack_cache", "finetune", "evaluate", "decide")
"""The DVC targets in pipeline order; ``finetune`` and ``evaluate`` are ``foreach`` groups."""

ARTIFACT_KEY = "rcat-decision"
LOCK_ERROR = "Unable to acquire lock"
LOCK_RETRY_DELAY_SECONDS = 5.0
"""One retry, only for DVC's repo-lock error (DVC itself already waits ~3 s before giving up)."""
STDERR_TAIL_LINES = 15

_RAN = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_CACHED = re.compile(r"^Stage '([^']+)' is cached - skipping run")


class StageFailed(RuntimeError):
    """``dvc repro`` exited non-zero; the message ends with the last lines of DVC's stderr."""

    def __init__(self, target: str, returncode: int, stderr: str) -> None:
        self.target = target
        self.returncode = returncode
        self.stderr_tail = tail(stderr)
        super().__init__(f"dvc repro --single-item {target} failed with exit code {returncode}:\n{self.stderr_tail}")


# ---------------------------------------------------------------- DVC plumbing (plain functions)


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last ``lines`` non-blank lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def parse_dvc_output(text: str) -> dict[str, list[str]]:
    """Stages DVC ran, skipped (unchanged or restored from the run-cache) and restored, in order."""
    ran: list[str] = []
    skipped: list[str] = []
    restored: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if match := _RAN.match(line):
            ran.append(match.group(1))
        elif match := _SKIPPED.match(line):
            skipped.append(match.group(1))
        elif match := _CACHED.match(line):
            skipped.append(match.group(1))
            restored.append(match.group(1))
    return {"ran": ran, "skipped": skipped, "restored": restored}


def dvc_executable() -> str:
    """The ``dvc`` next to this interpreter (its environment's), else the one on PATH."""
    beside = Path(sys.executable).parent / ("dvc.exe" if os.name == "nt" else "dvc")
    if beside.is_file():
        return str(beside)
    found = shutil.which("dvc")
    if found is None:
        raise RuntimeError(f"dvc not found next to {sys.executable} nor on PATH; install the project's environment")
    return found


def dvc_env() -> dict[str, str]:
    """The environment for DVC: stage commands (``python stages/...``) must resolve to this interpreter."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def run_dvc(args: list[str], project_dir: str) -> subprocess.CompletedProcess[str]:
    """Run ``dvc <args>`` in ``project_dir`` and capture its output."""
    return subprocess.run([dvc_executable(), *args], cwd=project_dir, env=dvc_env(), capture_output=True, text=True, check=False)


def list_stages(project_dir: str) -> list[str]:
    """Every stage of the project's ``dvc.yaml`` (foreach items expanded), as ``dvc stage list`` names them."""
    result = run_dvc(["stage", "list", "--name-only"], project_dir)
    if result.returncode != 0:
        raise StageFailed("(stage list)", result.returncode, result.stderr)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def check_targets_cover(stages: list[str], targets: tuple[str, ...] = STAGE_TARGETS) -> None:
    """Fail before running anything if ``dvc.yaml`` has a stage that no target of the flow reproduces."""
    missing = [name for name in stages if name.split("@", 1)[0] not in targets]
    if missing:
        raise RuntimeError(f"dvc.yaml has stages the flow does not run: {', '.join(missing)}; add them to STAGE_TARGETS")


# ---------------------------------------------------------------- tasks


@task(name="dvc-repro", task_run_name="repro-{target}", cache_policy=NO_CACHE, retries=0)
def reproduce(target: str, project_dir: str = ".", force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item <target>``: DVC reruns the target only if its inputs changed.

    Returns ``{"target", "ran", "skipped", "restored"}`` parsed from DVC's output. Raises
    :class:`StageFailed` (a RuntimeError with DVC's stderr tail) on failure; a failing stage is
    deterministic, so the only retry is one for DVC's repo-lock error.
    """
    args = ["repro", "--single-item", *(["--force"] if force else []), target]
    for attempt in (1, 2):
        result = run_dvc(args, project_dir)
        if result.returncode == 0:
            break
        if attempt == 1 and LOCK_ERROR in result.stderr:
            print(f"{target}: the DVC repository is locked by another process; retrying once in {LOCK_RETRY_DELAY_SECONDS:g} s")
            time.sleep(LOCK_RETRY_DELAY_SECONDS)
            continue
        raise StageFailed(target, result.returncode, result.stderr)
    report = parse_dvc_output(result.stdout)
    if not report["ran"] and not report["skipped"]:
        raise RuntimeError(f"dvc repro --single-item {target} reported no stage (has DVC's output format changed?):\n{tail(result.stdout)}")
    print(f"{target}: ran {', '.join(report['ran']) or 'nothing'}; skipped {', '.join(report['skipped']) or 'nothing'}"
          + (f" (restored from the run-cache: {', '.join(report['restored'])})" if report["restored"] else ""))
    return {"target": target, **report}


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def render_decision_markdown(project_dir: str = ".") -> tuple[dict[str, Any], str]:
    """The decision record and a markdown report: verdict, candidate, reasons, one row per candidate."""
    data = Path(project_dir) / "data"
    decision = _read_json(data / "decide" / "decision.json")
    split = decision.get("confirmation_split") or "test"
    metrics: dict[str, dict[str, Any]] = {}
    cache_metrics = data / "attack_cache" / "metrics.json"
    if cache_metrics.is_file():
        metrics["new"] = _read_json(cache_metrics)
    for path in sorted((data / "evaluate").glob("*/metrics.json")):
        metrics[path.parent.name] = _read_json(path)
    candidates = list(dict.fromkeys([*metrics, *decision.get("candidates", {})]))

    verdict, chosen = decision.get("verdict", "unknown"), decision.get("candidate")
    lines = [f"# rcat update decision: {verdict.upper()}" + (f" `{chosen}`" if chosen else ""), "",
             f"- **Verdict:** {verdict}", f"- **Candidate:** {chosen or 'none'}",
             f"- **Selected on:** {decision.get('selection_split', 'n/a')}, ranked by {decision.get('rank_by', 'n/a')}; confirmed on {split}",
             "", "**Reasons**", ""]
    lines += [f"- {reason}" for reason in decision.get("reasons") or ["no reason recorded"]]
    if decision.get("problems"):
        lines += ["", "**Problems**", ""] + [f"- {problem}" for problem in decision["problems"]]
    lines += ["", f"## Candidates on the {split} split (flips measured against the old model)", "",
              f"| Candidate | Admissible | {split.capitalize()} accuracy | Robust accuracy | NFR | RNFR | S-NFR |",
              "|---|---|---:|---:|---:|---:|---:|"]
    reference = next((m[split] for m in metrics.values() if m.get(split)), None)
    if reference is not None:
        lines.append(f"| old (reference) | | {_percent(reference.get('accuracy_old'))} | {_percent(reference.get('robust_accuracy_old'))} | | | |")
    for name in candidates:
        values = metrics.get(name, {}).get(split) or {}
        admissible = decision.get("candidates", {}).get(name, {}).get("admissible")
        label = f"**{name}** (chosen)" if name == chosen else name
        lines.append(f"| {label} | {'yes' if admissible else 'no' if admissible is not None else 'n/a'} | "
                     f"{_percent(values.get('accuracy_new'))} | {_percent(values.get('robust_accuracy_new'))} | "
                     f"{_percent(values.get('nfr'))} | {_percent(values.get('rnfr'))} | {_percent(values.get('snfr'))} |")
    lines += ["", "NFR: clean negative flips; RNFR: robust negative flips; S-NFR: samples with either (share of the split)."]
    return decision, "\n".join(lines) + "\n"


@task(name="publish-decision", cache_policy=NO_CACHE)
def publish_decision(project_dir: str = ".") -> dict[str, Any]:
    """Publish ``data/decide/decision.json`` and the candidates' metrics as a markdown artifact."""
    decision, markdown = render_decision_markdown(project_dir)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="rcat update gate: verdict, reasons and candidate metrics")
    print(f"decision: {decision['verdict']} {decision.get('candidate') or ''} ({'; '.join(decision.get('reasons') or [])})")
    return {"verdict": decision["verdict"], "candidate": decision.get("candidate")}


# ---------------------------------------------------------------- flow


@flow(name="rcat-pipeline", log_prints=True)
def update_pipeline(project_dir: str = ".", force: bool = False) -> dict:
    """Reproduce the DVC pipeline stage by stage (DVC skips what is up to date) and publish the decision.

    Returns ``{"verdict", "candidate", "ran", "skipped"}``: the stages DVC ran and skipped, in order.
    """
    root = Path(project_dir).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root}: no dvc.yaml; run the flow from the project root or pass project_dir")
    check_targets_cover(list_stages(str(root)))
    ran: list[str] = []
    skipped: list[str] = []
    for target in STAGE_TARGETS:
        report = reproduce(target, str(root), force)
        ran += report["ran"]
        skipped += report["skipped"]
    summary = publish_decision(str(root))
    return {"verdict": summary["verdict"], "candidate": summary["candidate"], "ran": ran, "skipped": skipped}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the rcat DVC pipeline as a Prefect flow in the current directory.")
    parser.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    result = update_pipeline(project_dir=".", force=parser.parse_args().force)
    print(json.dumps(result, indent=2))
