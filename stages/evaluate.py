"""DVC stage ``evaluate@<method>``: attack a fine-tuned model afresh and compute its flips against
the old model's cached outcomes, on the validation and test splits.

Usage: ``python stages/evaluate.py <method>``. Params: ``attack.*``. Outputs: ``data/evaluate/<method>/``.
"""

import sys

from rcat.cli import run_stage


def main() -> None:
    run_stage("evaluate", sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
