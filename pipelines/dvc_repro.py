"""One ``dvc repro --single-item`` through DVC's Python API, in a child process; what it did as a JSON file.

The flow (:mod:`pipelines.update_pipeline`) runs this file as a script, one process per target::

    python pipelines/dvc_repro.py --result RESULT.json [--force] TARGET
    python pipelines/dvc_repro.py --result RESULT.json --list

A child process, not DVC inside the flow's own process, because the stages' output (their one-line
errors) must be captured for the Prefect task's message and the repository lock must be released
whatever happens. ``RESULT.json`` is written (atomically) in every case that reaches Python:

* ``{"stages": [...]}`` with ``--list``: every stage of ``dvc.yaml``, foreach items expanded;
* ``{"target", "ran", "skipped", "restored", "error"}`` otherwise. ``ran``: the stages DVC
  reproduced (``Repo.reproduce`` returns them), less those it restored from its run-cache
  (``restored``); ``skipped``: the target's other stages (up to date) plus ``restored``, in
  ``dvc.yaml`` order. ``error`` is None or ``{"message", "stage_exit_code", "lock"}``:
  ``stage_exit_code`` is the exit status of the stage's own command (None when DVC itself failed,
  e.g. a bad ``dvc.yaml``), ``lock`` is True when another DVC process held the repository lock.

The exit code is 0 when DVC succeeded, 1 when it raised (the result file says what), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from rcat.safe_io import write_json

_EXITED_WITH = re.compile(r"exited with (-?\d+)$")
"""DVC's ``StageCmdFailedError`` keeps the command's status only in its message (``failed to run: CMD, exited with N``)."""


def describe_error(error: BaseException) -> dict[str, Any]:
    """``{"message", "stage_exit_code", "lock"}`` from the chain of exceptions DVC raised."""
    from dvc.lock import LockError
    from dvc.stage.exceptions import StageCmdFailedError

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    status = None
    for exc in chain:
        if isinstance(exc, StageCmdFailedError) and (found := _EXITED_WITH.search(str(exc))):
            status = int(found.group(1))
    return {"message": ": ".join(dict.fromkeys(str(exc) for exc in chain if str(exc))),
            "stage_exit_code": status, "lock": any(isinstance(exc, LockError) for exc in chain)}


def list_stages(root: str = ".") -> list[str]:
    """Every stage of the project's ``dvc.yaml``, as ``dvc stage list --name-only`` names them."""
    from dvc.repo import Repo

    with Repo(root) as repo:
        return [stage.addressing for stage in repo.index.stages]


def reproduce(target: str, force: bool = False, root: str = ".") -> dict[str, Any]:
    """``dvc repro --single-item [--force] TARGET`` through ``Repo.reproduce``; see the module docstring for the result."""
    from dvc.repo import Repo

    result: dict[str, Any] = {"target": target, "ran": [], "skipped": [], "restored": [], "error": None}
    with Repo(root) as repo:
        members = [stage.addressing for stage in repo.stage.collect(target)]
        restore = repo.stage_cache.restore
        restored: list[str] = []

        def restore_and_record(stage: Any, *args: Any, **kwargs: Any) -> Any:
            outcome = restore(stage, *args, **kwargs)  # raises RunCacheNotFoundError when there is nothing to restore
            if not kwargs.get("dry"):
                restored.append(stage.addressing)
            return outcome

        repo.stage_cache.restore = restore_and_record  # type: ignore[method-assign]  # this Repo object only
        try:
            reproduced = {stage.addressing for stage in repo.reproduce(targets=[target], single_item=True, force=force)}
        except Exception as error:
            result["error"] = describe_error(error)
            reproduced = set()
    result["restored"] = [name for name in members if name in restored]
    result["ran"] = [name for name in members if name in reproduced and name not in restored]
    result["skipped"] = [name for name in members if name not in result["ran"] and (result["error"] is None or name in restored)]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dvc repro --single-item through DVC's Python API; the outcome as JSON.")
    parser.add_argument("--result", required=True, type=Path, help="where to write the JSON outcome")
    parser.add_argument("--force", action="store_true", help="rerun the target's stages (dvc repro --force)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="list the stages of dvc.yaml instead")
    group.add_argument("target", nargs="?", help="a stage or foreach group of dvc.yaml")
    args = parser.parse_args(argv)
    if args.list:
        try:
            write_json(args.result, {"stages": list_stages()})
        except Exception as error:
            write_json(args.result, {"stages": None, "error": describe_error(error)})
            print(f"ERROR: {describe_error(error)['message']}", file=sys.stderr)
            return 1
        return 0
    outcome = reproduce(args.target, args.force)
    write_json(args.result, outcome)
    if outcome["error"] is not None:
        print(f"ERROR: {outcome['error']['message']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
