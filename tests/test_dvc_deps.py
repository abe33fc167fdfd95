"""dvc.yaml's code deps follow from what each stage imports: a change to any module a stage runs
reruns that stage, and nothing else is listed.

The import closure of a stage is computed from its script's source (module-level and
function-level ``import rcat...`` / ``from rcat... import ...``, transitively, plus each package
``__init__`` on the way). The test compares it with the stage's ``.py`` deps in dvc.yaml.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def module_file(root: Path, module: str) -> Path | None:
    """The source file of ``module`` under ``root`` (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    """Every ``package``-internal module that ``path`` imports, at any nesting level."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == package:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from rcat import pipeline` names a module
    return found


def import_closure(script: Path, root: Path, package: str = "rcat") -> set[Path]:
    """The package files a stage script runs: its imports, theirs, and each parent package's ``__init__``."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        current = todo.pop()
        for module in imported_modules(current, package):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                path = module_file(root, ".".join(parts[:depth]))
                if path is not None and path not in seen:
                    seen.add(path)
                    todo.append(path)
    return seen


def stage_code_deps(dvc_yaml: Path) -> dict[str, tuple[Path, set[Path]]]:
    """Per stage: its script (the ``python X.py`` of its cmd) and its ``.py`` deps, both relative to the file's directory."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        script = Path(words[words.index("python") + 1])
        out[name] = (script, {Path(dep) for dep in body.get("deps", []) if str(dep).endswith(".py")})
    return out


def mismatches(project: Path) -> dict[str, dict[str, list[str]]]:
    """Per stage whose deps differ from its import closure: what is imported but not listed, and listed but not imported."""
    problems = {}
    for name, (script, listed) in stage_code_deps(project / "dvc.yaml").items():
        closure = {path.relative_to(project) for path in import_closure(project / script, project)} | {script}
        missing, extra = closure - listed, listed - closure
        if missing or extra:
            problems[name] = {"imported, not in deps": sorted(map(str, missing)), "in deps, not imported": sorted(map(str, extra))}
    return problems


def test_dvc_yaml_deps_are_each_stages_import_closure():
    assert mismatches(REPO_ROOT) == {}


def test_the_check_catches_an_import_that_dvc_yaml_lacks(tmp_path):
    """A fixture project: the stage's module gains an import (function-level, two hops away); the check names it."""
    (tmp_path / "rcat").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "rcat" / "__init__.py").write_text("")
    (tmp_path / "rcat" / "core.py").write_text("from rcat import helpers\n")
    (tmp_path / "rcat" / "helpers.py").write_text("def later():\n    from rcat.seeding import seed\n")
    (tmp_path / "rcat" / "seeding.py").write_text("def seed():\n    pass\n")
    (tmp_path / "stages" / "run.py").write_text("from rcat.core import main\n")
    deps = ["stages/run.py", "rcat/__init__.py", "rcat/core.py", "rcat/helpers.py"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"run": {"cmd": "python stages/run.py", "deps": deps}}}))
    assert mismatches(tmp_path) == {"run": {"imported, not in deps": ["rcat/seeding.py"], "in deps, not imported": []}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"run": {"cmd": "python stages/run.py", "deps": [*deps, "rcat/seeding.py"]}}}))
    assert mismatches(tmp_path) == {}


def write_code_deps(project: Path) -> None:
    """Rewrite each stage's ``.py`` deps in dvc.yaml as its import closure (script first), keeping every other line."""
    closures = {name: [script, *sorted((p.relative_to(project) for p in import_closure(project / script, project)), key=str)]
                for name, (script, _) in stage_code_deps(project / "dvc.yaml").items()}
    lines = (project / "dvc.yaml").read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    stage, in_deps = None, False
    for line in lines:
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage, in_deps = stripped[:-1], False
        if in_deps and stripped.startswith("- ") and stripped.endswith(".py"):
            continue  # replaced below
        if in_deps and not stripped.startswith("- "):
            in_deps = False
        out.append(line)
        if stripped == "deps:" and stage in closures:
            in_deps = True
            indent = line[: len(line) - len(line.lstrip())] + "  "
            out.extend(f"{indent}- {path.as_posix()}" for path in closures[stage])
    (project / "dvc.yaml").write_text("\n".join(out) + "\n", encoding="utf-8")



def test_decide_imports_neither_torch_nor_mlflow_nor_prefect():
    """The gate only reads per-sample results and records: its stage script loads without torch (about 2 s a
    stage), without MLflow (imported only when a tracked run opens) and without Prefect (flows live in pipelines/)."""
    import subprocess
    import sys

    code = ("import runpy, sys; runpy.run_path('stages/decide.py', run_name='loaded'); "
            "print(sorted(m for m in ('torch', 'torchattacks', 'mlflow', 'prefect') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"

if __name__ == "__main__":  # python tests/test_dvc_deps.py: rewrite dvc.yaml's code deps from the imports
    write_code_deps(REPO_ROOT)
    print(mismatches(REPO_ROOT) or "dvc.yaml code deps = each stage's import closure")
