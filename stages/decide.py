"""DVC stage ``decide``: the update gate. Picks the best admissible candidate on validation,
confirms it on test, and writes ``data/decide/decision.json`` (fails closed: reject when unsure).

Params: ``decision.*``.
"""

from rcat.stages.decide import decide, describe_decision
from rcat.stages.runner import run_stage


def main() -> None:
    run_stage(decide, describe=describe_decision)


if __name__ == "__main__":
    main()
