"""Typed, validated view of ``params.yaml``: validated once at the edge, typed everywhere after.

Every section is a frozen pydantic model with ``extra="forbid"``: an unknown or mistyped key is
rejected with a message that names the file, the key path and the allowed keys. Stages read only
their own section (DVC tracks exactly those keys, see ``dvc.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rcat.errors import ConfigError

DEFAULT_PARAMS_FILE = "params.yaml"

MAX_CLASSES = 10_000
"""The most classes a model or a data source may have (labels must lie in 0..C-1)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Epsilon = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


CASCADE_FIRST_STEPS = 10
"""Steps of the cascade preset's cheap first attack (APGD-CE)."""


class AttackConfig(Section):
    """One white-box attack, run through the torchattacks adapter (:mod:`rcat.attacks`), or an ensemble.

    ``eps`` is in [0, 1] pixel units (inputs are always in [0, 1]; normalisation lives inside the
    model). ``step_size`` defaults per attack: PGD ``2.5 * eps / steps``; FGSM-RS ``1.25 * eps``
    (Wong et al.; the authors' code used an absolute 1.25, a bug that this default avoids).
    ``fab_t`` is FAB in its multi-targeted version (AutoAttack's FAB-T).

    **Ensembles** (worst case over several attacks, see :func:`rcat.attacks.attack_outcomes`):
    either ``ensemble: [<attack>, ...]`` (each entry a single attack) or
    ``preset: autoattack-standard`` (APGD-CE 100 steps, APGD-T 100 steps, FAB-T 100 steps, Square
    5000 queries, as in Croce & Hein's AutoAttack "standard", at this config's ``eps``). With
    either, the single-attack fields (``name``, ``loss``, ``steps``, ...) are ignored and only
    ``eps`` (for the preset), ``norm`` and ``batch_size`` count. Clean mistakes are never
    attacked, and each next attack runs only on the samples still robust.

    ``preset: cascade``: a cheap attack first (APGD-CE, :data:`CASCADE_FIRST_STEPS` steps, one
    restart), then *this config's own single attack* (``name``, ``loss``, ``steps``, ...; e.g. the
    paper's APGD-DLR-50) only on the samples the cheap one did not break. A sample counts as broken
    when either breaks it (worst case; ``broken_by`` names which), so the cascade is never weaker
    than its cheap member, and it is as strong as the full attack alone up to that attack's own
    randomness (its random start and batch composition differ on the smaller set; measured in
    ``benchmarks/attack_throughput.py``). It saves the full attack's cost on the samples a few
    steps already break: the more non-robust samples, the larger the saving.
    """

    name: Literal["apgd", "apgdt", "pgd", "fgsm", "fgsm_rs", "fab", "fab_t", "square"] = "apgd"
    loss: Literal["ce", "dlr"] = "dlr"
    norm: Literal["Linf"] = "Linf"
    eps: Epsilon = 8 / 255
    steps: Annotated[int, Field(ge=1, le=100_000)] = 50
    restarts: Annotated[int, Field(ge=1, le=100)] = 1
    step_size: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 500
    ensemble: list[AttackConfig] | None = None
    preset: Literal["autoattack-standard", "cascade"] | None = None

    @model_validator(mode="after")
    def _ensemble_shape(self) -> AttackConfig:
        if self.ensemble is not None and self.preset is not None:
            raise ValueError("give either 'ensemble' or 'preset', not both")
        if self.ensemble is not None:
            if not self.ensemble:
                raise ValueError("'ensemble' needs at least one attack")
            if any(member.is_ensemble for member in self.ensemble):
                raise ValueError("an ensemble's entries must be single attacks (no nested 'ensemble' or 'preset')")
        return self

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble is not None or self.preset is not None

    def members(self) -> list[AttackConfig]:
        """The single attacks to run, in order (``[self]`` for a single attack)."""
        if self.preset == "autoattack-standard":
            common: dict[str, Any] = {"norm": self.norm, "eps": self.eps, "batch_size": self.batch_size, "restarts": 1}
            return [
                AttackConfig(name="apgd", loss="ce", steps=100, **common),
                AttackConfig(name="apgdt", loss="dlr", steps=100, **common),
                AttackConfig(name="fab_t", loss="ce", steps=100, **common),
                AttackConfig(name="square", loss="ce", steps=5000, **common),
            ]
        if self.preset == "cascade":
            cheap = AttackConfig(name="apgd", loss="ce", steps=CASCADE_FIRST_STEPS, restarts=1, norm=self.norm, eps=self.eps, batch_size=self.batch_size)
            return [cheap, self.model_copy(update={"preset": None, "ensemble": None})]
        if self.ensemble is not None:
            return list(self.ensemble)
        return [self]

    @property
    def max_eps(self) -> float:
        """The largest eps any member may use (the eps-ball every returned point is checked against)."""
        return max(member.eps for member in self.members())

    def identity(self) -> dict[str, Any]:
        """The fields that change results (``batch_size`` does not), for provenance and cache keys."""
        if self.is_ensemble:
            return {"ensemble": [member.identity() for member in self.members()]}
        return self.model_dump(exclude={"batch_size", "ensemble", "preset"})

    def label(self) -> str:
        """Short human-readable name, e.g. ``apgd-dlr:50it:1r:Linf:eps=0.1``."""
        if self.preset == "cascade":
            return "cascade[" + ",".join(member.label() for member in self.members()) + "]"
        if self.preset is not None:
            return f"{self.preset}:{self.norm}:eps={self.eps:g}"
        if self.ensemble is not None:
            return "ensemble[" + ",".join(member.label() for member in self.ensemble) + "]"
        return f"{self.name}-{self.loss}:{self.steps}it:{self.restarts}r:{self.norm}:eps={self.eps:g}"


