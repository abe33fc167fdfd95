"""DVC stage ``finetune@<method>``: constrained fine-tuning of the new model with one method.

Usage: ``python stages/finetune.py <method>``. Params: ``finetune.*`` (shared) and
``finetune.methods.<method>``. Outputs: ``data/finetune/<method>/``.
"""

import sys

from rcat.cli import run_stage


def main() -> None:
    run_stage("finetune", sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
