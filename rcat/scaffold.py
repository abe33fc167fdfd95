"""``rcat init DIR``: a working update-check project of the user's own, from the files rcat ships.

Writes ``dvc.yaml`` (the stages, without this repository's own ``rcat/*.py`` code deps: in a user's
project rcat is an installed package), ``stages/`` (the thin stage scripts and plot templates),
``pipelines/`` (the Prefect flows), ``prefect.yaml``, ``params.yaml`` (rcat's defaults with the
user's data source and model references, validated before anything is written), ``rcat-champion.json`` (no champion pinned yet), ``.gitignore`` and
``data/.gitignore``, then runs ``git init`` and ``dvc init`` there. The directory must be new or
empty; the project is assembled in a temporary sibling directory and renamed into place, so a
failure leaves nothing half-written.

The template files are this repository's own (``dvc.yaml``, ``stages/``, ``pipelines/``,
``prefect.yaml``, ``params.yaml``): found next to the ``rcat`` package in a source checkout or an
editable install, and installed under ``<prefix>/share/rcat/project`` by a wheel
(``[tool.setuptools.data-files]`` in pyproject.toml).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rcat.errors import InputError

TEMPLATE_FILES = ("dvc.yaml", "prefect.yaml", "params.yaml")
PIN_FILE = "rcat-champion.json"
TEMPLATE_DIRS = ("stages", "pipelines")
GITIGNORE = """# rcat project (written by `rcat init`)
__pycache__/
/mlflow.db
/mlruns/
/mlartifacts/
/.rcat_cache/
/data/*
!/data/.gitignore
"""


def template_root() -> Path:
    """Where the project template lives: the source checkout next to the package, or the wheel's data files."""
    candidates = [Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "rcat" / "project"]
    for root in candidates:
        if all((root / name).is_file() for name in TEMPLATE_FILES) and all((root / name).is_dir() for name in TEMPLATE_DIRS):
            return root
    raise InputError(f"rcat's project template is not installed (looked in {', '.join(map(str, candidates))}); reinstall rcat")


def project_dvc_yaml(text: str) -> str:
    """The template's dvc.yaml without the ``rcat/*.py`` deps (the package is installed, not part of the project)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.strip().startswith("- rcat/"))


def project_params(root: Path, data: str | None, old: str | None, new: str | None, name: str) -> dict[str, Any]:
    """rcat's default params with the user's data source and model references; validated (one-line error on bad values)."""
    from rcat.config import parse_params, read_yaml

    raw = read_yaml(root / "params.yaml")
    if data is not None:
        raw["data"]["source"] = data
    for role, reference in (("train_old", old), ("train_new", new)):
        if reference is not None:
            raw[role]["reference"] = reference
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name).strip("-") or "project"
    raw["tracking"]["experiment"] = f"rcat-{slug}"
    raw["tracking"]["registered_model"] = f"rcat-{slug}"
    parse_params(raw, "rcat init (the params it would write)")
    return raw


def init_project(directory: str | os.PathLike[str], *, data: str | None = None, old: str | None = None, new: str | None = None,
                 git: bool = True) -> Path:
    """Write a new project at ``directory`` (see the module docstring); return its path."""
    import yaml

    target = Path(directory).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target}: exists and is not an empty directory; rcat init writes a new project (choose a new or empty directory)")
    if not target.parent.is_dir():
        raise InputError(f"{target.parent}: no such directory; create it first")
    root = template_root()
    params = project_params(root, data, old, new, target.name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.rcat-init-", dir=target.parent))
    try:
        for name in TEMPLATE_DIRS:
            shutil.copytree(root / name, staging / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (staging / "dvc.yaml").write_text(project_dvc_yaml((root / "dvc.yaml").read_text(encoding="utf-8")), encoding="utf-8")
        shutil.copyfile(root / "prefect.yaml", staging / "prefect.yaml")
        (staging / PIN_FILE).write_text('{"reference": null, "registered_model": null, "version": null}\n', encoding="utf-8")
        header = ("# rcat update check (written by `rcat init`); every key is documented in rcat's params.yaml and README.\n"
                  "# Change a value for one run with `dvc exp run -S key=value`.\n")
        (staging / "params.yaml").write_text(header + yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        (staging / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
        (staging / "data").mkdir()
        (staging / "data" / ".gitignore").write_text("/*\n!/.gitignore\n", encoding="utf-8")
        if git:
            _run(["git", "init", "-q"], staging)
            _run(["dvc", "init", "-q"], staging)
        else:
            _run(["dvc", "init", "-q", "--no-scm"], staging)
        if target.exists():
            target.rmdir()  # empty (checked above)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _run(command: list[str], cwd: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)  # dvc from this environment, even when it is not activated
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise InputError(f"rcat init needs {command[0]!r} on PATH; install it (or pass --no-git to skip git)") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise InputError(f"rcat init: '{' '.join(command)}' failed ({last[-1] if last else exc.returncode})") from None
