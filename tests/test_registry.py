"""MLflow registry decisions, run comparison and sequential update checks, against a real tracking server.

A module-scoped fixture starts ``mlflow server`` on 127.0.0.1 (a free port, SQLite store and
artifacts in a temporary directory) and always stops it. The update checks run in-process on the
digits with tiny models, one fine-tune method and a 5-step attack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import free_port, reduced_params, stop_process_group, wait_for
from conftest import mlflow_server as start_mlflow_server

EXPERIMENT = "rcat-registry-test"
MODEL_NAME = "rcat-registry-test"
LAX_RULES = {"max_nfr": None, "max_rnfr": None, "min_accuracy_delta": None, "min_robust_accuracy_delta": None}
IMPOSSIBLE_RULES = LAX_RULES | {"min_accuracy_delta": 1.0}  # no candidate gains 100 points of accuracy


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1; MLFLOW_TRACKING_URI points at it for the module."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", url)
        yield url


def _perturbed(network, spec, path: Path, seed: int) -> Path:
    from rcat.models import save_model

    copy = spec.build()
    copy.load_state_dict(network.state_dict())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for parameter in copy.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    save_model(copy, spec, path)
    return path


def _small_digits(path: Path) -> str:
    """The first 500 digits as an ``npz:`` source: every class present, a quarter of the attack and fine-tune work."""
    import numpy as np

    from rcat.data import load_dataset

    digits = load_dataset("digits")
    np.savez(path, images=digits.images[:500].numpy(), labels=digits.labels[:500].numpy())
    return f"npz:{path}"


def _raw_params(root: Path, cache_dir: Path, old: str, new: str, rules: dict, rank_by: str = "snfr") -> dict:
    raw = reduced_params(root)
    raw["device"] = "cpu"
    raw["data"]["source"] = _small_digits(cache_dir.parent / "digits500.npz")
    raw["train_old"]["reference"] = old
    raw["train_new"]["reference"] = new
    raw["finetune"]["epochs"] = 1
    raw["finetune"]["methods"] = {"at": {"loss": "at"}}
    raw["decision"]["rules"] = rules
    raw["decision"]["rank_by"] = rank_by
    raw["engine"]["cache_dir"] = str(cache_dir)  # shared by every check, as on one machine
    raw["tracking"].update({"experiment": EXPERIMENT, "registered_model": MODEL_NAME})
    return raw


def _decide(root: Path, raw: dict):
    from rcat import pipeline
    from rcat.config import parse_params
    from rcat.tracking import Tracker

    params = parse_params(raw, "test params")
    tracker = Tracker(params, root=root)
    return params, pipeline.Layout(root / "data"), tracker, pipeline.decide(params, pipeline.Layout(root / "data"), tracker)


def _run_check(root: Path, raw: dict):
    """Every stage of one update check, in-process, as ``dvc repro`` runs them; returns (params, layout, tracker, record)."""
    from rcat import pipeline
    from rcat.config import parse_params
    from rcat.tracking import Tracker

    params = parse_params(raw, "test params")
    layout = pipeline.Layout(root / "data")
    tracker = Tracker(params, root=root)
    pipeline.prepare(params, layout, tracker)
    for role in ("old", "new"):
        pipeline.train(params, role, layout, tracker)
    pipeline.attack_cache(params, layout, tracker)
    for method in params.finetune.methods:
        pipeline.finetune_method(params, method, layout, tracker)
        pipeline.evaluate_method(params, method, layout, tracker)
    return params, layout, tracker, pipeline.decide(params, layout, tracker)


def _candidate_file(layout, candidate: str) -> Path:
    return layout.model("new") if candidate == "new" else layout.finetuned(candidate)


def _candidate_outcomes(layout, candidate: str) -> pd.DataFrame:
    """A candidate's own attack outcomes as its check computed them (``new`` in the baseline cache)."""
    from rcat.safe_io import read_parquet

    if candidate == "new":
        frame = read_parquet(layout.attack_cache / "outcomes.parquet")
        return frame[frame["model"] == "new"]
    return read_parquet(layout.evaluation(candidate) / "outcomes.parquet")


