"""Shared tiny fixtures: a few hundred digits, two small models, a reduced params file, and one
session-scoped Prefect test harness (a temporary PREFECT_HOME, never the user's database)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# Nothing in the tests may write to the user's MLflow store or Prefect database.
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")


# `make test` runs the suite on pytest-xdist workers (`-n auto --maxprocesses 4 --dist loadgroup`). A fixture that is expensive to build
# keeps every test that uses it on one worker, so it is built once: a session fixture of this list (the first match
# wins; the session's `dvc repro` is the costliest), else any module-scoped fixture (the group is the module).
SHARED_SESSION_FIXTURES = ("reproduced_project", "evaluated_project", "prefect_harness")


def shared_fixture_group(item: pytest.Item) -> str | None:
    """The xdist group of ``item``: the first of :data:`SHARED_SESSION_FIXTURES` it uses, else its module's name when
    it uses a module-scoped fixture, else None (any worker may run it)."""
    names = getattr(item, "fixturenames", ())
    group = next((name for name in SHARED_SESSION_FIXTURES if name in names), None)
    if group is None:
        definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(defs and defs[-1].scope == "module" for defs in definitions.values()):
            group = item.module.__name__ if isinstance(item, pytest.Function) else None
    return group


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        group = shared_fixture_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item) -> None:
    """On an xdist worker under ``--dist loadgroup``, xdist must have appended the group to each grouped test's node id:
    without it the groups are silently ignored and every worker builds the session's pipeline run again."""
    if item.config.getoption("loadgroup", default=False) and item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail("pytest-xdist did not group this test: with pytest >= 9.2 `--dist loadgroup` is broken "
                    "(pytest-dev/pytest-xdist#1386); install pytest < 9.2 (pyproject's dev extra) or run without -n", pytrace=False)


@pytest.fixture(scope="session")
def digits_splits():
    """The embedded default's seeded stratified split (fine-tune 60% / validation 20% / test 20%)."""
    from rcat.config import DataConfig
    from rcat.data import load_dataset, split_dataset

    return split_dataset(load_dataset("digits"), DataConfig(), seed=0)


@pytest.fixture(scope="session")
def tiny_split(digits_splits):
    """120 validation digits: enough for an attack to break some, small enough to be instant."""
    from rcat.data import Split

    split = digits_splits["validation"]
    keep = torch.arange(120)
    return Split("validation", split.images[keep], split.labels[keep], split.sample_index[keep], split.num_classes, split.source)


@pytest.fixture(scope="session")
def trained_mlp(digits_splits):
    """A small MLP trained (clean, 15 epochs) on the fine-tune split: accurate but not robust."""
    from rcat.models import ModelSpec

    torch.manual_seed(0)
    split = digits_splits["finetune"]
    spec = ModelSpec("mlp", (1, 8, 8), 10, {"hidden": [32]})
    network = spec.build()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        for start in range(0, len(split), 64):
            x, y = split.images[start : start + 64], split.labels[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(x), y).backward()
            optimizer.step()
    return network.eval(), spec


@pytest.fixture
def model_files(tmp_path, trained_mlp):
    """Two rcat model files: the trained MLP as 'old', a copy with perturbed weights as 'new' (worse, with flips)."""
    from rcat.models import save_model

    network, spec = trained_mlp
    old_path, new_path = tmp_path / "models" / "old.safetensors", tmp_path / "models" / "new.safetensors"
    save_model(network, spec, old_path)
    perturbed = spec.build()
    perturbed.load_state_dict(network.state_dict())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in perturbed.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    save_model(perturbed, spec, new_path)
    return old_path, new_path


def reduced_params(tmp_root: Path, **overrides) -> dict:
    """The repo's params.yaml shrunk for tests: few epochs, a short attack, tracking into tmp_root."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for role in ("train_old", "train_new"):
        params[role]["epochs"] = 4
    params["attack"]["steps"] = 5
    params["finetune"]["epochs"] = 2
    params["tracking"]["uri"] = f"sqlite:///{tmp_root / 'mlflow.db'}"
    for key, value in overrides.items():
        params[key] = value
    return params


def copy_project(work: Path) -> Path:
    """A new directory ``work`` holding what the pipeline runs from: dvc.yaml, stages/ and rcat/."""
    work.mkdir()
    for name in ("dvc.yaml", "rcat-champion.json", "stages", "rcat"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, work / name)
    return work


@pytest.fixture
def pipeline_workspace(tmp_path, monkeypatch):
    """A new project written by `rcat init` (git + DVC initialised; rcat itself is the installed package),
    with the repo's params.yaml reduced for tests: every end-to-end test runs on what users get."""
    from rcat.scaffold import init_project

    env_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", env_bin + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = init_project(tmp_path / "project")
    (work / "params.yaml").write_text(yaml.safe_dump(reduced_params(work), sort_keys=False))
    return work


