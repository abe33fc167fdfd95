"""The ``update-check`` flow (pipelines/update_check.py): typed overrides of params.yaml, written only
when they change it and with its comments kept; bad input fails at once and is never retried; a
stage that failed because MLflow did not answer (exit code 4) is retried; prefect.yaml is valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `pipelines` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from pipelines import update_check as check_module
from pipelines import update_pipeline as pipeline_module
from pipelines.update_check import apply_overrides, overridden_params, update_check
from rcat.config import AttackConfig, DecisionRules, MethodConfig, load_params
from rcat.errors import ConfigError, InputError

STAGES = ["prepare", "train_old", "train_new", "attack_cache", "finetune@at", "evaluate@at", "decide"]


@pytest.fixture
def params_file(tmp_path):
    """A copy of the repository's params.yaml (with its comments) in a project directory."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return project / "params.yaml"


# ---------------------------------------------------------------- overrides


def test_overrides_merge_given_fields_and_replace_methods(params_file):
    raw = yaml.safe_load(params_file.read_text())
    rules = DecisionRules.model_validate({"max_nfr": 0.2, "min_accuracy_delta": None})
    attack = AttackConfig.model_validate({"steps": 7})
    methods = {"only": MethodConfig.model_validate({"loss": "rcat", "alpha": 0.3, "beta": 0.3})}
    result = overridden_params(raw, champion="models:/digits@champion", candidate="runs:/abc/model", data_source="npz:/x.npz",
                               attack=attack, methods=methods, rules=rules)

    assert result["train_old"]["reference"] == "models:/digits@champion" and result["train_new"]["reference"] == "runs:/abc/model"
    assert result["data"] == {**raw["data"], "source": "npz:/x.npz"}
    # only the fields given replace the file's; a null disables a rule
    assert result["decision"]["rules"] == {**raw["decision"]["rules"], "max_nfr": 0.2, "min_accuracy_delta": None}
    assert result["attack"] == {**raw["attack"], "steps": 7}
    assert result["finetune"]["methods"] == {"only": {"loss": "rcat", "alpha": 0.3, "beta": 0.3}}
    assert raw == yaml.safe_load(params_file.read_text())  # the input is not modified
    assert overridden_params(raw) == raw

    with_preset = overridden_params({**raw, "attack": {**raw["attack"], "preset": "autoattack-standard"}},
                                    attack=AttackConfig.model_validate({"ensemble": [{"name": "fgsm", "loss": "ce"}]}))
    assert "preset" not in with_preset["attack"] and with_preset["attack"]["ensemble"][0]["name"] == "fgsm"


def test_apply_overrides_rewrites_params_as_dvc_exp_run_set_param_does(params_file):
    project = str(params_file.parent)
    original = params_file.read_text()
    raw = yaml.safe_load(original)
    changed = apply_overrides.fn(project, champion="models:/digits/3", rules=DecisionRules.model_validate({"max_rnfr": 0.1}))

    assert changed == ["train_old.reference", "decision.rules.max_rnfr"]
    text = params_file.read_text()
    expected = overridden_params(raw, champion="models:/digits/3", rules=DecisionRules.model_validate({"max_rnfr": 0.1}))
    assert yaml.safe_load(text) == expected
    assert load_params(params_file).decision.rules.max_rnfr == 0.1
    # every comment of the file survives, and only the two changed lines differ
    comments = [line.split("#", 1)[1] for line in original.splitlines() if "#" in line]
    assert all(comment in text for comment in comments)
    # byte for byte what `dvc exp run -S` leaves (DVC's own writer: it renders null as an empty value)
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    by_dvc = params_file.parent / "by-dvc.yaml"
    by_dvc.write_text(original)
    dvc_apply_overrides(by_dvc, ["train_old.reference='models:/digits/3'", "decision.rules.max_rnfr=0.1"])
    assert text == by_dvc.read_text()
    assert (params_file.parent / check_module.BACKUP_FILE).read_text() == original

    # the same overrides again: nothing to change, the file is not rewritten
    before = params_file.stat().st_mtime_ns
    assert apply_overrides.fn(project, champion="models:/digits/3") == []
    assert params_file.stat().st_mtime_ns == before


