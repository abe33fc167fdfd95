"""DVC stage ``report``: the update report, one self-contained HTML page (verdict first, candidates
with bootstrap intervals, robust accuracy against RNFR, per-class flips, a gallery of robustness
negative flips), written to ``data/report/report.html`` with the plot data next to it.

Params: ``seed``, ``device``, ``attack`` (the gallery recomputes a few adversarial points).
"""

from rcat.cli import run_stage


def main() -> None:
    run_stage("report")


if __name__ == "__main__":
    main()