AttackConfig.model_rebuild()


class EngineConfig(Section):
    """The attack engine (:mod:`rcat.engine`): content-addressed, chunked, resumable attack runs.

    ``cache_dir`` must live outside DVC outputs (``dvc repro`` deletes a stage's outs before
    rerunning it, which would throw the resumable cache away). ``chunk_size`` must be a multiple
    of the attack's ``batch_size``. ``workers > 1`` runs chunks in that many local processes (one
    torch thread each), ``dask_address`` on the workers of an existing Dask cluster
    (:mod:`rcat.executors`). ``progress``:
    ``null`` shows a progress bar (samples/s, robust accuracy so far) when stderr is a terminal,
    ``true`` prints one line per chunk (for logs), ``false`` prints nothing.
    """

    cache_dir: str = ".rcat_cache/attacks"
    chunk_size: Annotated[int, Field(ge=1)] = 1024
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    dask_address: str | None = None
    progress: bool | None = None

    @field_validator("cache_dir")
    @classmethod
    def _cache_outside_data(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("cache_dir must be a directory path")
        parts = Path(value).parts
        if parts and parts[0] == "data":
            raise ValueError("cache_dir must live outside data/ (DVC deletes stage outputs before rerunning a stage)")
        return value

    def effective_chunk_size(self, batch_size: int) -> int:
        """``chunk_size`` when it is a multiple of ``batch_size``; for the default (not set by the user)
        the nearest multiple below it (at least one batch). A user-set chunk size is checked in :class:`Params`."""
        if self.chunk_size % batch_size == 0:
            return self.chunk_size
        if "chunk_size" in self.model_fields_set:
            raise ConfigError(f"params.yaml: engine.chunk_size {self.chunk_size} must be a multiple of the attack's batch_size {batch_size}")
        return max(1, self.chunk_size // batch_size) * batch_size


class DataConfig(Section):
    """The data source and its seeded, stratified split into fine-tune / validation / test."""

    source: str = "digits"
    resize: Annotated[int, Field(ge=1, le=4096)] | None = None  # shorter side, in pixels (bilinear, antialiased)
    center_crop: Annotated[int, Field(ge=1, le=4096)] | None = None  # square centre crop after resizing
    finetune_fraction: Fraction = 0.6
    validation_fraction: Fraction = 0.2
    test_fraction: Fraction = 0.2

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        with_path = {"imagefolder": "PATH", "npz": "PATH", "cifar10-binary": "DIR", "cifar10-python": "DIR"}
        if kind != "digits" and kind not in with_path:
            raise ValueError(f"unknown data source {value!r}; use 'digits', 'imagefolder:PATH', 'npz:PATH', 'cifar10-binary:DIR' or 'cifar10-python:DIR'")
        if kind in with_path and not value.partition(":")[2].strip():
            raise ValueError(f"{kind} needs a path: '{kind}:{with_path[kind]}'")
        return value

    @model_validator(mode="after")
    def _fractions_sum_to_at_most_one(self) -> DataConfig:
        # below 1, the rest of the data source is left out (a seeded stratified subset): large sources
        # such as CIFAR-10 can be sized to the machine without preparing a smaller copy
        total = self.finetune_fraction + self.validation_fraction + self.test_fraction
        if total > 1.0 + 1e-6:
            raise ValueError(f"finetune_fraction + validation_fraction + test_fraction must be at most 1, got {total:g}")
        return self


class Normalization(Section):
    """Per-channel input normalisation applied inside the model: ``(x - mean) / std``."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _matching(self) -> Normalization:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
        if any(value <= 0 for value in self.std):
            raise ValueError("std values must be positive")
        return self


class TrainConfig(Section):
    """Where the old or new model comes from.

    Without ``reference``: adversarial training from scratch (the embedded default: CE on the
    training attack's points). With ``reference``: the user's own model is imported instead and
    every training field is ignored. A reference is an rcat model file,
    ``factory:module.path:callable@WEIGHTS`` (WEIGHTS a ``.safetensors`` file or a state dict,
    loaded without unpickling code), or ``torchscript:PATH`` (evaluation only). ``normalization``
    wraps a referenced model so that it takes inputs in [0, 1].

    ``attack_warmup_epochs``: the training attack's eps grows linearly over the first N epochs
    (epoch e in 1..N uses ``eps * e / N``; the step size scales with it unless set). Adversarial
    training from scratch at a large eps (CIFAR-10 at 8/255 with FGSM) can collapse to a constant
    prediction in its first epoch; ramping eps up is the usual remedy. 0: full eps from the start.

    ``augment: crop_flip``: each training image is shifted by up to 4 pixels (zero padding, then a
    random crop back to its size) and mirrored left-right with probability 1/2, seeded by ``seed``
    (the standard CIFAR-10 augmentation). ``lr_schedule: cosine``: the learning rate falls from
    ``lr`` to 0 along a half cosine over all steps (Loshchilov & Hutter). ``weight_decay``: SGD's L2
    coefficient. The defaults (none, constant, 0) are the authors' protocol.
    """

    reference: str | None = None
    normalization: Normalization | None = None
    architecture: str = "mlp"
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    data_fraction: Fraction = 1.0
    epochs: Annotated[int, Field(ge=1)] = 20
    lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 0.05
    momentum: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.9
    batch_size: Annotated[int, Field(ge=1)] = 64
    attack: AttackConfig = AttackConfig(name="pgd", loss="ce", steps=7)
    attack_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    augment: Literal["none", "crop_flip"] = "none"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    seed: int = 0


CACHE_CONSTRAINT_SETS = frozenset({"attack_cache", "class_reweighted", "random_class_matched"})
"""RCAT constraint sets built from the old model's robust flags in the baseline attack cache."""


class WeightPoint(Section):
    """One (alpha, beta) setting of a method's hyper-parameter grid."""

    alpha: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    beta: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


HINGE_MARGIN = 1.0
"""The default ``margin`` of ``constraint_term: margin_hinge``, in logit units."""


class MethodConfig(Section):
    """One fine-tuning method. Losses are defined in :mod:`rcat.losses`.

    ``alpha``/``beta`` mean what the paper's code means: for ``rcat`` the weights of the
    distillation toward the pre-update new model and toward the old model (CE weight
    ``1 - alpha - beta``); for ``pct``/``pct_at`` the all-sample and old-correct focal weights.

    RCAT only: ``constraint_set`` chooses the samples the beta term constrains. ``paper_proxy``
    (the authors' code): the old model classifies the current model's training-attack point
    correctly, decided per batch. ``attack_cache``: the old model was robust on the sample in the
    baseline attack cache ("no adversarial example was found before the update", the paper's own
    words), decided once per sample. ``constraint_term`` chooses the penalty on those samples:
    ``distill`` (the paper: logit distance to the old model) or ``new_error`` (adversarial
    cross-entropy up-weighted on those samples: Bansal et al.'s 2019 "new-error" loss, the
    BackwardCompatibilityML baseline, moved to the old model's robust set; it has no term toward
    the old model's logits). ``focal_ce`` is the former name of ``new_error`` and means the same.
    ``margin_hinge`` (a lead beyond the paper): the hinge ``max(0, margin - (z_y - max_{j != y}
    z_j))`` on the adversarial logit margin of those samples, zero once the true class leads by
    ``margin`` (logit units, default 1; set only with ``margin_hinge``).

    ``grid`` (instead of ``alpha``/``beta``): fine-tune once per ``{alpha, beta}`` point and keep
    the one with the lowest S-NFR on the validation split among the points whose accuracy and
    robust accuracy stay within ``decision.rules.max_accuracy_drop_vs_new`` /
    ``max_robust_accuracy_drop_vs_new`` of the new model's (ties: higher robust accuracy, then
    higher accuracy, then grid order); when none does, the stage says so and keeps the point
    closest to the limits, which the gate then rejects (:func:`rcat.decision.best_grid_point`). The authors' table script
    sorts with ``ascending=False`` and so keeps the *highest* S-NFR; that is not copied.

    Two further constraint sets are *controls*, to tell congruence with the old model's robust
    samples from imitation of its class prior; both read the same attack-cache flags. With n_c the
    fine-tune samples of class c and r_c those the old model resisted:
    ``class_reweighted`` weights every sample of class c by r_c / n_c (the beta term becomes a
    class-reweighted cross-entropy with the same expected class emphasis as the robust set's, on
    no particular samples); ``random_class_matched`` constrains a random subset with r_c samples
    of each class c (seeded by ``finetune.seed``).

    ``distance``: how the logit distance D sums over the C classes: ``mean`` (the authors'
    ``(1/2C) sum_k``) or ``sum`` (``(1/2) sum_k``, C times stronger; on CIFAR-10 a distillation
    term then weighs about as much as a cross-entropy term). ``epochs``, ``lr`` and ``train_eps``
    override the ``finetune`` section's values for this method only (a tuned AT family is a few
    ``at`` methods with different budgets).
    """

    loss: Literal["at", "pct", "pct_at", "rcat"]
    alpha: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    beta: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    constraint_set: Literal["paper_proxy", "attack_cache", "class_reweighted", "random_class_matched"] = "paper_proxy"
    constraint_term: Literal["distill", "new_error", "focal_ce", "margin_hinge"] = "distill"
    margin: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] = HINGE_MARGIN
    distance: Literal["mean", "sum"] = "mean"
    epochs: Annotated[int, Field(ge=0, le=10_000)] | None = None
    lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    train_eps: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    grid: list[WeightPoint] | None = None

    @property
    def uses_attack_cache(self) -> bool:
        """Whether the constraint set is read from the old model's flags in the baseline attack cache."""
        return self.loss == "rcat" and self.constraint_set in CACHE_CONSTRAINT_SETS

    @model_validator(mode="after")
    def _grid_replaces_weights(self) -> MethodConfig:
        if self.grid is None:
            return self
        if {"alpha", "beta"} & self.model_fields_set:
            raise ValueError("give either alpha/beta or a grid of {alpha, beta} points, not both")
        if self.loss == "at":
            raise ValueError("at has no alpha/beta to search; drop the grid")
        if not self.grid:
            raise ValueError("grid is empty; list at least one {alpha, beta} point")
        for point in self.grid:  # each point must be a valid method on its own (e.g. rcat's alpha + beta <= 1)
            MethodConfig(**self.model_dump(exclude={"grid", "alpha", "beta"}), alpha=point.alpha, beta=point.beta)
        return self

    def points(self) -> list[MethodConfig]:
        """The settings to fine-tune: this method itself, or one method per grid point (in grid order)."""
        if self.grid is None:
            return [self]
        shared = self.model_dump(exclude={"grid", "alpha", "beta"})
        return [MethodConfig(**shared, alpha=point.alpha, beta=point.beta) for point in self.grid]

    @model_validator(mode="after")
    def _convex_rcat_weights(self) -> MethodConfig:
        if self.loss == "rcat" and self.alpha + self.beta > 1.0 + 1e-9:
            raise ValueError(f"rcat needs alpha + beta <= 1 (the CE weight is 1 - alpha - beta), got {self.alpha:g} + {self.beta:g}")
        if self.loss == "at" and (self.alpha or self.beta):
            raise ValueError("at takes no alpha/beta; use loss: rcat for a weighted variant")
        if self.loss != "rcat" and (self.constraint_set != "paper_proxy" or self.constraint_term != "distill"):
            raise ValueError(f"constraint_set / constraint_term apply to loss: rcat only, not {self.loss!r}")
        if self.loss == "at" and self.distance != "mean":
            raise ValueError("at has no distillation term; drop distance")
        if self.margin != HINGE_MARGIN and self.constraint_term != "margin_hinge":
            raise ValueError(f"margin applies to constraint_term: margin_hinge only, not {self.constraint_term!r}; drop margin")
        return self


class FinetuneConfig(Section):
    """Constrained fine-tuning shared settings; ``methods`` maps an output name to its loss.

    ``augment``, ``lr_schedule`` and ``weight_decay`` mean what they mean in :class:`TrainConfig`;
    the defaults (none, constant, 0) are the authors' fine-tuning protocol.
    """

    epochs: Annotated[int, Field(ge=0)] = 10
    lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1e-3
    momentum: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.9
    batch_size: Annotated[int, Field(ge=1)] = 128
    attack: AttackConfig = AttackConfig(name="fgsm_rs", loss="ce", steps=1)
    augment: Literal["none", "crop_flip"] = "none"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    seed: int = 0
    methods: dict[str, MethodConfig] = Field(default_factory=dict)

    def for_method(self, method: MethodConfig) -> FinetuneConfig:
        """These settings with ``method``'s own ``epochs`` / ``lr`` / ``train_eps`` in place of the shared ones."""
        update: dict[str, Any] = {}
        if method.epochs is not None:
            update["epochs"] = method.epochs
        if method.lr is not None:
            update["lr"] = method.lr
        if method.train_eps is not None:
            update["attack"] = self.attack.model_copy(update={"eps": method.train_eps})
        return self.model_copy(update=update)

    @field_validator("methods")
    @classmethod
    def _method_names(cls, value: dict[str, MethodConfig]) -> dict[str, MethodConfig]:
        if not value:
            raise ValueError("list at least one method, e.g. 'rcat: {loss: rcat, alpha: 0.5, beta: 0.4}'")
        for name in value:
            if name in {"old", "new"} or not name.replace("_", "").isalnum():
                raise ValueError(f"method name {name!r} must be alphanumeric/underscore and not 'old' or 'new'")
        return value


RULE_NAMES = ("max_nfr", "max_rnfr", "min_accuracy_delta", "min_robust_accuracy_delta", "max_accuracy_drop_vs_new",
              "max_robust_accuracy_drop_vs_new", "max_class_accuracy_drop", "max_rnf_cut_p_value")
"""Every gate rule, in the order the decision record lists them."""

INTERVAL_RULES = RULE_NAMES[:7]
"""The rules that can be judged on the pessimistic end of a 95% interval (``decision.on_interval``)."""


class DecisionRules(Section):
    """Rules a candidate must meet on a split. ``None`` disables a rule. Fractions in [0, 1].

    Against the **old** model (the non-regression promise):

    * ``max_nfr``, ``max_rnfr``: clean / robustness negative flip rate at most this;
    * ``min_accuracy_delta``, ``min_robust_accuracy_delta``: candidate minus old at least this;
    * ``max_class_accuracy_drop``: no class's clean accuracy may fall below the old model's by
      more than this (per class c: ``acc_old(c) - acc_candidate(c) <= limit``; the denominator is
      the class's samples in the split).

    Against the **un-fine-tuned new model** (an update must keep its gains):

    * ``max_accuracy_drop_vs_new``, ``max_robust_accuracy_drop_vs_new``: ``new - candidate`` at
      most this (0 for the raw update itself);
    * ``max_rnf_cut_p_value``: a fine-tuned candidate must cut the raw update's robustness
      negative flips *significantly*: fewer RNFs than ``new`` and McNemar's exact two-sided
      p-value of the paired RNF sets at most this. Not applied to ``new`` itself.
    """

    max_nfr: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = 0.05
    max_rnfr: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = 0.05
    min_accuracy_delta: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] | None = 0.0
    min_robust_accuracy_delta: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] | None = 0.0
    max_accuracy_drop_vs_new: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = 0.01
    max_robust_accuracy_drop_vs_new: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = 0.01
    max_class_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    max_rnf_cut_p_value: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None