def project_env() -> dict[str, str]:
    """The environment of a pipeline run: this interpreter's bin first on PATH (DVC's `python` is the project's), no MLflow URI."""
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def dvc_watching_processes(work: Path, *args: str) -> tuple[str, set[str]]:
    """``dvc *args`` in ``work``; its output and the command lines of every process it spawned (polled every 0.2 s)."""
    import psutil

    process = subprocess.Popen(["dvc", *args], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=project_env())
    seen: set[str] = set()
    root = psutil.Process(process.pid)
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    seen.add(" ".join(child.cmdline()))
        time.sleep(0.2)
    output = process.stdout.read() if process.stdout else ""
    assert process.returncode == 0, output[-3000:]
    return output, seen


REPRODUCED_METHODS = ("at", "pct", "rcat")
"""The methods of :func:`reproduced_project`: every kind of stage (tests/test_losses.py covers the other losses)."""


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory):
    """A project written by `rcat init` with reduced params (methods :data:`REPRODUCED_METHODS`, attacks on two local
    workers, the MLflow store ``mlflow.db`` at its root), after one `dvc repro`, run once for the session.

    Returns ``(path, output of that repro, command lines of every process it spawned)``. Tests work on a copy
    (:func:`reproduced_workspace`): DVC, git and MLflow state all live inside the directory.
    """
    from rcat.scaffold import init_project

    work = init_project(tmp_path_factory.mktemp("reproduced") / "project")
    params = reduced_params(work)
    params["tracking"]["uri"] = "sqlite:///mlflow.db"  # the project root's: a copy of the directory logs into its own store
    params["engine"]["workers"] = 2
    params["finetune"]["methods"] = {name: params["finetune"]["methods"][name] for name in REPRODUCED_METHODS}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output, spawned = dvc_watching_processes(work, "repro")
    return work, output, spawned


@pytest.fixture
def reproduced_workspace(reproduced_project, tmp_path, monkeypatch):
    """A private copy of :func:`reproduced_project`'s directory, with PATH set for `dvc` and the stages."""
    source, _, _ = reproduced_project
    work = tmp_path / "project"
    shutil.copytree(source, work, symlinks=True)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test harness for the whole session, with PREFECT_HOME in a temp directory."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def evidence_params(tmp_root: Path) -> dict:
    """Reduced params with two fine-tuning methods (at, pct) and tracking off: for the gate's evidence tests."""
    params = reduced_params(tmp_root)
    params["finetune"]["methods"] = {"at": {"loss": "at"}, "pct": {"loss": "pct", "alpha": 1.0, "beta": 2.0}}
    params["tracking"]["enabled"] = False
    return params


@pytest.fixture(scope="session")
def evaluated_project(tmp_path_factory):
    """A project directory (params.yaml + data/) through every stage up to ``decide``, run once in-process.

    Tests copy it (:func:`copy_evaluated`) before changing anything.
    """
    from rcat import pipeline
    from rcat.config import parse_params

    root = tmp_path_factory.mktemp("evaluated") / "project"
    root.mkdir()
    raw = evidence_params(root)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    layout = pipeline.Layout(root / "data")
    previous = os.getcwd()
    os.chdir(root)  # the engine's cache_dir is relative to the project
    try:
        pipeline.prepare(params, layout)
        pipeline.train(params, "old", layout)
        pipeline.train(params, "new", layout)
        pipeline.attack_cache(params, layout)
        for method in params.finetune.methods:
            pipeline.finetune_method(params, method, layout)
            pipeline.evaluate_method(params, method, layout)
        pipeline.decide(params, layout)
    finally:
        os.chdir(previous)
    return root


def copy_evaluated(source: Path, destination: Path) -> Path:
    """A private copy of :func:`evaluated_project` (data, params and the attack cache)."""
    shutil.copytree(source, destination)
    return destination


# ---------------------------------------------------------------- a real MLflow tracking server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(server: subprocess.Popen) -> None:
    """Stop a server started in its own process group, its workers with it (SIGKILL for those that outlive or ignore SIGTERM)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


def wait_for(server: subprocess.Popen, answer: Callable[[], T], log_path: Path, what: str, timeout: float = 120.0) -> T:
    """``answer()``'s value once it stops raising OSError (polled every 0.5 s); fails the test with ``what`` and the
    tail of the server's log if ``server`` exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return answer()
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (a free port, one web worker, artifacts under ``root``); yields its URL, always stops it.

    ``backend_store_uri`` defaults to a new SQLite store in ``root``.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    with log_path.open("w") as log:
        # its own process group: the server spawns its web workers, and stop_process_group stops them all
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        def healthy() -> None:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status != 200:
                    raise OSError(f"health answered {answer.status}")

        try:
            wait_for(server, healthy, log_path, "mlflow server did not start")
            yield url
        finally:
            stop_process_group(server)
