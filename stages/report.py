"""DVC stage ``report``: the update report, one self-contained HTML page (verdict first, candidates
with bootstrap intervals, robust accuracy against RNFR, per-class flips, a gallery of robustness
negative flips), written to ``data/report/report.html`` with the plot data next to it.

Params: ``seed``, ``device``, ``attack`` (the gallery recomputes a few adversarial points).
"""

from rcat.report import build_report, describe_report
from rcat.stages.runner import run_stage


def main() -> None:
    run_stage(build_report, describe=describe_report)


if __name__ == "__main__":
    main()
