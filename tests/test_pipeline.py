"""End-to-end: the real DVC pipeline on reduced params in a temporary project."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time

import pytest
import yaml

pytestmark = pytest.mark.slow


CHECK_COLUMNS = ("verdict", "candidate", "accuracy", "robust_accuracy", "nfr", "rnfr", "snfr", "promote")
"""data/decide/check.json's keys in the order `dvc exp show` shows them."""
SHOW_CHANGED = ("exp", "show", "--no-pager", "--only-changed", "--keep", "^(verdict|candidate)$")
"""The README's command for comparing checks in a terminal: what differs between them, and always the verdict and candidate."""


def dvc(work, *args, env=None):
    result = subprocess.run(["dvc", *args], cwd=work, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_dvc_repro_end_to_end(reproduced_project, reproduced_workspace):
    """repro runs every stage; a second repro runs none; metrics, decision and MLflow runs exist;
    a change to one method's params reruns only that method's stages and the decision."""
    _, first, spawned = reproduced_project  # the session's one `dvc repro` of a fresh project (conftest)
    work = reproduced_workspace
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["engine"]["workers"] == 2  # every attack ran its chunks in two local processes
    # the workers ran, and no DVC stage started a Prefect API server (or anything of Prefect's)
    assert any("multiprocessing" in command and "spawn" in command for command in spawned), sorted(spawned)
    assert not [command for command in spawned if "prefect" in command or "uvicorn" in command], sorted(spawned)
    manifests = list((work / params["engine"]["cache_dir"]).glob("*/manifest.json"))
    assert manifests and all({c["torch_threads"] for c in json.loads(m.read_text())["chunks"]} == {1} for m in manifests)
    methods = list(params["finetune"]["methods"])
    for stage in ["prepare", "train_old", "train_new", "attack_cache", "decide", *(f"finetune@{m}" for m in methods), *(f"evaluate@{m}" for m in methods)]:
        assert f"Running stage '{stage}'" in first

    second = dvc(work, "repro")
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second

    shown = json.loads(dvc(work, "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    assert list(files) == ["data/decide/check.json"]  # the one DVC metric: the check's headline
    for method in methods:
        metrics = json.loads((work / f"data/evaluate/{method}/metrics.json").read_text())
        for split in ("validation", "test"):
            for key in ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr", "btc"):
                assert 0.0 <= metrics[split][key] <= 1.0
            assert metrics[split]["n_samples"] == 360
    check = files["data/decide/check.json"]["data"]
    recorded = json.loads((work / "data/decide/decision.json").read_text())
    assert check["verdict"] == recorded["verdict"] and check["promote"] == int(recorded["verdict"] == "promote")
    subprocess.run(["git", "add", "-A"], cwd=work, check=True, capture_output=True)  # experiments need a baseline commit
    subprocess.run(["git", "-c", "user.name=rcat-test", "-c", "user.email=test@rcat", "commit", "-qm", "baseline"], cwd=work, check=True)
    header = dvc(work, "exp", "show", "--csv").splitlines()[0].split(",")
    # `dvc exp show` leads with the verdict: the first metric column (DVC keeps check.json's key order), before every param
    assert header[header.index("Created") + 2 : header.index("Created") + 10] == list(CHECK_COLUMNS), header[:14]
    assert header.index("promote") < header.index("seed"), header[:20]

    decision = json.loads((work / "data/decide/decision.json").read_text())
    # the verdict follows from the record: a promotion names an admissible candidate, a rejection none
    assert decision["verdict"] == ("promote" if decision["candidate"] else "reject")
    assert decision["candidate"] is None or decision["candidates"][decision["candidate"]]["admissible"]
    assert decision["reasons"]
    assert set(decision["candidates"]) == {"new", *methods}
    assert set(decision["inputs"]["models"]) == {"old", "new", *methods}
    assert all(decision["inputs"]["models"].values())
    assert set(decision["inputs"]["data"]) == {"finetune", "validation", "test"}
    assert decision["inputs"]["library_versions"]["torchattacks"].startswith("3.3")
    replayed = subprocess.run(["rcat", "decide", "--replay", "data/decide/decision.json"], cwd=work, capture_output=True, text=True)
    assert replayed.returncode == 0 and "matches the record" in replayed.stdout, replayed.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("rcat.child") == "__parent__"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["rcat.verdict"] == decision["verdict"]
    children = {run.data.tags["rcat.child"]: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {f"candidate:{m}" for m in [*methods, "new"]} <= set(children)
    # the attack engine's figures, per model and split, on the attack_cache stage's run
    engine = children["attack_cache"].data.metrics
    for role in ("old", "new"):
        assert engine[f"engine/{role}/test/samples"] == 360
        assert engine[f"engine/{role}/test/samples_per_s"] > 0
        assert engine[f"engine/{role}/test/robust_accuracy"] == pytest.approx(engine[f"test/{role}/robust_accuracy"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    assert parent.info.run_name.startswith("check ") and parent.info.run_name.endswith(f"{decision['verdict']} {check['candidate']}")
    assert parent.data.metrics["check/rnfr"] == pytest.approx(check["rnfr"])
    keys = {name: {key for key in children[f"candidate:{name}"].data.metrics} for name in ["new", *methods]}
    assert all(found == keys["new"] for found in keys.values()), keys  # every candidate run has the same metric keys
    # the key figures sort first on MLflow's compare page (key/ < test/ < validation/), with the confirmation split's values
    new_metrics = children["candidate:new"].data.metrics
    assert min(keys["new"]).startswith("key/") and new_metrics["key/rnfr"] == pytest.approx(new_metrics["test/rnfr"])
    for method in methods:
        child = children[f"candidate:{method}"]
        assert child.data.params["loss"] == params["finetune"]["methods"][method]["loss"]
        on_disk = json.loads((work / f"data/evaluate/{method}/metrics.json").read_text())
        assert child.data.metrics["test/rnfr"] == pytest.approx(on_disk["test"]["rnfr"])
        assert "flips" in {item.path for item in client.list_artifacts(child.info.run_id)}
        training = children[f"finetune:{method}"]
        assert "model" in {item.path for item in client.list_artifacts(training.info.run_id)} and "train/loss" in training.data.metrics

    # Change only RCAT's beta: only its fine-tune, its evaluation and the decision are stale.
    params["finetune"]["methods"]["rcat"]["beta"] = 0.3
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc(work, "status", "--json"))) == {"finetune@rcat", "decide"}
    third = dvc(work, "repro")
    ran = {line.split("'")[1] for line in third.splitlines() if line.startswith("Running stage")}
    assert ran == {"finetune@rcat", "evaluate@rcat", "decide", "report"}

    # A rules-only change reruns decide (and the report) alone; the new check's parent run still has every candidate,
    # logged by decide from the evaluations DVC reused.
    params["decision"]["rules"]["max_nfr"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc(work, "repro")
    assert {line.split("'")[1] for line in fourth.splitlines() if line.startswith("Running stage")} == {"decide", "report"}
    runs = client.search_runs([experiment.experiment_id])
    newest = max((run for run in runs if run.data.tags.get("rcat.child") == "__parent__"), key=lambda run: run.info.start_time)
    assert newest.info.run_id not in {parent.info.run_id}
    logged = {run.data.tags["rcat.child"] for run in runs if run.data.tags.get("mlflow.parentRunId") == newest.info.run_id}
    assert {f"candidate:{m}" for m in ["new", *methods]} <= logged, logged


def test_queued_experiment_logs_into_the_project_store_and_shows_its_verdict(reproduced_workspace):
    """`dvc exp run --queue -S ...` then `dvc queue start`: the check runs in DVC's temporary workspace, logs its
    parent run into the project's own mlflow.db, and `dvc exp show` gives the experiment's verdict and figures."""
    import psutil
    from mlflow.tracking import MlflowClient

    work = reproduced_workspace
    subprocess.run(["git", "add", "-A"], cwd=work, check=True, capture_output=True)  # experiments need a baseline commit
    subprocess.run(["git", "-c", "user.name=rcat-test", "-c", "user.email=test@rcat", "commit", "-qm", "baseline"], cwd=work, check=True)
    baseline = json.loads((work / "data/decide/check.json").read_text())
    rule = yaml.safe_load((work / "params.yaml").read_text())["decision"]["rules"]["max_nfr"]
    dvc(work, "exp", "run", "--queue", "-S", f"decision.rules.max_nfr={rule / 2}", "-n", "stricter-nfr")
    try:
        dvc(work, "queue", "start")
        deadline = time.monotonic() + 600
        while True:
            status = dvc(work, "queue", "status")
            if "Queued" not in status and "Running" not in status:
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=work, capture_output=True)
    assert "Success" in status, status + dvc(work, "queue", "logs", "stricter-nfr")

    rows = {row["Experiment"] or row["rev"]: row for row in csv.DictReader(io.StringIO(dvc(work, "exp", "show", "--csv")))}
    for name in ("workspace", "stricter-nfr"):
        assert rows[name]["verdict"] == baseline["verdict"] and rows[name]["candidate"] == (baseline["candidate"] or "")
        assert float(rows[name]["rnfr"]) == pytest.approx(baseline["rnfr"])  # a rules-only change: the same evaluations
    assert float(rows["stricter-nfr"]["decision.rules.max_nfr"]) == pytest.approx(rule / 2)
    # as a person sees it in a 200-column terminal: no line wider, the verdict and the changed param in full
    table = dvc(work, *SHOW_CHANGED, env={**os.environ, "COLUMNS": "200"})
    lines = table.splitlines()
    assert lines and max(len(line) for line in lines) <= 200, table
    header = next(line for line in lines if "Experiment" in line)
    assert {"verdict", "candidate", "decision.rules.max_nfr"} <= set(header.split()), table
    row = next(line for line in lines if "stricter-nfr" in line)
    assert baseline["verdict"] in row.split() and f"{rule / 2:g}" in row, table

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")  # the project's own store
    experiment = client.get_experiment_by_name(yaml.safe_load((work / "params.yaml").read_text())["tracking"]["experiment"])
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`rcat.child` = '__parent__'")
    assert sorted(float(run.data.params["decision.rules.max_nfr"]) for run in parents) == pytest.approx(sorted([rule / 2, rule]))
    assert not [path for path in (work / ".dvc").rglob("mlflow.db")]  # nothing logged into a throwaway store
    workers = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if "queue-worker" in " ".join(process.info["cmdline"] or []) and str(process.info["cwd"] or "").startswith(str(work)):
            workers.append(process.info["cmdline"])
    assert not workers  # `dvc queue stop` left no worker behind
