"""Every stage function in one namespace, for scripts, notebooks, benchmarks and tests.

The stages live one per module in :mod:`rcat.stages` (so that each DVC stage imports only what it
runs); this module re-exports them. Importing it imports every stage, the attack library included:
the DVC stage scripts import their own module instead.
"""

from __future__ import annotations

from rcat.metrics import flip_set
from rcat.models import load_model
from rcat.results import EVALUATED_SPLITS, Layout
from rcat.runtime import resolve_device
from rcat.stages.attack_cache import attack_cache
from rcat.stages.attacking import ENGINE_SUMMARIES, attack_model_on_splits
from rcat.stages.common import epoch_logger, load_cached_outcomes
from rcat.stages.decide import decide, gather_evaluations, input_digests, library_versions, replay_decision, require_promotion
from rcat.stages.evaluate import evaluate_method, evaluate_pair
from rcat.stages.finetune import finetune_method
from rcat.stages.prepare import prepare
from rcat.stages.records import method_params
from rcat.stages.train import import_model, train

__all__ = [
    "ENGINE_SUMMARIES", "EVALUATED_SPLITS", "Layout", "attack_cache", "attack_model_on_splits", "decide", "epoch_logger", "evaluate_method",
    "evaluate_pair", "finetune_method", "flip_set", "gather_evaluations", "import_model", "input_digests", "library_versions", "load_cached_outcomes",
    "load_model", "method_params", "prepare", "replay_decision", "require_promotion", "resolve_device", "train",
]
