"""rcat: safe updates of adversarially robust models.

The core package behind the DVC stages (``stages/``), the Prefect flows (``pipelines/``) and the
``rcat`` command line. One module per idea: :mod:`rcat.config` (params), :mod:`rcat.data` (data
sources and splits), :mod:`rcat.models` (model files), :mod:`rcat.attacks` (the torchattacks
adapter), :mod:`rcat.losses`, :mod:`rcat.finetune`, :mod:`rcat.metrics`, :mod:`rcat.decision`
(the update gate), :mod:`rcat.tracking` (MLflow), :mod:`rcat.safe_io`, and :mod:`rcat.pipeline`
(the stages as functions).
"""

__version__ = "0.1.0"
