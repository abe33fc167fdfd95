"""The ``rcat`` command line: the pipeline's stages for people who do not drive DVC themselves.

Every command validates its inputs first and turns a user error into one line on stderr and a
non-zero exit (2 for bad input, 3 for a rejected update with ``--fail-on-reject``, 4 when the
MLflow tracking store does not answer).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from rcat.errors import EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_TRACKING, RcatError, TrackingError, UpdateRejected
from rcat.heap import bound_shape_caches

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0], rich_markup_mode=None)


def _print_version(value: bool) -> None:
    if value:
        from rcat import __version__

        print(f"rcat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")] = False) -> None:
    """rcat: safe updates of adversarially robust models."""


DATA_HELP = "digits | imagefolder:PATH | npz:PATH | cifar10-binary:DIR | cifar10-python:DIR | a split .safetensors"
MeanOption = Annotated[str | None, typer.Option(help="per-channel mean, e.g. 0.49,0.48,0.45: a factory/TorchScript model then gets inputs normalised inside it")]
StdOption = Annotated[str | None, typer.Option(help="per-channel std (with --mean)")]
OptionalParamsOption = Annotated[Path | None, typer.Option("--params", help="params file; default ./params.yaml if present, else built-in defaults")]
ParamsOption = Annotated[Path, typer.Option("--params", help="params file (validated; unknown keys are rejected)")]
EpsOption = Annotated[str | None, typer.Option(help="the attack's Linf eps in [0, 1] pixel units, e.g. 0.0157 or 4/255 (overrides params)")]
AttackOption = Annotated[str | None, typer.Option(help="apgd | apgdt | pgd | fgsm | fgsm_rs | fab | fab_t | square, or a preset: autoattack-standard | cascade (overrides params)")]
DeviceOption = Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps (overrides params)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as one JSON line (the attack it ran included)")]
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``rcat: error: <message>`` as one line on stderr and exit with ``code``."""
    sys.stderr.write(f"rcat: error: {' '.join(message.split())}\n")
    raise SystemExit(code)


def user_errors(function: F) -> F:
    """Turn :class:`RcatError` into a one-line message and a non-zero exit."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except UpdateRejected as exc:
            fail(str(exc), EXIT_REJECTED)
        except TrackingError as exc:
            fail(str(exc), EXIT_TRACKING)
        except RcatError as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


STAGES: dict[str, tuple[str, str, str | None]] = {
    "prepare": ("rcat.stages.prepare", "prepare", None),
    "train": ("rcat.stages.train", "train", "role (old|new)"),
    "attack_cache": ("rcat.stages.attack_cache", "attack_cache", None),
    "finetune": ("rcat.stages.finetune", "finetune_method", "method name"),
    "evaluate": ("rcat.stages.evaluate", "evaluate_method", "method name"),
    "decide": ("rcat.stages.decide", "decide", None),
    "report": ("rcat.report", "build_report", None),
}
"""``rcat stage NAME``: the module and function of each DVC stage, and the argument it needs."""

DESCRIBE = {"decide": ("rcat.stages.decide", "describe_decision"), "report": ("rcat.report", "describe_report")}


def parse_eps(text: str) -> float:
    """``0.0157`` or ``4/255`` as a float in (0, 1]; a one-line error otherwise."""
    try:
        numerator, _, denominator = text.partition("/")
        value = float(numerator) / (float(denominator) if denominator else 1.0)
    except (ValueError, ZeroDivisionError):
        raise RcatError(f"--eps {text!r}: not a number; use e.g. 0.0157 or 4/255") from None
    if not 0.0 < value <= 1.0:
        raise RcatError(f"--eps {text!r} = {value:g}: must be in (0, 1] (pixel units; inputs are in [0, 1])")
    return value


def with_overrides(config: Any, eps: str | None, attack: str | None, device: str | None) -> Any:
    """The params with the command line's ``--eps`` / ``--attack`` / ``--device`` in place, validated again."""
    from pydantic import ValidationError

    from rcat.config import Params, format_validation_error

    if eps is None and attack is None and device is None:
        return config
    # only what was set: defaults stay defaults (e.g. the engine's chunk size keeps adapting to the batch size)
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw.setdefault("attack", {})
    if attack is not None:
        if attack in PRESETS:
            raw["attack"].update(preset=attack, ensemble=None)
        else:
            # APGD keeps the configured loss; APGD-T is DLR-targeted; the others take cross-entropy in torchattacks
            loss = raw["attack"].get("loss", "dlr") if attack == "apgd" else ("dlr" if attack == "apgdt" else "ce")
            raw["attack"].update(name=attack, loss=loss, preset=None, ensemble=None)
    if eps is not None:
        raw["attack"]["eps"] = parse_eps(eps)
    if device is not None:
        raw["device"] = device
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise RcatError(format_validation_error(exc, "the command line (--eps/--attack/--device)")) from None