def _versions_of(client, run_id: str) -> dict[str, str]:
    """The versions whose latest check is ``run_id`` (a version is reused, and retagged, by every check of its weights)."""
    return {v.tags["rcat.candidate"]: v.version for v in client.search_model_versions(f"name = '{MODEL_NAME}'")
            if v.tags.get("rcat.update_check") == run_id}


def _serve_and_predict(model_uri: str, batch, expected) -> None:
    """``mlflow models serve`` (this environment, one worker) on 127.0.0.1 answers /invocations with the class scores."""
    import numpy as np

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    body = json.dumps({"inputs": batch.tolist()}).encode()

    def predict():
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return np.asarray(json.loads(answer.read())["predictions"], dtype=np.float32)

    try:
        predictions = wait_for(server, predict, Path(log.name), "mlflow models serve did not answer")
        assert predictions.shape == expected.shape and np.allclose(predictions, expected, atol=1e-5)
    finally:
        stop_process_group(server)
        log.close()


@pytest.mark.slow
def test_update_checks_in_sequence_move_champion_only_on_pass(mlflow_server, tmp_path, trained_mlp, monkeypatch):
    """M0 -> M1 -> M2 through two passing checks, then a rejected, an incomplete and a repeated check that move nothing."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from rcat.data import load_split
    from rcat.engine import run_key
    from rcat.metrics import compare_outcomes
    from rcat.models import load_model, load_model_reference, save_model
    from rcat.pipeline import EVALUATED_SPLITS, flip_set
    from rcat.registry import CHALLENGER, CHAMPION, HISTORY_TAG, PREVIOUS_CHAMPION, REJECTED_TAG, pinned_reference
    from rcat.safe_io import parquet_metadata, read_json, read_parquet
    from rcat.tracking import candidate_filter, flatten_metrics

    client = MlflowClient(tracking_uri=mlflow_server)
    network, spec = trained_mlp
    models = tmp_path / "models"
    m0 = models / "m0.safetensors"
    save_model(network, spec, m0)
    cache_dir = tmp_path / "attack-cache"

    # ---- check 1: old = M0 (a local file), lax gate -> promote; champion = M1
    root1 = tmp_path / "check1"
    raw1 = _raw_params(root1, cache_dir, str(m0), str(_perturbed(network, spec, models / "new1.safetensors", seed=0)), LAX_RULES)
    _, layout1, tracker1, record1 = _run_check(root1, raw1)
    assert record1["verdict"] == "promote", record1["reasons"]
    parent1 = tracker1.parent().run_id
    versions1 = _versions_of(client, parent1)
    assert set(versions1) == {"new", "at"}  # the candidate and each fine-tuned model, with the check's run as source
    m1_version = versions1[record1["candidate"]]
    registered = client.get_registered_model(MODEL_NAME)
    assert registered.aliases[CHAMPION] == m1_version
    assert registered.aliases[CHALLENGER] == m1_version  # the best admissible candidate (here also the promoted one)
    assert PREVIOUS_CHAMPION not in registered.aliases  # there was no champion before
    m1_digest = load_model(_candidate_file(layout1, record1["candidate"])).digest
    for candidate, version in versions1.items():
        detail = client.get_model_version(MODEL_NAME, version)
        assert detail.run_id == parent1 and detail.tags["rcat.update_check"] == parent1
        assert (Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/{version}")) / "MLmodel").is_file()
        assert detail.tags["rcat.weights_digest"] == load_model(_candidate_file(layout1, candidate)).digest
        assert detail.tags["rcat.decision"] == ("promoted" if candidate == record1["candidate"] else "admissible")
        assert float(detail.tags["test/rnfr"]) == pytest.approx(record1["replay"]["evaluations"][candidate]["test"]["rnfr"], abs=1e-6)
    assert load_model_reference(f"models:/{MODEL_NAME}@{CHAMPION}").digest == m1_digest

    # comparison: one child run per candidate with the same evaluation metric keys, flip tables, plots, decision record
    rows = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=candidate_filter(parent1))
    assert sorted(rows["tags.rcat.child"]) == ["candidate:at", "candidate:new"]
    expected_keys = set(flatten_metrics(read_json(layout1.evaluation("at") / "metrics.json")))
    for _, row in rows.iterrows():
        candidate = row["tags.rcat.child"].split(":", 1)[1]
        metrics = client.get_run(row["run_id"]).data.metrics
        assert {key for key in metrics if key.split("/")[0] in EVALUATED_SPLITS} == expected_keys
        on_disk = read_json(layout1.evaluation(candidate) / "metrics.json")
        assert row["metrics.test/rnfr"] == pytest.approx(on_disk["test"]["rnfr"])
        assert row["metrics.validation/snfr"] == pytest.approx(on_disk["validation"]["snfr"])
        table = client.load_table(row["experiment_id"], f"flips/{candidate}.json", run_ids=[row["run_id"]])
        flips = read_parquet(layout1.evaluation(candidate) / "flips.parquet")
        assert len(table) == len(flip_set(flips)) > 0
        assert "flips/flips.parquet" in {item.path for item in client.list_artifacts(row["run_id"], "flips")}
    parent_artifacts = {item.path for item in client.list_artifacts(parent1)} | {item.path for item in client.list_artifacts(parent1, "plots")}
    assert {"decision.json", "registry.json", "tradeoff.csv", "plots/tradeoff.png"} <= parent_artifacts

    # ---- check 2: old = the champion of check 1 (models:/...@champion), a new candidate, lax gate -> promote
    assert pinned_reference(MODEL_NAME) == f"models:/{MODEL_NAME}/{m1_version}"
    # (train_old.reference: champion, the documented way: the champion pinned in the project's rcat-champion.json)
    from rcat.config import parse_params
    from rcat.registry import CHAMPION_PIN, write_champion_pin

    root2 = tmp_path / "check2"
    root2.mkdir()
    monkeypatch.chdir(root2)  # the pin lives at the project root
    raw2 = _raw_params(root2, cache_dir, "champion", str(_perturbed(network, spec, models / "new2.safetensors", seed=1)), LAX_RULES)
    assert write_champion_pin(parse_params(raw2))["reference"] == f"models:/{MODEL_NAME}/{m1_version}"
    params2, layout2, tracker2, record2 = _run_check(root2, raw2)
    assert record2["inputs"]["old_reference"] == f"models:/{MODEL_NAME}/{m1_version}"  # the decision names the registry version
    assert record2["verdict"] == "promote", record2["reasons"]
    parent2 = tracker2.parent().run_id
    assert parent2 != parent1

    # the second check's baseline attack cache is keyed to M1 ...
    old2 = load_model(layout2.model("old"))
    assert old2.digest == m1_digest
    assert parquet_metadata(layout2.attack_cache / "outcomes.parquet")["old_digest"] == m1_digest
    outcomes2 = read_parquet(layout2.attack_cache / "outcomes.parquet")
    assert set(outcomes2.loc[outcomes2["model"] == "old", "model_digest"]) == {m1_digest}
    chunk_size = params2.engine.effective_chunk_size(params2.attack.batch_size)
    for split in EVALUATED_SPLITS:
        key = run_key(old2.network, load_split(layout2.split(split)), params2.attack, params2.seed, chunk_size)
        assert (cache_dir / key / "manifest.json").is_file()
    # ... so M1's outcomes there are the ones check 1 measured for M1, and check 2's flips are measured against them
    m1_outcomes = _candidate_outcomes(layout1, record1["candidate"])
    new2_outcomes = outcomes2[outcomes2["model"] == "new"]
    flips2 = read_parquet(layout2.attack_cache / "flips.parquet")
    for split in EVALUATED_SPLITS:
        old_rows = outcomes2[(outcomes2["model"] == "old") & (outcomes2["split"] == split)].sort_values("sample_index")
        check1_rows = m1_outcomes[m1_outcomes["split"] == split].sort_values("sample_index")
        assert old_rows["robust"].tolist() == check1_rows["robust"].tolist()
        _, expected = compare_outcomes(check1_rows, new2_outcomes[new2_outcomes["split"] == split])
        got = flips2[flips2["split"] == split][list(expected.columns)].sort_values("sample_index").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected.sort_values("sample_index").reset_index(drop=True))

    versions2 = _versions_of(client, parent2)
    m2_version = versions2[record2["candidate"]]
    registered = client.get_registered_model(MODEL_NAME)
    assert registered.aliases[CHAMPION] == m2_version != m1_version
    # decide moved the champion and refreshed the pin: the next `dvc repro` checks against M2
    assert json.loads(CHAMPION_PIN.read_text())["reference"] == f"models:/{MODEL_NAME}/{m2_version}"
    assert registered.aliases[PREVIOUS_CHAMPION] == m1_version
    history = json.loads(registered.tags[HISTORY_TAG])
    assert [(entry["version"], entry["previous"], entry["run_id"]) for entry in history] == [(m1_version, None, parent1), (m2_version, m1_version, parent2)]
    assert load_model_reference(f"models:/{MODEL_NAME}/{m1_version}").digest == m1_digest  # the previous champion stays reachable

    # ---- check 3: the same models under a gate nobody passes -> reject; champion untouched, no challenger
    raw3 = raw2 | {"decision": raw2["decision"] | {"rules": IMPOSSIBLE_RULES}}
    _, _, tracker3, record3 = _decide(root2, raw3)
    assert record3["verdict"] == "reject"
    registered = client.get_registered_model(MODEL_NAME)
    assert registered.aliases[CHAMPION] == m2_version and registered.aliases[PREVIOUS_CHAMPION] == m1_version
    assert CHALLENGER not in registered.aliases
    assert json.loads(registered.tags[REJECTED_TAG])["run_id"] == tracker3.parent().run_id
    assert {client.get_model_version(MODEL_NAME, v).tags["rcat.decision"] for v in _versions_of(client, tracker3.parent().run_id).values()} == {"inadmissible"}
    assert len(json.loads(registered.tags[HISTORY_TAG])) == 2

    # ---- check 4a: a file of an evaluation's evidence is gone: the decision stops before the registry
    import shutil

    from rcat.results import EvidenceError

    evaluation_at = layout2.evaluation("at")
    shutil.copytree(evaluation_at, root2 / "at-evaluation-backup")
    (evaluation_at / "metrics.json").unlink()
    raw4 = raw2 | {"decision": raw2["decision"] | {"rank_by": "rnfr"}}
    with pytest.raises(EvidenceError, match="metrics.json: missing"):
        _decide(root2, raw4)
    assert client.get_registered_model(MODEL_NAME).aliases[CHAMPION] == m2_version
    # ---- check 4b: an evaluation missing altogether; the gate still promotes 'new', the registry is not touched
    shutil.rmtree(evaluation_at)
    _, _, tracker4, record4 = _decide(root2, raw4)
    assert record4["verdict"] == "promote" and record4["problems"]
    parent4 = tracker4.parent().run_id
    assert client.get_run(parent4).data.tags["rcat.registry"].startswith("skipped: incomplete evaluation")
    assert _versions_of(client, parent4) == {}
    assert client.get_registered_model(MODEL_NAME).aliases[CHAMPION] == m2_version

    # ---- check 1 decided again (same params, same run): no new version, and no roll-back to M1
    _, _, tracker1b, record1b = _decide(root1, raw1)
    assert tracker1b.parent().run_id == parent1 and record1b["verdict"] == "promote"
    assert _versions_of(client, parent1) == versions1
    registered = client.get_registered_model(MODEL_NAME)
    assert registered.aliases[CHAMPION] == m2_version
    assert len(json.loads(registered.tags[HISTORY_TAG])) == 2
    # one version per distinct weight file, however many checks saw it
    every = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(every) == len({v.tags["rcat.sha256"] for v in every}) == 4  # new1, at1, new2, at2

    # the champion is an MLflow model: pyfunc predicts class scores, equal to rcat's own network
    champion_file = _candidate_file(layout2, record2["candidate"])
    batch = load_split(layout2.split("test")).images[:5]
    scores = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}").predict(batch.numpy())
    with torch.no_grad():
        expected_scores = load_model(champion_file).network(batch).numpy()
    assert scores.shape == (5, 10) and np.allclose(scores, expected_scores, atol=1e-6)
    signature = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@{CHAMPION}").signature
    assert signature.inputs.inputs[0].shape == (-1, *batch.shape[1:]) and signature.outputs.inputs[0].shape == (-1, 10)
    _serve_and_predict(f"models:/{MODEL_NAME}@{CHAMPION}", batch.numpy(), expected_scores)

    new_run = rows.loc[rows["tags.rcat.child"] == "candidate:new", "run_id"].item()
    new_table = client.load_table(rows["experiment_id"].iloc[0], "flips/new.json", run_ids=[new_run])
    assert len(new_table) == len(flip_set(read_parquet(layout1.attack_cache / "flips.parquet")))  # replaced, not appended


def test_registry_refuses_incomplete_or_malformed_decisions(tmp_path):
    """The fail-closed guard, without a server: only a complete promote/reject record may reach the registry."""
    from rcat.config import parse_params
    from rcat.registry import registry_refusal

    params = parse_params(reduced_params(tmp_path) | {"tracking": {"enabled": True, "uri": "sqlite:///x.db", "experiment": "e", "registered_model": "m"}})
    methods = list(params.finetune.methods)
    good = {"verdict": "promote", "candidate": methods[0], "problems": [], "inputs": {"models": {}}}
    assert registry_refusal(good, params) is None
    assert registry_refusal(good | {"verdict": "reject", "candidate": None}, params) is None
    assert "incomplete evaluation" in registry_refusal(good | {"problems": ["data/evaluate/at/metrics.json: not found"]}, params)
    assert "verdict" in registry_refusal(good | {"verdict": "maybe"}, params)
    assert "not a configured candidate" in registry_refusal(good | {"candidate": "../../etc"}, params)
    assert "not a configured candidate" in registry_refusal(good | {"candidate": None}, params)
    assert "digests" in registry_refusal({k: v for k, v in good.items() if k != "inputs"}, params)
    disabled = parse_params(reduced_params(tmp_path) | {"tracking": {"enabled": False}})
    assert registry_refusal(good, disabled) == "tracking is disabled"
    unnamed = parse_params(reduced_params(tmp_path) | {"tracking": {"registered_model": None}})
    assert "registered_model is null" in registry_refusal(good, unnamed)


def test_alias_references_are_pinned_to_the_version_they_point_at(tmp_path, monkeypatch):
    """`models:/name@alias` -> `models:/name/<version>` (the flow writes that into params.yaml, so DVC sees
    the champion move); other references pass through; an unknown alias is bad input; a dead server is
    a tracking failure (exit 4), not bad input; `rcat champion` prints the pinned reference."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from rcat.cli import app
    from rcat.errors import InputError, TrackingUnavailable
    from rcat.registry import pin_alias

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path))
    client.set_registered_model_alias("m", "champion", "2")

    assert pin_alias("models:/m@champion", uri) == "models:/m/2"
    client.set_registered_model_alias("m", "champion", "3")
    assert pin_alias("models:/m@champion", uri) == "models:/m/3"  # follows the alias when it moves
    for unchanged in (None, "models:/m/1", "runs:/abc/model", "data/models/old.safetensors", "factory:pkg.mod:build@w.safetensors"):
        assert pin_alias(unchanged, uri) == unchanged
    with pytest.raises(InputError, match="models:/m@nope"):
        pin_alias("models:/m@nope", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(TrackingUnavailable, match="did not answer"):
        pin_alias("models:/m@champion", f"http://127.0.0.1:{free_port()}")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(app, ["champion", "--name", "m"])
    assert result.exit_code == 0 and result.stdout.strip() == "models:/m/3", result.output
    result = CliRunner().invoke(app, ["champion", "--name", "m", "--alias", "nope"])
    assert result.exit_code == 2 and "models:/m@nope" in result.output

