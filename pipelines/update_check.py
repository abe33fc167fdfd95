"""The ``update-check`` flow: should the candidate model replace the champion? Scheduled with Prefect.

Its typed parameters are **overrides of params.yaml** (None keeps the file's value):

=============  =====================================================================
parameter      what it sets in ``params.yaml``
=============  =====================================================================
champion       ``train_old.reference``: ``models:/<name>@champion``, ``runs:/...``, an rcat
               model file or ``factory:module:callable@WEIGHTS`` (see README). An alias
               is pinned to the version it points at when the run starts
               (``models:/<name>/<version>``), so DVC sees the champion move
candidate      ``train_new.reference`` (same forms)
data_source    ``data.source`` (``digits``, ``imagefolder:PATH``, ...)
attack         ``attack`` (:class:`rcat.config.AttackConfig`): the fields given replace the
               file's, the others are kept (``ensemble`` or ``preset`` given drops the other)
methods        ``finetune.methods`` (name -> :class:`rcat.config.MethodConfig`): the methods to
               try, replacing the file's list
rules          ``decision.rules`` (:class:`rcat.config.DecisionRules`): the fields given replace
               the file's (``null`` disables a rule), the others are kept
=============  =====================================================================

Prefect validates each parameter against rcat's own pydantic models; the flow then validates the
whole overridden file with :mod:`rcat.config`, so a bad value fails the run at once, before any
stage, and is never retried. The file is rewritten only when an override changes it, atomically,
with the overrides ``dvc exp run -S`` would take, applied by the function behind it (DVC's
``dvc.utils.hydra.apply_overrides``; comments and layout of the keys left alone survive, and the
run prints the equivalent ``dvc exp run -S ...`` command); the previous file is kept in
``.rcat_cache/update-check/params.yaml.bak``. The overrides therefore persist: ``dvc repro`` and
``dvc params diff`` see exactly what the flow ran.

Then every DVC stage runs as a Prefect task (``dvc repro --single-item``, see
:mod:`pipelines.update_pipeline`): the baseline attack cache, the constrained fine-tunes, the flip
evaluation, the decision (and ``report`` when ``dvc.yaml`` has it). DVC decides what is stale, so
the flow and ``dvc repro`` share one set of outputs, lock file and run-cache: neither recomputes
what the other did. A stage that fails because MLflow did not answer (exit code 4) is retried;
bad input (exit code 2) is not. Artifacts: the decision (markdown), the candidates' key figures
and what each stage did (tables).

Scheduling needs a real Prefect server (the temporary one cannot schedule): ``rcat serve``
(:func:`serve`) registers the ``update-check`` deployment of ``prefect.yaml`` with its cron
schedule and runs its flow runs; or ``prefect deploy`` plus a worker (see README).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE

from pipelines.update_pipeline import publish_decision, reproduce_pipeline
from rcat.config import AttackConfig, DecisionRules, MethodConfig, TrackingConfig, parse_params
from rcat.errors import ConfigError, InputError
from rcat.registry import pin_alias
from rcat.safe_io import atomic_path

PARAMS_FILE = "params.yaml"
BACKUP_FILE = Path(".rcat_cache") / "update-check" / "params.yaml.bak"
PREFECT_YAML = "prefect.yaml"
DEPLOYMENT_NAME = "update-check"
SERVER_HINT = "start one with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"


# ---------------------------------------------------------------- params.yaml overrides (plain functions)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[leaf] = value


def overridden_params(raw: dict[str, Any], champion: str | None = None, candidate: str | None = None,
                      data_source: str | None = None, attack: AttackConfig | None = None,
                      methods: dict[str, MethodConfig] | None = None, rules: DecisionRules | None = None) -> dict[str, Any]:
    """``raw`` (a parsed params.yaml) with the flow's overrides applied; ``raw`` itself is unchanged.

    Sections given as models are merged field by field: only the fields set on the model
    (pydantic's ``model_fields_set``, i.e. the keys the caller gave) replace the file's; ``methods``
    replaces the whole method list.
    """
    params = copy.deepcopy(raw)
    if champion is not None:
        _set(params, "train_old.reference", champion)
    if candidate is not None:
        _set(params, "train_new.reference", candidate)
    if data_source is not None:
        _set(params, "data.source", data_source)
    if attack is not None:
        given = attack.model_dump(mode="json", exclude_unset=True)
        section = dict(params.get("attack") or {})
        if "ensemble" in given or "preset" in given:  # one way of naming several attacks replaces the other
            section.pop("ensemble" if "preset" in given else "preset", None)
        params["attack"] = {**section, **given}
    if methods is not None:
        _set(params, "finetune.methods", {name: method.model_dump(mode="json", exclude_unset=True) for name, method in methods.items()})
    if rules is not None:
        current = ((params.get("decision") or {}).get("rules")) or {}
        _set(params, "decision.rules", {**current, **rules.model_dump(mode="json", exclude_unset=True)})
    return params


_MISSING = object()


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two parsed YAML trees (added and removed keys included)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(dict.fromkeys([*before, *after]))
        return [k for key in keys for k in changed_keys(before.get(key, _MISSING), after.get(key, _MISSING), f"{prefix}{key}.")]
    return [] if before is not _MISSING and after is not _MISSING and before == after else [prefix.rstrip(".")]


_HYDRA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _require_hydra_key(key: Any, named: str) -> None:
    """Hydra's override grammar (``dvc exp run -S``) takes plain keys only; ``named`` is how the error names the key."""
    if not isinstance(key, str) or not _HYDRA_KEY.match(key):
        raise ConfigError(f"{PARAMS_FILE}: key {named!r} cannot be set through DVC's -S overrides; use letters, digits, '_' and '-'")


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run -S key=VALUE`` takes): strings quoted, ``null``, lists, dicts."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        for key in value:
            _require_hydra_key(key, key)
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    raise ConfigError(f"{PARAMS_FILE}: a value of type {type(value).__name__} cannot be written to params.yaml")