def _no_overrides_for_stages(eps: str | None, attack: str | None, device: str | None, command: str) -> None:
    if eps is not None or attack is not None or device is not None:
        raise RcatError(f"{command} runs a pipeline stage, which reads params.yaml only (so that DVC sees what changed); "
                        "set attack.eps / attack.name / device there, or use --model/--old/--new with the flags")


PRESETS = ("autoattack-standard", "cascade")


def run_stage(stage: str, argument: str | None = None, params_path: str = "params.yaml") -> Any:
    """Run one stage by name through the stage scripts' own wrapper (:func:`rcat.stages.runner.run_stage`)."""
    import importlib

    from rcat.stages import runner

    if stage not in STAGES:
        fail(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
    module, function, needs = STAGES[stage]
    if needs and not argument:
        fail(f"stage {stage} needs a {needs} argument")
    describe = getattr(importlib.import_module(DESCRIBE[stage][0]), DESCRIBE[stage][1]) if stage in DESCRIBE else None
    arguments = (argument,) if needs and argument else ()
    return runner.run_stage(getattr(importlib.import_module(module), function), *arguments, params_path=params_path, describe=describe)


def _params(path: Path) -> Any:
    from rcat.config import load_params

    return load_params(path)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare | train | attack_cache | finetune | evaluate | decide | report")],
    argument: Annotated[str | None, typer.Argument(help="train: old|new; finetune/evaluate: method name")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Run one pipeline stage by name, exactly as its DVC stage does (outputs under data/)."""
    run_stage(name, argument, str(params))


@app.command()
@user_errors
def run(params: ParamsOption = Path("params.yaml"), force: Annotated[bool, typer.Option(help="rerun every stage")] = False) -> None:
    """Run the default pipeline (the same as ``dvc repro``): DVC skips stages whose inputs did not change."""
    _params(params)  # fail fast on bad params, before DVC starts
    if params.resolve() != Path("params.yaml").resolve():
        # DVC reads ./params.yaml and nothing else: validating another file and running on this one
        # would report a verdict for parameters nobody checked
        raise RcatError(f"--params {params}: 'rcat run' runs 'dvc repro', which always reads ./params.yaml; copy {params} to "
                        "params.yaml, or set single keys with 'dvc exp run -S key=value'")
    # DVC and the stage commands (`python stages/...`) must resolve to this environment's tools,
    # even when it is not activated.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    command = ["dvc", "repro", *(["--force"] if force else [])]
    code = subprocess.run(command, check=False, env=env).returncode
    if code:
        fail(f"'{' '.join(command)}' failed with exit code {code}; see the stage's message above", code)


@app.command()
@user_errors
def attack(
    model: Annotated[str | None, typer.Option(help="an rcat model file, factory:module.path:callable@WEIGHTS, or torchscript:PATH; omit to run the attack_cache stage")] = None,
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="output parquet of per-sample outcomes")] = None,
    split: Annotated[str, typer.Option(help="all | finetune | validation | test (split by params' data section)")] = "all",
    mean: MeanOption = None,
    std: StdOption = None,
    params: OptionalParamsOption = None,
    eps: EpsOption = None,
    attack_name: Annotated[str | None, typer.Option("--attack", help="apgd | apgdt | pgd | fgsm | fgsm_rs | fab | fab_t | square, or a preset: autoattack-standard | cascade (overrides params)")] = None,
    device_name: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps (overrides params)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Attack one model with the params' evaluation attack and write one row per sample; without
    --model, run the baseline attack cache stage (old and new model on every split)."""
    if model is None:
        _no_overrides_for_stages(eps, attack_name, device_name, "attack")
        run_stage("attack_cache", None, str(params or "params.yaml"))
        return
    if data is None or out is None:
        raise RcatError("attack --model needs --data and --out")
    from rcat import pipeline
    from rcat.data import load_data_argument
    from rcat.runtime import resolve_device
    from rcat.safe_io import write_parquet

    config = with_overrides(_params_or_defaults(params), eps, attack_name, device_name)
    device = resolve_device(config.device)
    samples = load_data_argument(data, config.data, config.seed, split)
    loaded = _load_reference(model, samples, device, config, mean, std)
    outcomes = pipeline.attack_model_on_splits(loaded, "model", {samples.name: samples}, config.attack, config.seed, device, config.engine)
    write_parquet(out, outcomes)
    result = {"out": str(out), "samples": len(outcomes), "accuracy": float(outcomes["clean_correct"].mean()),
              "robust_accuracy": float(outcomes["robust"].mean()), "attack": config.attack.label(), "device": str(device)}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{out}: {result['samples']} samples, accuracy {result['accuracy']:.4f}, robust accuracy {result['robust_accuracy']:.4f} "
              f"(attack {result['attack']}, device {result['device']})")


@app.command()
@user_errors
def finetune(
    method: Annotated[str, typer.Option(help="a method name from params' finetune.methods")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Fine-tune the new model with one configured method (writes data/finetune/<method>/)."""
    run_stage("finetune", method, str(params))


@app.command()
@user_errors
def evaluate(
    old: Annotated[str | None, typer.Option(help="the old model: an rcat model file, factory:module.path:callable@WEIGHTS, or torchscript:PATH")] = None,
    new: Annotated[str | None, typer.Option(help="the new model (same forms)")] = None,
    data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="output directory for metrics.json and flips.parquet")] = None,
    split: Annotated[str, typer.Option(help="all | finetune | validation | test")] = "all",
    method: Annotated[str | None, typer.Option(help="evaluate a configured method's fine-tuned model instead")] = None,
    mean: MeanOption = None,
    std: StdOption = None,
    params: OptionalParamsOption = None,
    eps: EpsOption = None,
    attack_name: Annotated[str | None, typer.Option("--attack", help="apgd | apgdt | pgd | fgsm | fgsm_rs | fab | fab_t | square, or a preset: autoattack-standard | cascade (overrides params)")] = None,
    device_name: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps (overrides params)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Flip evaluation: attack both models (each with its own attack) and compare them.

    With --old/--new/--data/--out: write OUT/metrics.json (flat keys, fractions in [0, 1]) and
    OUT/flips.parquet (one row per sample). With --method: the pipeline's evaluate stage.
    """
    if method is not None:
        _no_overrides_for_stages(eps, attack_name, device_name, "evaluate --method")
        run_stage("evaluate", method, str(params or "params.yaml"))
        return
    if old is None or new is None or data is None or out is None:
        raise RcatError("evaluate needs --old, --new, --data and --out (or --method NAME)")
    from rcat import pipeline
    from rcat.data import load_data_argument
    from rcat.runtime import resolve_device

    config = with_overrides(_params_or_defaults(params), eps, attack_name, device_name)
    device = resolve_device(config.device)
    samples = load_data_argument(data, config.data, config.seed, split)
    old_model = _load_reference(old, samples, device, config, mean, std)
    new_model = _load_reference(new, samples, device, config, mean, std)
    metrics = pipeline.evaluate_pair(old_model, new_model, samples, config.attack, config.seed, device, out, config.engine)
    if as_json:
        print(json.dumps({**metrics, "attack": config.attack.label(), "device": str(device), "out": str(out)}, default=str))
    else:
        print(" ".join(f"{key}={metrics[key]:.4f}" for key in ("accuracy_old", "accuracy_new", "robust_accuracy_old", "robust_accuracy_new", "nfr", "rnfr"))
              + f" attack={config.attack.label()} device={device}")


@app.command()
@user_errors
def decide(
    params: ParamsOption = Path("params.yaml"),
    fail_on_reject: Annotated[bool, typer.Option(help="exit with code 3 unless a candidate is promoted")] = False,
    replay: Annotated[Path | None, typer.Option(help="recompute the verdict stored in this decision.json and check it matches")] = None,
) -> None:
    """Run the update gate over every evaluated candidate; write data/decide/decision.json.

    With --replay FILE: verify FILE's signature (RCAT_SIGNING_KEY) and every evidence file it lists,
    recompute its evaluations from their per-sample outcomes and its verdict from those; exit 0
    when all of it matches, 2 when anything differs (an edited record or file, or a changed gate).
    """
    from rcat.pipeline import Layout, replay_decision, require_promotion
    from rcat.safe_io import read_json

    if replay is not None:
        record = read_json(replay)
        # data/decide/decision.json rests on files under data/: resolve them from the record's own place
        layout = Layout(replay.resolve().parent.parent) if replay.parent.name == "decide" else Layout()
        result = replay_decision(record, layout)
        if not result["matches"]:
            raise RcatError(f"{replay}: replay gives {result['verdict']} {result['candidate'] or ''} but the record says "
                            f"{result['recorded_verdict']} {result['recorded_candidate'] or ''}; the record was edited or the gate changed")
        print(f"{replay}: every evidence file verified, signature {result['signature']}; "
              f"replayed verdict {result['verdict']} {result['candidate'] or ''} matches the record")
        if fail_on_reject:
            require_promotion(record)
        return
    record = run_stage("decide", None, str(params))
    if fail_on_reject:
        require_promotion(record)


@app.command()
@user_errors
def serve(
    cron: Annotated[str | None, typer.Option(help="cron schedule replacing prefect.yaml's, e.g. '0 3 * * *'")] = None,
    project_dir: Annotated[Path, typer.Option(help="the project root: prefect.yaml, dvc.yaml, params.yaml")] = Path("."),
) -> None:
    """Schedule update checks: register prefect.yaml's `update-check` deployment with its cron schedule on
    the Prefect server at PREFECT_API_URL (`prefect server start`) and run its flow runs here until Ctrl-C."""
    import importlib.util

    script = project_dir / "pipelines" / "update_check.py"
    if not script.is_file():
        raise RcatError(f"{script}: not found; pass the project root as --project-dir")
    # the flow module imports `pipelines.*` relative to the project root; Prefect itself is imported there, not here
    root = str(project_dir.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("pipelines.update_check", script)
    if spec is None or spec.loader is None:
        raise RcatError(f"{script}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.serve(project_dir, cron)


@app.command()
@user_errors
def init(
    directory: Annotated[Path, typer.Argument(help="the new project's directory (new or empty)")],
    data: Annotated[str | None, typer.Option(help=DATA_HELP + " (default: digits)")] = None,
    old: Annotated[str | None, typer.Option(help="the model in service: an rcat model file, factory:module.path:callable@WEIGHTS or models:/NAME@champion")] = None,
    new: Annotated[str | None, typer.Option(help="the candidate update (same forms)")] = None,
    git: Annotated[bool, typer.Option(help="run git init (and dvc init with it); --no-git: dvc init --no-scm")] = True,
) -> None:
    """Write a working update-check project: dvc.yaml, stages/, pipelines/, prefect.yaml, params.yaml
    (your data and models), .gitignore; git init and dvc init done. Then: cd DIR && dvc repro."""
    from rcat.scaffold import init_project

    path = init_project(directory, data=data, old=old, new=new, git=git)
    print(f"{path}: rcat project written; next: cd {directory} && dvc repro")


@app.command()
@user_errors
def champion(
    name: Annotated[str | None, typer.Option(help="registered model (default: tracking.registered_model of the params)")] = None,
    alias: Annotated[str, typer.Option(help="the alias to resolve")] = "champion",
    params: OptionalParamsOption = None,
    pin: Annotated[bool, typer.Option(help="write the champion into rcat-champion.json (for train_old.reference: champion)")] = False,
) -> None:
    """Print the pinned reference models:/NAME/VERSION that the alias points at now.

    With `train_old.reference: champion` in params.yaml, `rcat champion --pin` writes it into
    rcat-champion.json, a dep of train_old: `dvc repro` then reruns the check exactly when the champion
    moved (the decide stage refreshes the pin itself when it moves the champion). Or pin by hand:
    `dvc exp run -S train_old.reference=$(rcat champion)`.
    """
    from rcat.registry import pinned_reference, write_champion_pin
    from rcat.tracking import tracking_uri

    if pin:
        written = write_champion_pin(_params(params or Path("params.yaml")))
        print(f"rcat-champion.json: {written['reference'] or 'no champion used (train_old.reference is not champion)'}")
        return
    config = _params_or_defaults(params)
    name = name or config.tracking.registered_model
    if not name:
        raise RcatError("no registered model: pass --name or set tracking.registered_model in params.yaml")
    print(pinned_reference(name, alias, tracking_uri(config.tracking)))


def _load_reference(reference: str, samples: Any, device: Any, config: Any, mean: str | None, std: str | None) -> Any:
    """Load a model reference for the data in ``samples``; factories named by the params are trusted."""
    from rcat.models import FACTORY_PREFIX, check_model_on, load_model_reference

    normalization = None
    if (mean is None) != (std is None):
        raise RcatError("--mean and --std go together")
    if mean is not None and std is not None:
        try:
            normalization = (tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(",")))
        except ValueError:
            raise RcatError(f"--mean {mean!r} / --std {std!r}: comma-separated numbers expected") from None
    is_file = not reference.startswith((FACTORY_PREFIX, "torchscript:"))
    trusted = set(config.trusted_factories())
    if reference.startswith(FACTORY_PREFIX):
        trusted.add(reference[len(FACTORY_PREFIX):].partition("@")[0])
    model = load_model_reference(
        reference, device,
        num_classes=None if is_file else samples.num_classes,
        input_shape=None if is_file else tuple(samples.images.shape[1:]),
        normalization=normalization, trusted_factories=trusted,
    )
    check_model_on(model, samples.images, samples.num_classes, f"data {samples.source}")
    return model


def _params_or_defaults(path: Path | None) -> Any:
    """The params file given with --params (it must exist); without one, ./params.yaml when present,
    else the built-in defaults (the paper's APGD-DLR evaluation attack) so that single-model commands
    work outside a project."""
    if path is not None or Path("params.yaml").is_file():
        return _params(path or Path("params.yaml"))
    from rcat.config import FinetuneConfig, MethodConfig, Params

    return Params(finetune=FinetuneConfig(methods={"at": MethodConfig(loss="at")}))


def _plain_help() -> None:
    """Help text without reStructuredText markup: ``x`` and `x` print as 'x'."""
    import re

    for command in app.registered_commands:
        if command.callback is not None and command.callback.__doc__:
            command.help = re.sub(r"`{1,2}([^`]+)`{1,2}", r"'\1'", command.callback.__doc__)


_plain_help()


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    bound_shape_caches()  # before the first convolution (rcat.heap)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
