"""DVC stage ``finetune@<method>``: constrained fine-tuning of the new model with one method.

Usage: ``python stages/finetune.py <method>``. Params: ``finetune.*`` (shared) and
``finetune.methods.<method>``. Outputs: ``data/finetune/<method>/``.
"""

from rcat.stages.finetune import finetune_method
from rcat.stages.runner import argument, run_stage


def main() -> None:
    run_stage(finetune_method, argument(1, "method name"))


if __name__ == "__main__":
    main()
