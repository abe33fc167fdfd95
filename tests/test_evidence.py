"""The gate's evidence chain: every verdict bound to the files it rests on (issue: a gate that cannot be fooled).

Each test copies one evaluated project (tests/conftest.py::evaluated_project), breaks one link of
the chain as a careless or hostile user would, and checks that ``rcat decide`` / ``--replay``
refuse with one line naming the file, and that nothing is promoted.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import copy_evaluated
from rcat.cli import EXIT_BAD_INPUT, app
from rcat.safe_io import read_json, read_parquet, write_json, write_parquet

runner = CliRunner()


@pytest.fixture
def project(evaluated_project, tmp_path, monkeypatch):
    """A private copy of the evaluated project, as the working directory."""
    work = copy_evaluated(evaluated_project, tmp_path / "project")
    monkeypatch.chdir(work)
    monkeypatch.delenv("RCAT_SIGNING_KEY", raising=False)
    return work


def decide(*extra: str):
    return runner.invoke(app, ["decide", *extra])


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rcat: error: "), result.stderr
    print(lines[0])
    return lines[0]


def test_a_clean_decision_verifies_and_replays(project):
    result = decide()
    assert result.exit_code == 0, result.output
    record = read_json("data/decide/decision.json")
    assert record["evidence_verified"] is True
    # every candidate's figures rest on its model, the old model, both outcome files and its evidence record
    assert set(record["evidence"]) == {"new", "at", "pct"}
    assert {"finetune/at/model.safetensors", "models/old.safetensors", "attack_cache/outcomes.parquet", "evaluate/at/outcomes.parquet",
            "evaluate/at/evidence.json"} <= set(record["evidence"]["at"])
    # the registry checks against the evaluated digest, which is the file's
    assert record["inputs"]["models"]["at"] == record["evidence"]["at"]["finetune/at/model.safetensors"]
    replay = decide("--replay", "data/decide/decision.json")
    assert replay.exit_code == 0, replay.output
    assert "every evidence file verified" in replay.output and "matches the record" in replay.output


def test_a_model_changed_after_its_evaluation_is_not_promoted(project):
    """Case 1: `rcat finetune` after a params change, then `rcat decide --fail-on-reject`: exit 0 and 'promote at' before."""
    raw = yaml.safe_load(open("params.yaml"))
    raw["finetune"]["lr"] = 0.02
    yaml.safe_dump(raw, open("params.yaml", "w"), sort_keys=False)
    assert runner.invoke(app, ["finetune", "--method", "at"]).exit_code == 0
    result = decide("--fail-on-reject")
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "finetune/at/model.safetensors" in line and "changed after the evaluation" in line and "evaluate@at" in line
    record = read_json("data/decide/decision.json")
    assert record["verdict"] == "reject" and record["candidate"] is None and record["evidence_verified"] is False


def test_an_edited_metrics_file_is_refused(project):
    """Case 3: hand-editing the worst candidate's metrics.json got it promoted, and --replay said it matched."""
    path = "data/evaluate/pct/metrics.json"
    metrics = read_json(path)
    metrics["validation"]["rnfr"] = 0.0
    metrics["validation"]["snfr"] = 0.0
    write_json(path, metrics)
    result = decide("--fail-on-reject")
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "evaluate/pct/metrics.json" in line and ("edited" in line or "differs" in line)


def test_metrics_are_recomputed_from_outcomes_even_when_every_digest_is_rewritten(project):
    """A forger who also rewrites evidence.json's digests is caught by the recomputation from per-sample outcomes."""
    from rcat.safe_io import sha256_file

    path = "data/evaluate/pct/metrics.json"
    metrics = read_json(path)
    metrics["validation"]["nfr"] = 0.0
    write_json(path, metrics)
    evidence = read_json("data/evaluate/pct/evidence.json")
    evidence["files"]["metrics.json"] = sha256_file(path)
    write_json("data/evaluate/pct/evidence.json", evidence)
    result = decide()
    assert result.exit_code == EXIT_BAD_INPUT
    assert "per-sample outcomes give" in error_line(result)


def test_replay_catches_a_file_edited_after_the_decision(project):
    assert decide().exit_code == 0
    frame = read_parquet("data/evaluate/at/flips.parquet")
    frame.loc[0, "robust_negative_flip"] = not frame.loc[0, "robust_negative_flip"]
    write_parquet("data/evaluate/at/flips.parquet", frame)
    result = decide("--replay", "data/decide/decision.json")
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "evaluate/at/flips.parquet" in line and "changed after the decision" in line


def test_replay_catches_an_edited_record(project):
    assert decide().exit_code == 0
    record = read_json("data/decide/decision.json")
    record["replay"]["evaluations"]["pct"]["validation"]["rnfr"] = 0.0
    write_json("data/decide/decision.json", record)
    result = decide("--replay", "data/decide/decision.json")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "the record was edited" in error_line(result)


