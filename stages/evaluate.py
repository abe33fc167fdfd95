"""DVC stage ``evaluate@<method>``: attack a fine-tuned model afresh and compute its flips against
the old model's cached outcomes, on the validation and test splits.

Usage: ``python stages/evaluate.py <method>``. Params: ``attack.*``. Outputs: ``data/evaluate/<method>/``.
"""

from rcat.stages.evaluate import evaluate_method
from rcat.stages.runner import argument, run_stage


def main() -> None:
    run_stage(evaluate_method, argument(1, "method name"))


if __name__ == "__main__":
    main()