class DecisionConfig(Section):
    """Update gate: choose the best admissible candidate on ``selection_split``, confirm on ``confirmation_split``.

    ``on_interval``: rules judged on the pessimistic end of their 95% interval instead of the
    point estimate: the upper end for ``max_*`` rules, the lower end for ``min_*`` rules (Wilson
    score intervals for NFR / RNFR; normal intervals of the paired per-sample differences for the
    deltas, drops and per-class drops). ``max_rnf_cut_p_value`` is a test already and is not listed.
    """

    rules: DecisionRules = DecisionRules()
    on_interval: list[Literal[INTERVAL_RULES]] = Field(default_factory=list)  # type: ignore[valid-type]
    selection_split: Literal["validation", "test"] = "validation"
    confirmation_split: Literal["validation", "test"] = "test"
    rank_by: Literal["snfr", "rnfr", "nfr", "robust_accuracy", "accuracy"] = "snfr"

    @model_validator(mode="after")
    def _two_splits(self) -> DecisionConfig:
        if self.selection_split == self.confirmation_split:
            raise ValueError(f"selection_split and confirmation_split are both {self.selection_split!r}: confirming on the split "
                             "the candidate was selected on confirms nothing; use validation and test")
        return self


class TrackingConfig(Section):
    """MLflow tracking. ``MLFLOW_TRACKING_URI`` in the environment overrides ``uri``.

    ``registered_model``: the MLflow registered model that the decide stage registers every
    candidate in and whose ``champion`` alias it moves on a passing check (:mod:`rcat.registry`);
    ``null`` leaves the registry alone.
    """

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "rcat"
    registered_model: str | None = "rcat"

    @field_validator("registered_model")
    @classmethod
    def _usable_in_model_uri(cls, value: str | None) -> str | None:
        # the name goes into models:/<name>@<alias> and models:/<name>/<version> references
        if value is not None and (not value.strip() or any(char in value for char in "/@:'\"\\") or value != value.strip()):
            raise ValueError(f"registered model name {value!r} must be non-empty, without surrounding spaces, '/', '@', ':' or quotes; "
                             "e.g. 'rcat-digits'")
        return value