def test_signed_records_detect_edits_and_need_the_key(project, monkeypatch):
    monkeypatch.setenv("RCAT_SIGNING_KEY", "reviewer-secret")
    # the evaluations were written without a key: with one set, they are refused as unsigned
    result = decide()
    assert result.exit_code == EXIT_BAD_INPUT and "not signed although RCAT_SIGNING_KEY is set" in error_line(result)
    # re-sign the evaluations as their stages would, then decide
    from rcat.results import sign

    for directory in ("data/attack_cache", "data/evaluate/at", "data/evaluate/pct"):
        write_json(f"{directory}/evidence.json", sign(read_json(f"{directory}/evidence.json")))
    assert decide().exit_code == 0
    record = read_json("data/decide/decision.json")
    assert isinstance(record["signature"], str)
    assert decide("--replay", "data/decide/decision.json").exit_code == 0
    record["reasons"] = ["approved by a reviewer"]
    write_json("data/decide/decision.json", record)
    result = decide("--replay", "data/decide/decision.json")
    assert result.exit_code == EXIT_BAD_INPUT and "signature does not match" in error_line(result)
    monkeypatch.delenv("RCAT_SIGNING_KEY")
    result = decide("--replay", "data/decide/decision.json")
    assert result.exit_code == EXIT_BAD_INPUT and "cannot be verified" in error_line(result)


def test_an_evaluation_made_with_another_attack_is_refused(project):
    """Issue 14: `rcat decide` outside DVC mixed eps=0.05 baseline metrics with stale eps=0.1 candidate evaluations."""
    raw = yaml.safe_load(open("params.yaml"))
    raw["attack"]["eps"] = 0.05
    yaml.safe_dump(raw, open("params.yaml", "w"), sort_keys=False)
    assert runner.invoke(app, ["stage", "attack_cache"]).exit_code == 0  # the baseline at eps 0.05; candidates still at 0.1
    result = decide()
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "evaluated with attack" in line and "eps=0.1" in line and "mixed" in line


def test_a_missing_evidence_record_makes_the_candidate_inadmissible(project):
    shutil.rmtree("data/evaluate/pct")
    result = decide()
    assert result.exit_code == 0
    record = read_json("data/decide/decision.json")
    assert record["candidates"]["pct"]["admissible"] is False
    assert any("pct was not evaluated" in problem for problem in record["problems"])


def test_a_swapped_evidence_record_is_refused(project):
    """pct's outcomes presented as at's: the record names another candidate."""
    shutil.rmtree("data/evaluate/at")
    shutil.copytree("data/evaluate/pct", "data/evaluate/at")
    result = decide()
    assert result.exit_code == EXIT_BAD_INPUT
    assert "is for candidate 'pct', not 'at'" in error_line(result)


def test_rcat_run_refuses_a_params_file_dvc_would_not_read(project, tmp_path):
    """Case 2: `rcat run --params strict.yaml` validated strict.yaml, then ran `dvc repro` on ./params.yaml."""
    strict = tmp_path / "strict.yaml"
    shutil.copy("params.yaml", strict)
    result = runner.invoke(app, ["run", "--params", str(strict)])
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "strict.yaml" in line and "always reads ./params.yaml" in line


def test_tidy_candidate_table(project):
    from rcat.pipeline import Layout
    from rcat.results import CANDIDATE_COLUMNS, load_candidates

    manifest = read_json("data/prepared/manifest.json")
    params = yaml.safe_load(open("params.yaml"))
    from rcat.config import parse_params

    attack = parse_params(params).attack.identity()
    table, verified = load_candidates(Layout(), ["new", "at"], split_digests={s: manifest["splits"][s]["digest"] for s in ("validation", "test")},
                                      attack_identity=attack, seed=params["seed"])
    assert tuple(table.columns) == CANDIDATE_COLUMNS
    sizes = {s: manifest["splits"][s]["n_samples"] for s in ("validation", "test")}
    assert len(table) == 2 * (sizes["validation"] + sizes["test"])
    assert isinstance(table, pd.DataFrame) and set(table["candidate"]) == {"new", "at"}
    # the recomputed metrics are the stage's own
    stored = read_json("data/evaluate/at/metrics.json")
    assert verified["at"].metrics["test"]["rnfr"] == stored["test"]["rnfr"]
    assert json.dumps(verified["at"].metrics["test"]["n_samples"]) == json.dumps(stored["test"]["n_samples"])


def test_check_json_is_the_verdict_and_its_candidates_figures(evaluated_project):
    """`dvc exp show` reads data/decide/check.json: verdict, 0/1, candidate and its confirmation-split figures."""
    check = json.loads((evaluated_project / "data/decide/check.json").read_text())
    # the order `dvc exp show` shows: the verdict is the first metric column, the one DVC never collapses
    assert list(check) == ["verdict", "candidate", "accuracy", "robust_accuracy", "nfr", "rnfr", "snfr", "promote"]
    record = json.loads((evaluated_project / "data/decide/decision.json").read_text())
    candidate = record["candidate"] or record["selected_on_validation"]
    assert (check["verdict"], check["promote"], check["candidate"]) == (record["verdict"], int(record["verdict"] == "promote"), candidate)
    test = record["replay"]["evaluations"][candidate]["test"]
    assert [check[k] for k in ("accuracy", "robust_accuracy", "nfr", "rnfr", "snfr")] == [
        test[k] for k in ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr")]
