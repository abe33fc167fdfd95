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

from pipelines import dvc_repro
from pipelines import update_pipeline as flow_module
from pipelines.update_pipeline import StageFailed, reproduce, update_pipeline


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


def test_failing_stage_raises_with_the_stages_one_line_error(pipeline_workspace):
    """A params.yaml that DVC can read but rcat rejects: the task raises with rcat's own message."""
    work = pipeline_workspace
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["source"] = "nosuch"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(RuntimeError) as raised:
        reproduce.fn("prepare", str(work))
    message = str(raised.value)
    assert isinstance(raised.value, StageFailed) and raised.value.stage_exit_code == 2  # EXIT_BAD_INPUT, not retried
    assert "rcat: error: params.yaml: bad value for 'data.source'" in message
    assert "unknown data source 'nosuch'" in message
    assert "failed to reproduce 'prepare'" in message  # DVC's own error
    assert not (work / "data/prepared").exists()


def fake_dvc(monkeypatch, *results: dict) -> list[list[str]]:
    """Replace the DVC child process by canned results (as pipelines/dvc_repro.py writes them); returns the calls made."""
    calls: list[list[str]] = []
    queue = list(results)

    def run(args, project_dir):
        calls.append(args)
        return {"ran": [], "skipped": [], "restored": [], "error": None, "output": "", **queue.pop(0)}

    monkeypatch.setattr(flow_module, "run_dvc", run)
    monkeypatch.setattr(flow_module, "LOCK_RETRY_DELAY_SECONDS", 0.0)
    return calls


LOCKED = {"error": {"message": "Unable to acquire lock. Most likely another DVC process is running", "stage_exit_code": None, "lock": True}}


def test_only_a_lock_error_is_retried_once(monkeypatch):
    calls = fake_dvc(monkeypatch, LOCKED, {"ran": ["decide"]})
    assert reproduce.fn("decide", ".", force=True) == {"target": "decide", "ran": ["decide"], "skipped": [], "restored": []}
    assert calls == [["--force", "decide"]] * 2

    calls = fake_dvc(monkeypatch, LOCKED, LOCKED)
    with pytest.raises(StageFailed, match="Unable to acquire lock") as raised:
        reproduce.fn("decide", ".")
    assert len(calls) == 2 and raised.value.lock

    failing = {"error": {"message": "failed to reproduce 'decide': failed to run: python stages/decide.py, exited with 2",
                         "stage_exit_code": 2, "lock": False}, "output": "rcat: error: boom\n"}
    calls = fake_dvc(monkeypatch, failing)
    with pytest.raises(StageFailed, match="rcat: error: boom") as raised:
        reproduce.fn("decide", ".")
    assert calls == [["decide"]] and raised.value.stage_exit_code == 2 and not raised.value.transient  # not retried


def test_dvc_api_child_reports_ran_skipped_and_restored(pipeline_workspace):
    """pipelines/dvc_repro.py against a real project: what ran, what was up to date, what DVC's run-cache restored."""
    work = pipeline_workspace
    assert "prepare" in flow_module.list_stages(str(work)) and "finetune@at" in flow_module.list_stages(str(work))
    first = flow_module.run_dvc(["prepare"], str(work))
    assert (first["ran"], first["skipped"], first["restored"], first["error"]) == (["prepare"], [], [], None)
    again = flow_module.run_dvc(["prepare"], str(work))
    assert (again["ran"], again["skipped"], again["restored"]) == ([], ["prepare"], [])
    lock = (work / "dvc.lock").read_text()
    original = yaml.safe_load((work / "params.yaml").read_text())["data"]["test_fraction"]
    set_param(work, "data.test_fraction", round(original - 0.05, 4))
    changed = flow_module.run_dvc(["prepare"], str(work))
    assert (changed["ran"], changed["error"]) == (["prepare"], None), (changed["error"], changed["output"][-1500:])
    assert (work / "dvc.lock").read_text() != lock
    set_param(work, "data.test_fraction", original)
    restored = flow_module.run_dvc(["prepare"], str(work))  # back to the first params: DVC's run-cache has the outputs
    assert (restored["ran"], restored["skipped"], restored["restored"]) == ([], ["prepare"], ["prepare"])
    assert (work / "dvc.lock").read_text() == lock


