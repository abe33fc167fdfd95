"""The pipeline's stages, one module each, as functions of (validated params, file layout[, tracker]).

DVC stage scripts (``stages/``) call them through :func:`rcat.stages.runner.run_stage`; the
``rcat`` command line and the Prefect flow's tasks (via DVC) reach the same functions, so there is
one code path per stage. Each module imports only what its stage uses, so that a stage starts
fast and reruns only when code it runs changed (``dvc.yaml`` deps are its import closure). Each
function reads its inputs from the layout, calls the core modules, writes its outputs atomically,
then logs to MLflow: a tracking failure never leaves a half-written output behind.
"""
