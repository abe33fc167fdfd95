"""The Prefect flow (pipelines/update_pipeline.py) drives the same DVC stages as ``dvc repro`` and shares
its outputs, lock file and run-cache: whichever of the two runs second recomputes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `pipelines` is not an installed package; plain `pytest` does not add the root
    sys.path.insert(0, str(REPO_ROOT))

from pipelines import update_pipeline as flow_module
from pipelines.update_pipeline import StageFailed, parse_dvc_output, reproduce, update_pipeline

CANNED_REPRO_OUTPUT = """\
Stage 'finetune@at' didn't change, skipping
Running stage 'finetune@pct':
> python stages/finetune.py pct
Updating lock file 'dvc.lock'

Stage 'finetune@pct_at' is cached - skipping run, checking out outputs
Running stage 'finetune@rcat':
> python stages/finetune.py rcat
Updating lock file 'dvc.lock'
'data/raw.csv.dvc' didn't change, skipping

To track the changes with git, run:

\tgit add dvc.lock
Use `dvc push` to send your updates to remote storage.
"""


def dvc(work: Path, *args: str) -> str:
    result = subprocess.run(["dvc", *args], cwd=work, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def set_param(work: Path, path: str, value) -> None:
    """Set one dotted key of the workspace's params.yaml."""
    params = yaml.safe_load((work / "params.yaml").read_text())
    *parents, leaf = path.split(".")
    section = params
    for key in parents:
        section = section[key]
    section[leaf] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_decision(work: Path) -> dict:
    return json.loads((work / "data/decide/decision.json").read_text())


# ---------------------------------------------------------------- fast: parsing and failure paths


def test_parse_dvc_output_sorts_stages_into_ran_and_skipped():
    report = parse_dvc_output(CANNED_REPRO_OUTPUT)
    assert report == {"ran": ["finetune@pct", "finetune@rcat"],
                      "skipped": ["finetune@at", "finetune@pct_at"],  # unchanged, and restored from the run-cache
                      "restored": ["finetune@pct_at"]}
    assert parse_dvc_output("Data and pipelines are up to date.\n") == {"ran": [], "skipped": [], "restored": []}


def test_failing_stage_raises_with_the_stages_one_line_error(pipeline_workspace):
    """A params.yaml that DVC can read but rcat rejects: the task raises with rcat's own message."""
    work = pipeline_workspace
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["source"] = "nosuch"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(RuntimeError) as raised:
        reproduce.fn("prepare", str(work))
    message = str(raised.value)
    assert isinstance(raised.value, StageFailed) and raised.value.returncode != 0
    assert "rcat: error: params.yaml: bad value for 'data.source'" in message
    assert "unknown data source 'nosuch'" in message
    assert "failed to reproduce 'prepare'" in message  # DVC's own last line
    assert not (work / "data/prepared").exists()


def fake_dvc(monkeypatch, *results: tuple[int, str, str]) -> list[list[str]]:
    """Replace the DVC subprocess by canned (returncode, stdout, stderr) results; returns the calls made."""
    calls: list[list[str]] = []
    queue = list(results)

    def run(args, project_dir):
        calls.append(args)
        code, out, err = queue.pop(0)
        return subprocess.CompletedProcess(["dvc", *args], code, out, err)

    monkeypatch.setattr(flow_module, "run_dvc", run)
    monkeypatch.setattr(flow_module, "LOCK_RETRY_DELAY_SECONDS", 0.0)
    return calls


LOCKED = "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly.\n"


def test_only_a_lock_error_is_retried_once(monkeypatch):
    calls = fake_dvc(monkeypatch, (255, "", LOCKED), (0, "Running stage 'decide':\n", ""))
    assert reproduce.fn("decide", ".", force=True) == {"target": "decide", "ran": ["decide"], "skipped": [], "restored": []}
    assert calls == [["repro", "--single-item", "--force", "decide"]] * 2

    calls = fake_dvc(monkeypatch, (255, "", LOCKED), (255, "", LOCKED))
    with pytest.raises(StageFailed, match="Unable to acquire lock"):
        reproduce.fn("decide", ".")
    assert len(calls) == 2

    calls = fake_dvc(monkeypatch, (255, "Running stage 'decide':\n", "rcat: error: boom\nERROR: failed to reproduce 'decide'\n"))
    with pytest.raises(StageFailed, match="rcat: error: boom"):
        reproduce.fn("decide", ".")
    assert calls == [["repro", "--single-item", "decide"]]  # a failing stage is not retried


# ---------------------------------------------------------------- slow: the real pipeline, flow and dvc repro in turn


