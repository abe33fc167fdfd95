"""DVC stage ``prepare``: split the data source (seeded, stratified) and write each split with its digest.

Params: ``seed``, ``data.*``. Outputs: ``data/prepared/`` (one safetensors file per split, ``manifest.json``).
"""

from rcat.stages.prepare import prepare
from rcat.stages.runner import run_stage


def main() -> None:
    run_stage(prepare)


if __name__ == "__main__":
    main()