class Params(Section):
    """The whole ``params.yaml``."""

    seed: int = 0
    device: str = "auto"
    data: DataConfig = DataConfig()
    train_old: TrainConfig = TrainConfig()
    train_new: TrainConfig = TrainConfig()
    attack: AttackConfig = AttackConfig()
    finetune: FinetuneConfig
    decision: DecisionConfig = DecisionConfig()
    tracking: TrackingConfig = TrackingConfig()
    engine: EngineConfig = EngineConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in {"auto", "cpu", "cuda"} and not value.startswith("cuda:"):
            raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @model_validator(mode="after")
    def _chunks_hold_whole_batches(self) -> Params:
        if "chunk_size" in self.engine.model_fields_set and self.engine.chunk_size % self.attack.batch_size:
            raise ValueError(f"engine.chunk_size ({self.engine.chunk_size}) must be a multiple of attack.batch_size ({self.attack.batch_size}): "
                             "chunking must not change which samples share a batch")
        return self

    def trusted_factories(self) -> frozenset[str]:
        """The ``module:callable`` factories these params name: the only user code model files may build."""
        references = (self.train_old.reference, self.train_new.reference)
        return frozenset(ref[len("factory:"):].partition("@")[0] for ref in references if ref and ref.startswith("factory:"))


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk ``loc`` through nested models to list the keys allowed where the error occurred."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            # dict[str, Model]: the key is a user name; step into the value type
            continue
        annotation = field.annotation
        args = getattr(annotation, "__args__", ()) or ()
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), current)
        if current is not None and getattr(annotation, "__origin__", None) is dict:
            current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), current)
    return sorted(getattr(current, "model_fields", {}))