def test_overrides_are_dvc_exp_run_set_params():
    """The overrides are what ``dvc exp run -S`` takes, hand-written here, and DVC's own function applies them."""
    before = {"a": {"b": 1, "c": "x", "gone": True}, "m": {"at": {"loss": "at"}, "pct": {"loss": "pct"}}}
    after = {"a": {"b": 0.5, "c": "models:/it's/3", "new": None}, "m": {"rcat": {"loss": "rcat", "alpha": 0.5}}}
    assert check_module.set_param_overrides(before, after) == [
        "a.b=0.5", "a.c='models:/it\\'s/3'", "~a.gone", "+a.new=null", "~m.at", "~m.pct", "+m.rcat={loss:'rcat',alpha:0.5}"]
    assert check_module.set_param_overrides(before, before) == []
    with pytest.raises(ConfigError, match="key 'a.b c'"):
        check_module.set_param_overrides({"a": {"b c": 1}}, {"a": {"b c": 2}})


def test_write_params_replaces_the_method_list_through_dvc(params_file):
    raw = yaml.safe_load(params_file.read_text())
    wanted = overridden_params(raw, methods={"rcat": MethodConfig(loss="rcat", alpha=0.25, beta=0.5)})
    overrides = check_module.write_params(params_file, wanted)
    assert yaml.safe_load(params_file.read_text()) == wanted
    assert any(override.startswith("+finetune.methods.rcat=") or override.startswith("finetune.methods.rcat.") for override in overrides)
    assert sorted(load_params(params_file).finetune.methods) == ["rcat"]
    assert not list(params_file.parent.glob(".params.yaml.*"))  # no draft left beside the file


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data_source": "ftp:somewhere"}, r"params\.yaml with the update-check overrides: bad value for 'data\.source'"),
    ({"methods": {"old": MethodConfig(loss="at")}}, r"bad value for 'finetune\.methods'.*'old'"),
])
def test_bad_override_names_the_key_and_leaves_the_file(params_file, overrides, message):
    original = params_file.read_text()
    with pytest.raises(ConfigError, match=message):
        apply_overrides.fn(str(params_file.parent), **overrides)
    assert params_file.read_text() == original
    assert not (params_file.parent / check_module.BACKUP_FILE).exists()


# ---------------------------------------------------------------- retries, with DVC replaced by canned results


def fake_project(params_file: Path) -> Path:
    """A project whose DVC is faked: params.yaml, dvc.yaml (unused by the fake) and a recorded decision."""
    project = params_file.parent
    (project / "dvc.yaml").write_text("stages: {}\n")
    decide = project / "data" / "decide"
    decide.mkdir(parents=True)
    (decide / "decision.json").write_text(json.dumps({"verdict": "reject", "candidate": None, "reasons": ["canned"], "candidates": {}}))
    return project


def fake_dvc(monkeypatch, failures: dict[str, list[int]]) -> list[str]:
    """Replace DVC's child process (pipelines/dvc_repro.py): ``--list`` names STAGES; a target fails with the
    next stage exit code listed for it (as DVC reports it), then succeeds. Returns the repro targets, in call order."""
    calls: list[str] = []

    def run(args, project_dir):
        if args == ["--list"]:
            return {"stages": list(STAGES), "output": ""}
        target = args[-1]
        calls.append(target)
        if failures.get(target):
            code = failures[target].pop(0)
            error = {"message": f"failed to reproduce '{target}': failed to run: python stages/{target}.py, exited with {code}",
                     "stage_exit_code": code, "lock": False}
            return {"ran": [], "skipped": [], "restored": [], "error": error, "output": "rcat: error: boom\n"}
        names = [stage for stage in STAGES if stage.split("@")[0] == target]
        return {"ran": [], "skipped": names, "restored": [], "error": None, "output": ""}

    monkeypatch.setattr(pipeline_module, "run_dvc", run)
    monkeypatch.setattr(pipeline_module.reproduce, "retry_delay_seconds", [0.0, 0.0])
    return calls


