"""The rcat pipeline as a Prefect 3 flow that shares DVC's outputs, lock file and cache.

Each task runs ``dvc repro --single-item <target>`` for one stage of ``dvc.yaml`` (or one
``foreach`` group, whose items DVC expands itself), in the pipeline's order, through DVC's Python
API (``Repo.reproduce``, in a child process: :mod:`pipelines.dvc_repro`), which returns the
stages it reproduced; no output of DVC's is parsed. DVC decides what is
stale, so running the flow after ``dvc repro`` recomputes nothing, and ``dvc repro`` after the
flow finds everything up to date. The flow never computes anything itself; Prefect adds run
history, logs and artifacts: the update decision as markdown (key ``rcat-decision``), the
candidates' key figures (``rcat-candidates``) and what each stage did (``rcat-stages``) as tables.

A stage that fails because the MLflow tracking store did not answer (the stage's exit code 4)
is retried after a delay; any other failure (bad input, exit code 2) is deterministic and is not.

Run it from the project root: ``python pipelines/update_pipeline.py [--force]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.events import emit_event

from rcat.errors import EXIT_TRACKING

STAGE_TARGETS: tuple[str, ...] = ("prepare", "train_old", "train_new", "attack_cache", "finetune", "evaluate", "decide")
"""The DVC targets in pipeline order; ``finetune`` and ``evaluate`` are ``foreach`` groups."""
OPTIONAL_TARGETS: tuple[str, ...] = ("report",)
"""Targets run after :data:`STAGE_TARGETS`, in this order, only when ``dvc.yaml`` has them."""

ARTIFACT_KEY = "rcat-decision"
CANDIDATES_ARTIFACT_KEY = "rcat-candidates"
STAGES_ARTIFACT_KEY = "rcat-stages"
TRANSIENT_EXIT_CODES = frozenset({EXIT_TRACKING})
"""Stage exit codes worth retrying: the MLflow tracking store did not answer (rcat.cli)."""
TRACKING_RETRY_DELAYS_SECONDS: list[float] = [60.0, 300.0]
"""Waits before the retries of a stage that failed with a transient exit code (one retry per entry).
The stage's own MLflow client already retries for seconds; these cover a server restart."""
LOCK_RETRY_DELAY_SECONDS = 5.0
"""One retry, only when another DVC process held the repository lock (DVC itself already waits ~3 s before giving up)."""
STDERR_TAIL_LINES = 15
DVC_REPRO_SCRIPT = Path(__file__).with_name("dvc_repro.py")
"""Runs DVC's Python API (``Repo.reproduce``) in a child process and writes what it did as JSON."""