def set_param_overrides(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The ``dvc exp run -S`` overrides that turn ``before`` into ``after``: ``key=v`` (changed), ``+key=v`` (new), ``~key`` (removed)."""
    overrides = []
    for dotted in changed_keys(before, after):
        for key in dotted.split("."):
            _require_hydra_key(key, dotted)
        old, new = _lookup(before, dotted), _lookup(after, dotted)
        if new is _MISSING:
            overrides.append(f"~{dotted}")
        elif old is _MISSING:
            overrides.append(f"+{dotted}={hydra_value(new)}")
        else:
            overrides.append(f"{dotted}={hydra_value(new)}")
    return overrides


def write_params(path: Path, params: dict[str, Any], backup: Path | None = None) -> list[str]:
    """Rewrite ``path`` as ``params`` the way ``dvc exp run -S`` does; returns the overrides applied.

    The overrides (:func:`set_param_overrides`) go through DVC's own ``dvc.utils.hydra.apply_overrides``,
    the function behind ``dvc exp run --set-param``, so comments and the layout of every key left
    alone survive as they do there. It runs on a copy beside the file; the copy must read back as
    ``params`` (else :class:`rcat.errors.ConfigError`, file unchanged), then the old file is copied
    to ``backup`` and the copy renamed over it (both writes atomic).
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    text = path.read_text(encoding="utf-8")
    overrides = set_param_overrides(yaml.safe_load(text), params)
    with atomic_path(path) as tmp:
        draft = tmp.with_suffix(".yaml")  # DVC picks its YAML writer by the file's suffix
        try:
            draft.write_text(text, encoding="utf-8")
            try:
                dvc_apply_overrides(draft, overrides)
            except InvalidArgumentError as error:
                raise ConfigError(f"{path}: DVC refused the overrides {' '.join(overrides)} ({error.__cause__ or error}); file left unchanged") from None
            rendered = draft.read_text(encoding="utf-8")
        finally:
            draft.unlink(missing_ok=True)
        if yaml.safe_load(rendered) != params:  # never write a file that reads back differently
            raise ConfigError(f"{path}: the rewritten file does not read back as the overridden params; file left unchanged")
        if backup is not None:
            with atomic_path(backup) as saved:
                saved.write_text(text, encoding="utf-8")
        tmp.write_text(rendered, encoding="utf-8")
    return overrides


def _tracking_uri(raw: dict[str, Any], project_dir: str) -> str:
    """The MLflow store the stages will use (:func:`rcat.tracking.tracking_uri` from the project directory)."""
    from rcat.tracking import tracking_uri

    return tracking_uri(TrackingConfig.model_validate(raw.get("tracking") or {}), root=Path(project_dir))


@task(name="apply-overrides", cache_policy=NO_CACHE, retries=0)
def apply_overrides(project_dir: str, champion: str | None = None, candidate: str | None = None,
                    data_source: str | None = None, attack: AttackConfig | None = None,
                    methods: dict[str, MethodConfig] | None = None, rules: DecisionRules | None = None) -> list[str]:
    """Validate the overridden params with :mod:`rcat.config` and write them to ``params.yaml`` if they differ.

    Returns the dotted keys that changed (empty: the file was left untouched). Raises
    :class:`rcat.errors.ConfigError` (bad input: never retried) naming the file and the key.
    """
    path = Path(project_dir) / PARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; pass the project root as project_dir")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    # an alias (models:/name@champion) is pinned to the version it points at now, so that the params'
    # text, and with it DVC's view and the check's key, changes exactly when the alias moves
    uri = _tracking_uri(raw, project_dir)
    pinned = {role: pin_alias(reference, uri) for role, reference in (("champion", champion), ("candidate", candidate))}
    for role, reference in (("champion", champion), ("candidate", candidate)):
        if pinned[role] != reference:
            print(f"{role} {reference} is {pinned[role]} now (pinned)")
    params = overridden_params(raw, pinned["champion"], pinned["candidate"], data_source, attack, methods, rules)
    parse_params(params, f"{path} with the update-check overrides")  # ConfigError names the key
    changed = changed_keys(raw, params)
    if changed:
        overrides = write_params(path, params, backup=Path(project_dir) / BACKUP_FILE)
        print(f"{path}: set {', '.join(changed)} (previous file in {BACKUP_FILE}); "
              f"the same as: dvc exp run {' '.join('-S ' + shlex.quote(override) for override in overrides)}")
    else:
        print(f"{path}: unchanged by the overrides")
    return changed


@task(name="refresh-champion-pin", cache_policy=NO_CACHE)
def refresh_champion_pin(project_dir: str) -> str | None:
    """With ``train_old.reference: champion``: pin the registry's champion now (``rcat-champion.json``), so that the
    check runs against it and DVC reruns exactly when it moved. Returns the pinned reference (None: not used)."""
    from rcat.registry import CHAMPION_PIN, write_champion_pin

    raw = yaml.safe_load((Path(project_dir) / PARAMS_FILE).read_text(encoding="utf-8"))
    params = parse_params(raw, str(Path(project_dir) / PARAMS_FILE))
    pin = write_champion_pin(params, Path(project_dir) / CHAMPION_PIN, _tracking_uri(raw, project_dir))
    if pin["reference"]:
        print(f"old model: the champion, {pin['reference']}")
    return pin["reference"]


# ---------------------------------------------------------------- flow


@flow(name="update-check", log_prints=True)
def update_check(
    champion: str | None = None,
    candidate: str | None = None,
    data_source: str | None = None,
    attack: AttackConfig | None = None,
    methods: dict[str, MethodConfig] | None = None,
    rules: DecisionRules | None = None,
    project_dir: str = ".",
    force: bool = False,
) -> dict[str, Any]:
    """Check whether ``candidate`` may replace ``champion``: attack cache, fine-tunes, flip evaluation, decision.

    Every parameter left None keeps the value in ``params.yaml`` (see the module docstring for
    what each one sets). ``force`` reruns every stage. Returns ``{"verdict", "candidate",
    "overridden", "ran", "skipped"}``: the gate's verdict and chosen candidate, the params keys
    the overrides changed, and the DVC stages run and skipped (up to date), in order.
    """
    root = Path(project_dir).resolve()
    overridden = apply_overrides(str(root), champion, candidate, data_source, attack, methods, rules)
    refresh_champion_pin(str(root))
    stages = reproduce_pipeline(root, force)
    summary = publish_decision(str(root))
    return {"verdict": summary["verdict"], "candidate": summary["candidate"], "overridden": overridden, **stages}


# ---------------------------------------------------------------- deployment: prefect.yaml and `rcat serve`


def deployment_spec(project_dir: str | os.PathLike[str] = ".", name: str = DEPLOYMENT_NAME) -> dict[str, Any]:
    """The ``deployments:`` entry called ``name`` in the project's ``prefect.yaml``."""
    path = Path(project_dir) / PREFECT_YAML
    if not path.is_file():
        raise InputError(f"{path}: not found; run from the project root or pass --project-dir")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise InputError(f"{path}: not valid YAML; fix the syntax") from None
    for entry in config.get("deployments") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            if not entry.get("entrypoint"):
                raise InputError(f"{path}: deployment {name!r} has no entrypoint (e.g. pipelines/update_check.py:update_check)")
            return entry
    raise InputError(f"{path}: no deployment named {name!r} under 'deployments:'")


def deployment_schedules(spec: dict[str, Any], cron: str | None = None, source: str = PREFECT_YAML) -> list[Any]:
    """The deployment's cron schedules (``--cron`` replaces prefect.yaml's), validated."""
    from prefect.schedules import Cron

    entries = [{"cron": cron}] if cron else [entry for entry in spec.get("schedules") or [] if isinstance(entry, dict) and "cron" in entry]
    if not entries:
        raise InputError(f"{source}: deployment {spec.get('name')!r} has no cron schedule; add one under 'schedules:' or pass --cron")
    timezone = next((entry.get("timezone") for entry in spec.get("schedules") or [] if isinstance(entry, dict) and entry.get("timezone")), None)
    schedules = []
    for entry in entries:
        try:
            schedules.append(Cron(entry["cron"], timezone=entry.get("timezone", timezone), active=entry.get("active", True)))
        except ValueError as exc:
            raise InputError(f"{source}: bad cron schedule {entry['cron']!r} ({exc}); use five fields, e.g. '0 3 * * *'") from None
    return schedules


def require_server() -> str:
    """The URL of a Prefect server that answers; schedules cannot run on Prefect's temporary server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise InputError(f"PREFECT_API_URL is not set, and Prefect's temporary server cannot run schedules; {SERVER_HINT}")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise InputError(f"the Prefect server at PREFECT_API_URL={url} did not answer ({type(problem).__name__}); {SERVER_HINT}")
    return url


def serve(project_dir: str | os.PathLike[str] = ".", cron: str | None = None, name: str = DEPLOYMENT_NAME) -> None:
    """Register the ``update-check`` deployment of ``prefect.yaml`` (entrypoint, schedule, parameters,
    concurrency limit) on the server at ``PREFECT_API_URL`` and run its flow runs in this process
    until interrupted (which pauses the schedule). ``cron`` replaces prefect.yaml's schedule."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import RunnerDeployment

    root = Path(project_dir).resolve()
    spec = deployment_spec(root, name)
    schedules = deployment_schedules(spec, cron, str(root / PREFECT_YAML))
    url = require_server()
    os.chdir(root)  # flow runs start here: the entrypoint, dvc.yaml and params.yaml are relative to it
    deployment = RunnerDeployment.from_entrypoint(
        spec["entrypoint"], name=name, schedules=schedules, parameters=spec.get("parameters") or {},
        concurrency_limit=spec.get("concurrency_limit"), tags=spec.get("tags"), description=spec.get("description"),
        version=spec.get("version"),
    )
    print(f"serving {deployment.flow_name}/{name} from {root} on {url}; schedule: "
          + ", ".join(schedule.cron for schedule in schedules), flush=True)
    # one run at a time: runs share params.yaml and DVC's workspace
    prefect_serve(deployment, limit=1, print_starting_message=False)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the update-check flow once in the current directory (no overrides).")
    parser.add_argument("--force", action="store_true", help="rerun every stage (dvc repro --force)")
    print(json.dumps(update_check(project_dir=".", force=parser.parse_args().force), indent=2))