def test_dvc_api_child_reads_the_stage_exit_code():
    from dvc.exceptions import ReproductionError
    from dvc.lock import LockError
    from dvc.stage.exceptions import StageCmdFailedError

    try:
        try:
            raise StageCmdFailedError("python stages/decide.py", 4)
        except StageCmdFailedError as cause:
            raise ReproductionError("failed to reproduce 'decide'") from cause
    except ReproductionError as error:
        described = dvc_repro.describe_error(error)
    assert described == {"message": "failed to reproduce 'decide': failed to run: python stages/decide.py, exited with 4",
                         "stage_exit_code": 4, "lock": False}
    assert dvc_repro.describe_error(LockError("Unable to acquire lock"))["lock"]
    assert dvc_repro.describe_error(ReproductionError("bad dvc.yaml"))["stage_exit_code"] is None


# ---------------------------------------------------------------- slow: the real pipeline, flow and dvc repro in turn


@pytest.mark.slow
def test_flow_and_dvc_repro_share_outputs(prefect_harness, reproduced_workspace):
    """After `dvc repro`, the flow runs nothing and publishes the decision (artifact, event); `dvc repro` after
    the flow runs nothing either. After a param change reproduced by `dvc repro`, reverting it, the flow runs
    nothing: DVC restores the old output from its run-cache; a method's param change makes the flow
    rerun exactly the stale stages. (A fresh project's flow run, every stage ran: tests/test_deployment.py.)"""
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    work = reproduced_workspace  # a copy of the session's project after one `dvc repro` (conftest)
    params = yaml.safe_load((work / "params.yaml").read_text())
    stages = dvc(work, "stage", "list", "--name-only").split()
    methods = params["finetune"]["methods"]
    assert len(stages) == 6 + 2 * len(methods) and stages[0] == "prepare" and stages[-2:] == ["decide", "report"]
    rcat_stages = ["finetune@rcat", "evaluate@rcat", "decide", "report"]
    lock_before = (work / "dvc.lock").read_bytes()
    decision_mtime = (work / "data/decide/decision.json").stat().st_mtime_ns

    # 1. after dvc repro: the flow runs nothing, every stage up to date, and publishes the decision.
    state = update_pipeline(project_dir=str(work), return_state=True)
    first = state.result()
    decision = read_decision(work)
    assert first == {"verdict": decision["verdict"], "candidate": decision["candidate"], "ran": [], "skipped": stages}
    # the verdict follows from the record: a promotion names an admissible candidate, a rejection none
    assert decision["verdict"] == ("promote" if decision["candidate"] else "reject")
    assert decision["candidate"] is None or decision["candidates"][decision["candidate"]]["admissible"]

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

    # 2. dvc repro after the flow: nothing runs, nothing is rewritten.
    repro = dvc(work, "repro")
    assert "Running stage" not in repro and "Data and pipelines are up to date" in repro
    assert (work / "dvc.lock").read_bytes() == lock_before
    assert (work / "data/decide/decision.json").stat().st_mtime_ns == decision_mtime

    # 3. dvc repro reproduces a change of the gate's rules (`decide`, then the report). (That the flow then runs
    #    nothing is step 1's property; a flow run here would cost the suite half a minute and prove nothing new.)
    original_rule = yaml.safe_load((work / "params.yaml").read_text())["decision"]["rules"]["max_nfr"]
    set_param(work, "decision.rules.max_nfr", original_rule / 2)
    repro = dvc(work, "repro")
    assert [line.split("'")[1] for line in repro.splitlines() if line.startswith("Running stage")] == ["decide", "report"]
    assert read_decision(work)["rules"]["max_nfr"] == original_rule / 2

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
