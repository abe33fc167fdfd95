"""DVC stages ``train_old`` / ``train_new``: adversarially train the embedded default's models.

Usage: ``python stages/train.py old|new``. Params: ``train_old.*`` or ``train_new.*``.
Outputs: ``data/models/<role>.safetensors`` and ``data/models/<role>_history.json``.
In a user's project the two models come from outside and this stage is replaced by loading them.
"""

from rcat.stages.runner import argument, run_stage
from rcat.stages.train import train


def main() -> None:
    run_stage(train, argument(1, "role (old|new)"))


if __name__ == "__main__":
    main()