def test_tracking_failure_is_retried_bad_input_is_not(prefect_harness, params_file, monkeypatch):
    project = fake_project(params_file)

    # exit code 4 (MLflow did not answer) twice on the attack cache: retried twice, then the run completes
    calls = fake_dvc(monkeypatch, {"attack_cache": [4, 4]})
    result = update_check(project_dir=str(project))
    assert calls == ["prepare", "train_old", "train_new", "attack_cache", "attack_cache", "attack_cache", "finetune", "evaluate", "decide"]
    assert result["verdict"] == "reject" and result["skipped"] == STAGES and result["overridden"] == []

    # exit code 2 (bad input): one attempt, the run fails there
    calls = fake_dvc(monkeypatch, {"train_new": [2]})
    state = update_check(project_dir=str(project), return_state=True)
    assert state.is_failed() and calls == ["prepare", "train_old", "train_new"]

    # a bad override: the run fails before any stage, and the params file is unchanged
    original = params_file.read_text()
    calls = fake_dvc(monkeypatch, {})
    state = update_check(project_dir=str(project), data_source="ftp:nowhere", return_state=True)
    assert state.is_failed() and calls == [] and params_file.read_text() == original
    with pytest.raises(ConfigError, match="data.source"):
        state.result()


def test_prefect_rejects_a_mistyped_parameter(prefect_harness, params_file, monkeypatch):
    from prefect.exceptions import ParameterTypeError

    calls = fake_dvc(monkeypatch, {})
    with pytest.raises(ParameterTypeError, match="rules.max_nfr"):
        update_check(project_dir=str(params_file.parent), rules={"max_nfr": 2})
    assert calls == []


# ---------------------------------------------------------------- prefect.yaml and `rcat serve` without a server


def test_prefect_yaml_deployment_is_valid(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    spec = check_module.deployment_spec(REPO_ROOT)
    assert spec["name"] == "update-check" and spec["concurrency_limit"] == 1 and spec["work_pool"]["name"]
    monkeypatch.chdir(REPO_ROOT)
    loaded = load_flow_from_entrypoint(spec["entrypoint"])
    assert loaded.name == "update-check"
    validated = loaded.validate_parameters(spec["parameters"])
    assert set(spec["parameters"]) <= set(validated) and all(validated[key] == value for key, value in spec["parameters"].items())
    schedules = check_module.deployment_schedules(spec)
    assert [schedule.cron for schedule in schedules] == [entry["cron"] for entry in spec["schedules"]]
    assert check_module.deployment_schedules(spec, cron="*/5 * * * *")[0].cron == "*/5 * * * *"
    with pytest.raises(InputError, match="bad cron schedule '61 3 \\* \\* \\*'"):
        check_module.deployment_schedules(spec, cron="61 3 * * *")
    with pytest.raises(InputError, match="no deployment named 'nightly'"):
        check_module.deployment_spec(REPO_ROOT, "nightly")


def test_serve_refuses_the_temporary_server(tmp_path):
    """Without PREFECT_API_URL, `rcat serve` says in one line to start a server: the temporary one cannot schedule."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run([str(Path(sys.executable).parent / "rcat"), "serve", "--project-dir", str(REPO_ROOT)],
                            check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "PREFECT_API_URL is not set" in result.stderr and "prefect server start" in result.stderr


def test_update_check_writes_the_pinned_champion(tmp_path, monkeypatch):
    """The flow's overrides step writes `models:/m/<version>`, not the alias, into params.yaml."""
    import yaml
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path))
    client.set_registered_model_alias("m", "champion", "1")
    from conftest import reduced_params

    raw = reduced_params(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    changed = apply_overrides.fn(str(tmp_path), champion="models:/m@champion")
    assert changed == ["train_old.reference"]
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train_old"]["reference"] == "models:/m/1"