class StageFailed(RuntimeError):
    """A ``dvc repro`` child failed; the message is DVC's error, then the last lines of the stages' output.

    ``stage_exit_code`` is the exit status of the stage's own command, from DVC's
    ``StageCmdFailedError`` (None when DVC itself failed, e.g. a bad ``dvc.yaml``); ``lock`` is
    True when another DVC process held the repository lock.
    """

    def __init__(self, target: str, message: str, output: str = "", stage_exit_code: int | None = None, lock: bool = False) -> None:
        self.target = target
        self.dvc_message = message
        self.output = output
        self.output_tail = tail(output)
        self.stage_exit_code = stage_exit_code
        self.lock = lock
        details = f"\n{self.output_tail}" if self.output_tail else ""
        super().__init__(f"dvc repro --single-item {target} failed: {message}{details}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its own arguments (Prefect may serialise failures)
        return (type(self), (self.target, self.dvc_message, self.output, self.stage_exit_code, self.lock))

    @property
    def transient(self) -> bool:
        """True when the stage failed for a reason a later attempt may not meet (tracking store down)."""
        return self.stage_exit_code in TRANSIENT_EXIT_CODES


# ---------------------------------------------------------------- DVC plumbing (plain functions)


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    """The last ``lines`` non-blank lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def dvc_env() -> dict[str, str]:
    """The environment for DVC: stage commands (``python stages/...``) must resolve to this interpreter."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def run_dvc(args: list[str], project_dir: str) -> dict[str, Any]:
    """Run :mod:`pipelines.dvc_repro` with ``args`` in ``project_dir``; its JSON result plus ``"output"`` (stdout and stderr).

    Raises :class:`StageFailed` when the child wrote no result (it crashed before Python could report).
    """
    with tempfile.TemporaryDirectory(prefix="rcat-dvc-") as scratch:
        result_file = Path(scratch) / "result.json"
        process = subprocess.run([sys.executable, str(DVC_REPRO_SCRIPT), "--result", str(result_file), *args],
                                 cwd=project_dir, env=dvc_env(), capture_output=True, text=True, check=False)
        output = process.stdout + process.stderr
        if not result_file.is_file():
            raise StageFailed(args[-1], f"{DVC_REPRO_SCRIPT.name} exited with {process.returncode} and reported nothing", output)
        return {**json.loads(result_file.read_text(encoding="utf-8")), "output": output}


def list_stages(project_dir: str) -> list[str]:
    """Every stage of the project's ``dvc.yaml`` (foreach items expanded), as ``dvc stage list`` names them."""
    result = run_dvc(["--list"], project_dir)
    if result.get("stages") is None:
        error = result.get("error") or {}
        raise StageFailed("(stage list)", error.get("message", "DVC could not list the stages"), result["output"])
    return list(result["stages"])


def check_targets_cover(stages: list[str], targets: tuple[str, ...] = STAGE_TARGETS + OPTIONAL_TARGETS) -> None:
    """Fail before running anything if ``dvc.yaml`` has a stage that no target of the flow reproduces."""
    missing = [name for name in stages if name.split("@", 1)[0] not in targets]
    if missing:
        raise RuntimeError(f"dvc.yaml has stages the flow does not run: {', '.join(missing)}; add them to STAGE_TARGETS")


def pipeline_targets(stages: list[str]) -> list[str]:
    """The targets to reproduce, in order: every :data:`STAGE_TARGETS` entry, then the optional ones ``dvc.yaml`` has."""
    check_targets_cover(stages)
    present = {name.split("@", 1)[0] for name in stages}
    return [*STAGE_TARGETS, *(target for target in OPTIONAL_TARGETS if target in present)]


def retry_on_transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only a :class:`StageFailed` with a transient stage exit code."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as exc:
            error = exc
    retry = isinstance(error, StageFailed) and error.transient
    if retry:
        print(f"{error.target}: the stage failed with exit code {error.stage_exit_code} (MLflow tracking did not answer); retrying")
    return retry


# ---------------------------------------------------------------- tasks


@task(name="dvc-repro", task_run_name="repro-{target}", cache_policy=NO_CACHE,
      retries=len(TRACKING_RETRY_DELAYS_SECONDS), retry_delay_seconds=TRACKING_RETRY_DELAYS_SECONDS,
      retry_condition_fn=retry_on_transient_failure)
def reproduce(target: str, project_dir: str = ".", force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item <target>`` through DVC's API (``Repo.reproduce``): DVC reruns the target only if its inputs changed.

    Returns ``{"target", "ran", "skipped", "restored"}``: the stages DVC ran, skipped (up to date or
    restored from its run-cache) and restored, in ``dvc.yaml`` order. Raises :class:`StageFailed`
    (DVC's error and the tail of the stages' output) on failure. Prefect retries the task only when
    the stage exited with a transient code (tracking store down, see
    :func:`retry_on_transient_failure`); inside an attempt, DVC's repository lock is retried once.
    """
    args = [*(["--force"] if force else []), target]
    for attempt in (1, 2):
        result = run_dvc(args, project_dir)
        error = result.get("error")
        if error is None:
            break
        if attempt == 1 and error.get("lock"):
            print(f"{target}: the DVC repository is locked by another process; retrying once in {LOCK_RETRY_DELAY_SECONDS:g} s")
            time.sleep(LOCK_RETRY_DELAY_SECONDS)
            continue
        raise StageFailed(target, error.get("message", "DVC failed"), result["output"], error.get("stage_exit_code"), bool(error.get("lock")))
    report = {key: list(result[key]) for key in ("ran", "skipped", "restored")}
    if not report["ran"] and not report["skipped"]:
        raise RuntimeError(f"dvc repro --single-item {target}: DVC found no stage for this target in dvc.yaml")
    print(f"{target}: ran {', '.join(report['ran']) or 'nothing'}; skipped {', '.join(report['skipped']) or 'nothing'}"
          + (f" (restored from the run-cache: {', '.join(report['restored'])})" if report["restored"] else ""))
    return {"target": target, **report}


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


KEY_FIGURES: dict[str, str] = {"accuracy": "accuracy_new", "robust_accuracy": "robust_accuracy_new", "nfr": "nfr", "rnfr": "rnfr", "snfr": "snfr"}
"""Per-candidate figures published as artifacts (column: key in metrics.json); fractions of the split, flips against the old model."""


def candidate_figures(project_dir: str = ".") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The decision record and one row per candidate on its confirmation split.

    Rows: ``{"candidate", "chosen", "admissible", "split", <KEY_FIGURES columns>...}``, the old model first
    as ``old (reference)`` (its accuracies; flips are measured against it, so none). The candidates and
    their figures come from one source, the decision record (``rcat.results.Layout().decision``): the
    evaluations the gate verified and decided on, so a method's folder left over from an earlier
    configuration never shows. A figure that was not measured is None.
    """
    from rcat.results import Layout

    decision = _read_json(Layout(Path(project_dir) / "data").decision)
    split = decision.get("confirmation_split") or "test"
    evaluations = (decision.get("replay") or {}).get("evaluations") or {}
    chosen = decision.get("candidate")
    rows: list[dict[str, Any]] = []
    reference = next((by_split[split] for by_split in evaluations.values() if (by_split or {}).get(split)), None)
    if reference is not None:
        rows.append({"candidate": "old (reference)", "chosen": False, "admissible": None, "split": split,
                     **dict.fromkeys(KEY_FIGURES),
                     "accuracy": reference.get("accuracy_old"), "robust_accuracy": reference.get("robust_accuracy_old")})
    names = list(decision.get("candidates", {}))
    for name in sorted(names, key=lambda candidate: (candidate != "new", names.index(candidate))):  # the raw update first
        values = (evaluations.get(name) or {}).get(split) or {}
        rows.append({"candidate": name, "chosen": name == chosen,
                     "admissible": decision.get("candidates", {}).get(name, {}).get("admissible"), "split": split,
                     **{column: values.get(key) for column, key in KEY_FIGURES.items()}})
    return decision, rows


def render_decision_markdown(project_dir: str = ".") -> tuple[dict[str, Any], str]:
    """The decision record and a markdown report: verdict, candidate, reasons, one row per candidate."""
    decision, rows = candidate_figures(project_dir)
    split = decision.get("confirmation_split") or "test"

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
    for row in rows:
        if row["candidate"] == "old (reference)":
            lines.append(f"| old (reference) | | {_percent(row['accuracy'])} | {_percent(row['robust_accuracy'])} | | | |")
            continue
        name, admissible = row["candidate"], row["admissible"]
        label = f"**{name}** (chosen)" if row["chosen"] else name
        lines.append(f"| {label} | {'yes' if admissible else 'no' if admissible is not None else 'n/a'} | "
                     f"{_percent(row['accuracy'])} | {_percent(row['robust_accuracy'])} | "
                     f"{_percent(row['nfr'])} | {_percent(row['rnfr'])} | {_percent(row['snfr'])} |")
    lines += ["", "NFR: clean negative flips; RNFR: robust negative flips; S-NFR: samples with either (share of the split)."]
    return decision, "\n".join(lines) + "\n"


EVENT_PREFIX = "rcat.update-check"
"""Every published decision emits ``rcat.update-check.promote`` or ``rcat.update-check.reject`` (payload: verdict,
candidate, reasons; resource ``rcat.project.<directory name>``): a Prefect automation can match the reject."""


@task(name="publish-decision", cache_policy=NO_CACHE)
def publish_decision(project_dir: str = ".") -> dict[str, Any]:
    """Publish ``data/decide/decision.json`` as a markdown artifact and the candidates' key figures as a table."""
    decision, markdown = render_decision_markdown(project_dir)
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="rcat update gate: verdict, reasons and candidate metrics")
    _, rows = candidate_figures(project_dir)
    create_table_artifact(table=rows, key=CANDIDATES_ARTIFACT_KEY,
                          description="Candidates on the confirmation split: fractions in [0, 1], flips against the old model")
    print(f"decision: {decision['verdict']} {decision.get('candidate') or ''} ({'; '.join(decision.get('reasons') or [])})")
    emit_event(event=f"{EVENT_PREFIX}.{decision['verdict']}", resource={"prefect.resource.id": f"rcat.project.{Path(project_dir).resolve().name}"},
               payload={"verdict": decision["verdict"], "candidate": decision.get("candidate"), "reasons": decision.get("reasons") or []})
    return {"verdict": decision["verdict"], "candidate": decision.get("candidate")}


def stage_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per DVC stage: ``ran``, ``reused`` (up to date) or ``restored`` (DVC's run-cache)."""
    rows = []
    for report in reports:
        for stage in report["ran"]:
            rows.append({"target": report["target"], "stage": stage, "status": "ran"})
        for stage in report["skipped"]:
            rows.append({"target": report["target"], "stage": stage, "status": "restored" if stage in report["restored"] else "reused"})
    return rows


def reproduce_pipeline(project_dir: Path, force: bool = False) -> dict[str, list[str]]:
    """Inside a flow: one :func:`reproduce` task per target, in order, then a table artifact of what each stage did.

    Returns ``{"ran", "skipped"}``: the DVC stages run and skipped (up to date or restored), in order.
    """
    if not (project_dir / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{project_dir}: no dvc.yaml; run the flow from the project root or pass project_dir")
    reports = [reproduce(target, str(project_dir), force) for target in pipeline_targets(list_stages(str(project_dir)))]
    create_table_artifact(table=stage_rows(reports), key=STAGES_ARTIFACT_KEY,
                          description="What DVC did per stage: ran, reused (up to date) or restored from its run-cache")
    return {"ran": [s for r in reports for s in r["ran"]], "skipped": [s for r in reports for s in r["skipped"]]}


# ---------------------------------------------------------------- flow


@flow(name="rcat-pipeline", log_prints=True)
def update_pipeline(project_dir: str = ".", force: bool = False) -> dict:
    """Reproduce the DVC pipeline stage by stage (DVC skips what is up to date) and publish the decision.

    Returns ``{"verdict", "candidate", "ran", "skipped"}``: the stages DVC ran and skipped, in order.
    """
    stages = reproduce_pipeline(Path(project_dir).resolve(), force)
    summary = publish_decision(str(Path(project_dir).resolve()))
    return {"verdict": summary["verdict"], "candidate": summary["candidate"], **stages}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the rcat DVC pipeline as a Prefect flow in the current directory.")
    parser.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    result = update_pipeline(project_dir=".", force=parser.parse_args().force)
    print(json.dumps(result, indent=2))
