"""The one typed, validated view of ``params.yaml``.

Every stage builds a :class:`Params` from the file before it does any work, so a
typo or an out-of-range value fails fast with a message that names the key, the
value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, StrictBool, ValidationError, field_validator, model_validator

from tlpipe.core.data_params import CsvParams as CsvParams
from tlpipe.core.data_params import DataParams
from tlpipe.core.data_params import DemoParams as DemoParams
from tlpipe.core.data_params import FolderParams as FolderParams
from tlpipe.core.data_params import MedmnistParams as MedmnistParams
from tlpipe.core.data_params import UrlParams as UrlParams
from tlpipe.core.errors import PipelineError
from tlpipe.core.schema import Section, format_errors


def _probability(default: float) -> Any:
    return Field(default, ge=0.0, le=1.0)


class ConfigError(PipelineError, ValueError):
    """params.yaml is missing, unreadable or does not fit the schema."""


class SplitParams(Section):
    # both > 0: training stops early on val, and evaluate needs a test split
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 42
    # a regex on the file name whose first group names the group (e.g. a patient id):
    # images of one group never sit in two splits
    group_pattern: str | None = None
    # exact duplicates (same decoded pixels): keep_one drops all copies but one;
    # keep_first_split keeps the copies that sit in the first split holding one (train, val, test)
    duplicates: Literal["keep_one", "keep_first_split"] = "keep_first_split"
    # when the source brings its own splits: keep them as given, or re-split train+val (test kept)
    source_splits: Literal["keep", "resplit_train_val"] = "keep"
    # a group (patient) the source itself puts in two splits: error stops the stage; warn keeps the
    # source's splits as given (e.g. an official test split) and counts the overlap in the summary
    source_split_overlap: Literal["error", "warn"] = "error"

    @field_validator("group_pattern")
    @classmethod
    def _one_capturing_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        if compiled.groups < 1:
            raise ValueError("needs one capturing group, e.g. 'person(\\d+)_'")
        return pattern

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "split.val_fraction + split.test_fraction must be < 0.9 "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class AugmentParams(Section):
    image_size: int = Field(64, ge=32, le=1024)
    copies: int = Field(2, ge=0, le=100)
    seed: int = 42
    horizontal_flip: float = _probability(0.5)
    vertical_flip: float = _probability(0.0)
    rotate_limit: float = Field(15.0, ge=0.0, le=180.0)
    shift_limit: float = Field(0.05, ge=0.0, le=0.5)
    scale_limit: float = Field(0.1, ge=0.0, le=0.9)
    crop_scale: float = Field(1.0, ge=0.05, le=1.0)
    brightness_limit: float = Field(0.2, ge=0.0, le=1.0)
    contrast_limit: float = Field(0.2, ge=0.0, le=1.0)
    probability: float = _probability(0.7)


# the one list of backbone names, written out as a Literal so mypy can check it: BACKBONES is read off
# it, and tlpipe.model.backbones builds its REGISTRY from that (core may not import model, and params
# must be validated before any model code loads)
Backbone = Literal[
    "efficientnet_lite0",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnetv2_b0",
    "resnet50",
    "resnet50_v2",
    "densenet121",
    "inception_v3",
    "vgg16",
    "convnext_tiny",
]
BACKBONES: tuple[str, ...] = get_args(Backbone)


class TrainingPhaseParams(Section):
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(40, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    patience: int = Field(5, ge=1)  # epochs without a better val_loss before stopping
    seed: int = 42
    optimizer: Literal["adam", "adamw", "sgd", "sgd_nesterov", "rmsprop"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd, sgd_nesterov and rmsprop
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0)  # decoupled, applied by the optimizer
    clip_norm: float | None = Field(None, gt=0.0)  # clip each gradient to this L2 norm
    schedule: Literal["constant", "cosine", "step", "plateau"] = "constant"
    warmup_epochs: int = Field(0, ge=0)  # linear warm-up epochs before the schedule (not plateau)
    decay_every: int = Field(10, ge=1)  # step schedule: epochs between drops
    decay_factor: float = Field(0.1, gt=0.0, lt=1.0)  # step and plateau schedules
    plateau_patience: int = Field(2, ge=1)  # plateau schedule: epochs without improvement
    min_learning_rate: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    # auto: balanced weights when the largest class is over 1.5x the smallest in the train split
    class_weight: Literal["auto", "balanced", "none"] = "auto"
    # auto: mixed_float16 when a GPU is visible; on a CPU float32, with oneDNN's bf16 math where the CPU
    # has bf16 units (AMX, AVX-512 BF16); off: float32 everywhere
    mixed_precision: Literal["auto", "off"] = "auto"
    # none: the default device; mirrored: every local GPU; multi_worker: the cluster in TF_CONFIG
    distribution: Literal["none", "mirrored", "multi_worker"] = "none"

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingPhaseParams:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs})")
        if self.warmup_epochs and self.schedule == "plateau":
            raise ValueError("warmup_epochs does not combine with schedule: plateau (set warmup_epochs: 0)")
        return self


class TrainFrozenParams(TrainingPhaseParams):
    backbone: Backbone = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    head_l2: float = Field(0.0, ge=0.0)  # L2 penalty on the head's kernel
    # heads cross-fitted on train+val features for out-of-fold predictions (evaluate.decision_data: oof);
    # 0: none
    oof_folds: int = Field(5, ge=0, le=20)

    @field_validator("oof_folds")
    @classmethod
    def _folds_or_none(cls, k: int) -> int:
        if k == 1:
            raise ValueError("one fold holds nothing out: use 0 (no out-of-fold predictions) or 2..20")
        return k


class FineTuneParams(TrainingPhaseParams):
    # top backbone blocks to train, or "all" (every block, whatever the backbone has)
    unfreeze_blocks: Annotated[int, Field(ge=0)] | Literal["all"] = Field("all", union_mode="left_to_right")
    # a backbone layer name: it and every layer above it train (instead of unfreeze_blocks)
    unfreeze_from: str | None = None
    # >0: start with the top block and unfreeze one more every this many epochs (gradual unfreezing)
    unfreeze_every: int = Field(0, ge=0)
    # with the bottom of the backbone frozen, run it once per image to a cache and train only the top on
    # it (the same training, cheaper epochs); false: every epoch runs the whole network
    activation_cache: StrictBool = True
    epochs: int = Field(4, ge=1)
    learning_rate: float = Field(3e-4, gt=0.0)
    schedule: Literal["constant", "cosine", "step", "plateau"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    # the backbone learns at learning_rate * backbone_lr_factor, the head at learning_rate
    backbone_lr_factor: float = Field(1.0, gt=0.0, le=1.0)
    # with train_frozen.weights: none there is nothing pretrained to protect: every layer
    # (BatchNormalization included) trains at this rate
    scratch_learning_rate: float = Field(1e-3, gt=0.0)
    patience: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _gradual_needs_blocks(self) -> FineTuneParams:
        if self.unfreeze_every and self.unfreeze_from is not None:
            raise ValueError("unfreeze_every works with unfreeze_blocks, not unfreeze_from")
        return self


class EvaluateParams(Section):
    batch_size: int = Field(64, ge=1)
    # fitted on val and saved with the model (models/decision.json), so predict and the served model
    # give the probabilities evaluate measured: temperature scaling, none, or for two classes Platt
    # scaling or isotonic regression of P(class 1)
    calibration: Literal["temperature", "none", "platt", "isotonic"] = "temperature"
    # where calibration and threshold are fitted: oof, the out-of-fold predictions over train+val that the
    # fine-tuned model is mapped onto, or val, the fine-tuned model's val split alone (docs/decision.md)
    decision_data: Literal["oof", "val"] = "oof"
    # the unfamiliar-input guard (models/guard.npz): fitted on at most this many training images' features
    # (0: no guard), its cut-off accepting this share of val images
    guard_fit_images: int = Field(4000, ge=0)
    guard_accept: float = Field(0.99, gt=0.5, lt=1.0)
    # two classes: how the cut-off on P(class 1) is set. It is chosen on the val split and then
    # applied to test, so the test metrics stay an honest estimate; more classes take the argmax
    threshold: Literal["youden", "target_sensitivity", "fixed"] = "youden"
    target_sensitivity: float = Field(0.95, gt=0.0, le=1.0)  # threshold: target_sensitivity
    fixed_threshold: float = Field(0.5, ge=0.0, le=1.0)  # threshold: fixed
    # two classes: the test metrics at more cut-offs chosen on val (Youden's, and the highest reaching each
    # of these val sensitivities), so the trade-off is seen before choosing `threshold`; [] for Youden's only
    operating_sensitivities: list[Annotated[float, Field(gt=0.0, le=1.0, strict=True)]] = Field(
        default_factory=lambda: [0.9, 0.95, 0.99]
    )
    # more than two classes: top-k accuracy, not reported for k = 1 (the accuracy) or k >= classes (1)
    top_k: int = Field(2, ge=1)
    calibration_bins: int = Field(10, ge=1, le=1000)  # equal-width bins of the top-class confidence
    bootstrap_resamples: int = Field(1000, ge=0, le=100_000)  # 0: no confidence intervals
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0  # the bootstrap's resampling

    @model_validator(mode="after")
    def _oof_needs_a_map(self) -> EvaluateParams:
        if self.decision_data == "oof" and self.calibration == "none":
            raise ValueError(
                "decision_data oof maps the fine-tuned model onto the out-of-fold probabilities, and that map "
                "is the calibration: set calibration to temperature, platt or isotonic, or decision_data to val"
            )
        return self


# the test metrics a short summary shows (report summary.md, the retrain job's summary), in reading order
SUMMARY_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "macro_f1",
    "roc_auc",
    "pr_auc",
    "ece",
)

# the test metrics a promotion can be decided on (written out as a Literal so mypy can check it)...
PromotionMetric = Literal[
    "roc_auc",
    "pr_auc",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "log_loss",
    "brier",
    "ece",
]
_LOWER_IS_BETTER = ("log_loss", "brier", "ece")
# ...in that order, and whether higher is better
PROMOTION_METRICS: dict[str, bool] = {
    name: name not in _LOWER_IS_BETTER for name in get_args(PromotionMetric)
}


class RegistryParams(Section):
    # the MLflow registered model that `tlpipe promote` adds versions to
    model_name: str = Field(
        "tlpipe-classifier", min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][\w.\- ]*$"
    )
    # the test metric (results/evaluate/metrics.json) the challenger must win on
    metric: PromotionMetric = "roc_auc"
    # the challenger becomes champion only when it beats the champion by more than this
    margin: float = Field(0.0, ge=0.0, le=1.0)


class Params(Section):
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    train_frozen: TrainFrozenParams = TrainFrozenParams()
    fine_tune: FineTuneParams = FineTuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()

    @model_validator(mode="after")
    def _oof_needs_folds(self) -> Params:
        if self.evaluate.decision_data == "oof" and self.train_frozen.oof_folds == 0:
            raise ValueError(
                "evaluate.decision_data oof needs out-of-fold predictions: set train_frozen.oof_folds to 2..20, "
                "or evaluate.decision_data to val"
            )
        return self


def parse_params(raw: object, source: str = "params") -> Params:
    """Validate a mapping (as read from YAML) into :class:`Params`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source, Params)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run from the repository root") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))


def section_dict(section: BaseModel, prefix: str) -> dict[str, object]:
    """Flatten a section into dotted keys, the form MLflow params take."""
    flat: dict[str, object] = {}
    for key, value in section.model_dump().items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{name}.{sub}"] = subvalue
        else:
            flat[name] = value
    return flat


# the sections DVC stages read; registry is read by `tlpipe promote`, after the pipeline
PIPELINE_SECTIONS = ("data", "split", "augment", "train_frozen", "fine_tune", "evaluate")


def flat_params(params: Params, sections: tuple[str, ...] = tuple(Params.model_fields)) -> dict[str, object]:
    """Every key of the given sections (default: all), as dotted names."""
    return {k: v for name in sections for k, v in section_dict(getattr(params, name), name).items()}
