"""DVC stages ``train_old`` / ``train_new``: adversarially train the embedded default's models.

Usage: ``python stages/train.py old|new``. Params: ``train_old.*`` or ``train_new.*``.
Outputs: ``data/models/<role>.safetensors`` and ``data/models/<role>_history.json``.
In a user's project the two models come from outside and this stage is replaced by loading them.
"""

import sys

from rcat.cli import run_stage


def main() -> None:
    run_stage("train", sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