@pytest.mark.slow
def test_flow_and_dvc_repro_share_outputs(prefect_harness, pipeline_workspace):
    """Fresh workspace: the flow runs every stage; a second flow run and `dvc repro` run nothing. After a
    param change reproduced by `dvc repro`, the flow runs nothing; reverting it, DVC restores the old
    output from its run-cache; a method's param change makes the flow rerun exactly the stale stages."""
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    work = pipeline_workspace
    # two methods are enough to show the fan-out (each stage costs a process start; the end-to-end
    # test in test_pipeline.py runs all of them)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["finetune"]["methods"] = {name: params["finetune"]["methods"][name] for name in ("at", "rcat")}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = dvc(work, "stage", "list", "--name-only").split()
    methods = params["finetune"]["methods"]
    assert len(stages) == 6 + 2 * len(methods) and stages[0] == "prepare" and stages[-2:] == ["decide", "report"]
    rcat_stages = ["finetune@rcat", "evaluate@rcat", "decide", "report"]

    # 1. fresh: the flow runs every stage, in dvc.yaml's order, and publishes the decision.
    state = update_pipeline(project_dir=str(work), return_state=True)
    first = state.result()
    assert first["ran"] == stages and first["skipped"] == []
    decision = read_decision(work)
    assert (first["verdict"], first["candidate"]) == (decision["verdict"], decision["candidate"])
    assert decision["verdict"] in {"promote", "reject"}

    from prefect.events.filters import EventFilter, EventNameFilter

    events: list = []
    for _ in range(60):  # events reach the server asynchronously
        with get_client(sync_client=True) as client:
            query = {"filter": EventFilter(event=EventNameFilter(prefix=["rcat.update-check."])).model_dump(mode="json")}
            events = client.request("POST", "/events/filter", json=query).json()["events"]
        if events:
            break
        time.sleep(0.5)
    assert [event["event"] for event in events][-1:] == [f"rcat.update-check.{decision['verdict']}"]  # an automation can match a reject
    assert events[-1]["payload"]["candidate"] == decision["candidate"]

    artifact = Artifact.get("rcat-decision")
    assert artifact is not None and artifact.flow_run_id == state.state_details.flow_run_id
    assert f"**Verdict:** {decision['verdict']}" in artifact.data
    for candidate in decision["candidates"]:
        assert f"| {candidate} |" in artifact.data or f"| **{candidate}** (chosen) |" in artifact.data
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert {f"repro-{target}" for target in flow_module.STAGE_TARGETS} <= {run.name for run in task_runs}

    # 2. the flow again, then dvc repro: nothing runs, nothing is rewritten.
    lock_before = (work / "dvc.lock").read_bytes()
    decision_mtime = (work / "data/decide/decision.json").stat().st_mtime_ns
    second = update_pipeline(project_dir=str(work))
    assert second == {"verdict": decision["verdict"], "candidate": decision["candidate"], "ran": [], "skipped": stages}
    repro = dvc(work, "repro")
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro
    assert (work / "dvc.lock").read_bytes() == lock_before
    assert (work / "data/decide/decision.json").stat().st_mtime_ns == decision_mtime

    # 3. dvc repro reproduces a change of the gate's rules (`decide`, then the report); the flow then runs nothing.
    original_rule = yaml.safe_load((work / "params.yaml").read_text())["decision"]["rules"]["max_nfr"]
    set_param(work, "decision.rules.max_nfr", original_rule / 2)
    repro = dvc(work, "repro")
    assert [line.split("'")[1] for line in repro.splitlines() if line.startswith("Running stage")] == ["decide", "report"]
    changed = read_decision(work)
    assert changed["rules"]["max_nfr"] == original_rule / 2
    third = update_pipeline(project_dir=str(work))
    assert third["ran"] == [] and third["skipped"] == stages
    assert (third["verdict"], third["candidate"]) == (changed["verdict"], changed["candidate"])

    # 4. back to the original rule: DVC restores the first decision from its run-cache, running nothing.
    set_param(work, "decision.rules.max_nfr", original_rule)
    fourth = update_pipeline(project_dir=str(work))
    assert fourth["ran"] == [] and fourth["skipped"] == stages
    assert read_decision(work) == decision

    # 5. one method's params change: the flow reruns exactly its stages, in order, across three tasks;
    #    DVC then finds everything up to date.
    set_param(work, "finetune.methods.rcat.beta", 0.3)
    fifth = update_pipeline(project_dir=str(work))
    assert fifth["ran"] == rcat_stages
    assert fifth["skipped"] == [stage for stage in stages if stage not in rcat_stages]
    assert (fifth["verdict"], fifth["candidate"]) == (read_decision(work)["verdict"], read_decision(work)["candidate"])
    assert json.loads(dvc(work, "status", "--json")) == {}
    assert "Data and pipelines are up to date" in dvc(work, "status")
