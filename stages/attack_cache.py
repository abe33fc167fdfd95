"""DVC stage ``attack_cache``: attack the old and the new model once, each with its own white-box
attack, on every split; keep per-sample outcomes and the raw update's flip evaluation.

Params: ``seed``, ``device``, ``attack.*``. Outputs: ``data/attack_cache/``.
"""

from rcat.stages.attack_cache import attack_cache
from rcat.stages.runner import run_stage


def main() -> None:
    run_stage(attack_cache)


if __name__ == "__main__":
    main()
