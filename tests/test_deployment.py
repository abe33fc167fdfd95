"""Scheduled update checks against a real Prefect server (`prefect server start` on 127.0.0.1, started and
stopped here, its database in a temporary PREFECT_HOME): `rcat serve` registers prefect.yaml's
`update-check` deployment with a cron schedule, and a triggered run of it completes with its artifacts,
leaving DVC's workspace up to date (``dvc repro`` would run nothing)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 180.0
DEPLOYMENT = "update-check/update-check"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """This environment without any PREFECT_* setting of the user's, with PREFECT_HOME in ``home``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PATH=str(BIN) + os.pathsep + os.environ.get("PATH", ""))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and its children: SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free port of 127.0.0.1, with its SQLite database in a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'server.db'}"
    log = home / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"prefect server exited with {process.returncode}:\n{log_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if json.loads(response.read()) is True:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer on {url} within {SERVER_START_TIMEOUT:g} s:\n{log_tail(log)}")
            time.sleep(0.5)
        yield {"url": url, "home": str(home)}
    finally:
        stop(process)


@pytest.fixture
def served_workspace(pipeline_workspace, model_files, prefect_server, tmp_path) -> Iterator[tuple[Path, subprocess.Popen, Path]]:
    """The tiny pipeline workspace with the flow code and prefect.yaml, served by `rcat serve` (stopped afterwards)."""
    work = pipeline_workspace  # `rcat init` wrote pipelines/ and prefect.yaml
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tracking"]["enabled"] = False  # MLflow is covered elsewhere; here it only costs time
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "rcat"), "serve", "--project-dir", str(work), "--cron", "30 4 * * 1-5"],
                                   env=prefect_env(tmp_path / "serve-home", prefect_server["url"]), cwd=tmp_path,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield work, process, log
    finally:
        stop(process)


@pytest.mark.slow
def test_served_deployment_is_scheduled_and_a_triggered_run_completes(served_workspace, prefect_server, model_files):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work, serve, log = served_workspace
    old_model, new_model = model_files
    original = yaml.safe_load((work / "params.yaml").read_text())

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        # 1. `rcat serve` registered the deployment, with the cron schedule it was given
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                assert serve.poll() is None, f"rcat serve exited with {serve.returncode}:\n{log_tail(log)}"
                try:
                    deployment = client.read_deployment_by_name(DEPLOYMENT)
                    break
                except Exception:
                    assert time.monotonic() < deadline, f"no deployment {DEPLOYMENT} after 120 s:\n{log_tail(log)}"
                    time.sleep(1)
            assert [schedule.schedule.cron for schedule in deployment.schedules] == ["30 4 * * 1-5"]
            assert all(schedule.active for schedule in deployment.schedules) and not deployment.paused
            assert deployment.entrypoint == "pipelines/update_check.py:update_check"
            assert deployment.parameter_openapi_schema["properties"]["rules"]  # typed parameters reach the server

        # 2. trigger a run with overrides (JSON, as the UI or `prefect deployment run --param` send them)
        rules = {"max_nfr": 0.5}
        flow_run = run_deployment(DEPLOYMENT, timeout=600, poll_interval=2, parameters={
            "champion": str(old_model), "candidate": str(new_model),
            "methods": {"at": {"loss": "at"}}, "rules": rules, "attack": {"steps": 3},
        })
        assert flow_run.state is not None and flow_run.state.is_completed(), f"{flow_run.state}\n{log_tail(log, 80)}"

        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))

    # 3. each stage ran as a task; the decision and the key figures are the run's artifacts
    names = {run.name for run in task_runs}
    assert {"repro-prepare", "repro-attack_cache", "repro-finetune", "repro-evaluate", "repro-decide"} <= names, names
    assert any(name.startswith("apply-overrides") for name in names) and any(name.startswith("publish-decision") for name in names)
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"rcat-decision", "rcat-candidates", "rcat-stages"} <= set(by_key)
    decision = json.loads((work / "data/decide/decision.json").read_text())
    assert f"**Verdict:** {decision['verdict']}" in by_key["rcat-decision"].data
    candidates = json.loads(by_key["rcat-candidates"].data)
    assert [row["candidate"] for row in candidates] == ["old (reference)", "new", "at"]
    metrics = json.loads((work / "data/evaluate/at/metrics.json").read_text())[decision.get("confirmation_split") or "test"]
    assert candidates[2]["rnfr"] == metrics["rnfr"] and candidates[2]["accuracy"] == metrics["accuracy_new"]
    stages = json.loads(by_key["rcat-stages"].data)
    assert {row["stage"] for row in stages if row["status"] == "ran"} >= {"prepare", "train_old", "train_new", "attack_cache",
                                                                         "finetune@at", "evaluate@at", "decide"}

    # 4. the overrides are in params.yaml (rules merged field by field), and DVC finds everything up to date
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["train_old"]["reference"] == str(old_model) and params["train_new"]["reference"] == str(new_model)
    assert params["decision"]["rules"] == {**original["decision"]["rules"], **rules}
    assert params["attack"] == {**original["attack"], "steps": 3}
    assert list(params["finetune"]["methods"]) == ["at"]
    assert decision["rules"]["max_nfr"] == 0.5
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=work, capture_output=True, text=True, check=True,
                            env=dict(os.environ, PATH=str(BIN) + os.pathsep + os.environ["PATH"]))
    assert json.loads(status.stdout) == {}


@pytest.mark.slow
def test_prefect_deploy_with_a_work_pool_and_a_worker(prefect_server, tmp_path):
    """`prefect deploy` registers prefect.yaml's deployment in the `rcat` work pool, its pull step pointing at
    the project; a process worker picks up a run with a bad override, which fails at once, without a retry,
    naming the key, and leaves params.yaml unchanged."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO_ROOT / "pipelines", project / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prefect.yaml", "params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, project / name)
    original = (project / "params.yaml").read_bytes()
    spec = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"][0]
    pool = spec["work_pool"]["name"]
    env = prefect_env(tmp_path / "client-home", prefect_server["url"])

    def prefect(*args: str, timeout: float = 120) -> str:
        result = subprocess.run([str(BIN / "prefect"), *args], check=False, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--name", spec["name"])
    worker = None
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        try:
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(DEPLOYMENT)
            assert deployment.work_pool_name == pool
            assert [schedule.schedule.cron for schedule in deployment.schedules] == [entry["cron"] for entry in spec["schedules"]]
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]

            flow_run = run_deployment(DEPLOYMENT, timeout=0, parameters={"data_source": "ftp:nowhere"})
            log = tmp_path / "worker.log"
            with open(log, "wb") as out:
                worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"], cwd=tmp_path,
                                          env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            worker.wait(timeout=300)
            with get_client(sync_client=True) as client:
                finished = client.read_flow_run(flow_run.id)
                task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            assert finished.state is not None and finished.state.is_failed(), f"{finished.state}\n{log_tail(log)}"
            assert "bad value for 'data.source'" in log.read_text(errors="replace")
            assert [run.name.split("-")[0] for run in task_runs] == ["apply"] and task_runs[0].run_count == 1
            assert (project / "params.yaml").read_bytes() == original
        finally:
            if worker is not None:
                stop(worker)
            # the served-deployment test registers the same name
            with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
                client.delete_deployment(client.read_deployment_by_name(DEPLOYMENT).id)
