"""The one error wrapper of the DVC stage scripts: validate ``params.yaml``, run one stage function,
turn a user-facing error into one line on stderr and its exit status (:mod:`rcat.errors`).

A stage script is ``run_stage(stage_function, *arguments)``; the stage function is called as
``stage_function(params, *arguments, layout=Layout(), tracker=Tracker(params))``. MLflow is
imported only when tracking is on (:class:`rcat.tracking.Tracker` is lazy).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rcat.errors import EXIT_BAD_INPUT, EXIT_REJECTED, EXIT_TRACKING, RcatError, TrackingError, UpdateRejected


def exit_status(error: RcatError) -> int:
    """The exit status of a user-facing error: 3 rejected, 4 tracking store unavailable (retry), 2 bad input."""
    if isinstance(error, UpdateRejected):
        return EXIT_REJECTED
    if isinstance(error, TrackingError):
        return EXIT_TRACKING
    return EXIT_BAD_INPUT


def run_stage(stage: Callable[..., Any], *arguments: str, params_path: str = "params.yaml",
              describe: Callable[[Any], str] | None = None) -> Any:
    """Run ``stage`` for the project in the working directory; print ``describe(result)`` when given."""
    from rcat.config import load_params
    from rcat.heap import bound_shape_caches
    from rcat.results import Layout
    from rcat.tracking import Tracker

    bound_shape_caches()  # before the stage's first convolution (rcat.heap)
    try:
        params = load_params(params_path)
        result = stage(params, *arguments, layout=Layout(), tracker=Tracker(params))
    except RcatError as exc:
        sys.stderr.write(f"rcat: error: {' '.join(str(exc).split())}\n")  # the command line's format: one line
        raise SystemExit(exit_status(exc)) from None
    if describe is not None:
        print(describe(result))
    return result


def argument(position: int, what: str) -> str:
    """``sys.argv[position]``, or a one-line error naming the argument the stage needs."""
    if len(sys.argv) <= position or not sys.argv[position]:
        sys.stderr.write(f"rcat: error: this stage needs a {what} argument (usage: python {sys.argv[0]} <{what}>)\n")
        raise SystemExit(EXIT_BAD_INPUT)
    return sys.argv[position]