def format_validation_error(error: ValidationError, source: str, model: type[BaseModel] = Params) -> str:
    """One line naming the file, the first offending key and what is allowed."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(model, loc))
        message = f"{source}: unknown key '{key}' (allowed here: {allowed})"
    elif first["type"] == "missing":
        message = f"{source}: missing required key '{key}'"
    else:
        value = first.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" {value!r}:"
        message = f"{source}: bad value for '{key}':{shown} {first['msg']}"
    more = len(error.errors()) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_params(raw: Any, source: str = DEFAULT_PARAMS_FILE) -> Params:
    """Validate an already-parsed YAML mapping into :class:`Params`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


MAX_PARAMS_BYTES = 1 << 20
"""A params file larger than this (1 MiB) is refused before it is parsed."""

MAX_EXPANDED_NODES = 100_000
"""The most YAML nodes a params file may expand to, aliases expanded (a 1 KB alias bomb expands to billions)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (DVC refuses them too; PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Node count of ``node`` with every alias expanded, memoised per node (so computing it is cheap)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # a recursive alias counts once while it is being sized
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def read_yaml(path: Path) -> Any:
    """Parse a YAML config file safely: size-bounded, no duplicate keys, alias expansion bounded.

    Anchors and aliases are allowed (the CIFAR-10 profiles share grids with them), but a document
    whose expansion exceeds :data:`MAX_EXPANDED_NODES` nodes is refused before it is built.
    """
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a params file may hold at most {MAX_PARAMS_BYTES} bytes")
    text = path.read_text(encoding="utf-8", errors="strict")
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()  # type: ignore[no-untyped-call]
            if node is None:
                return None
            expanded = _expanded_size(node, {})
            if expanded > MAX_EXPANDED_NODES:
                raise ConfigError(f"{path}: expands to {expanded:,} YAML nodes through its aliases (at most {MAX_EXPANDED_NODES:,}); "
                                  "write the values out instead of nesting aliases")
            return loader.construct_document(node)  # type: ignore[no-untyped-call]
        finally:
            loader.dispose()  # type: ignore[no-untyped-call]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        detail = f" ({problem})" if problem and "duplicate key" in str(problem) else ""
        raise ConfigError(f"{path}: not valid YAML{where}{detail}; fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse; flatten the file") from None


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file (:func:`read_yaml`, then :class:`Params`). Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = read_yaml(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    return parse_params(raw, str(path))
