"""The typed schema of a training configuration, and loading it from YAML plus command-line overrides.

The schema holds names and types only: every value comes from `conf/default.yaml` (and a recipe file merged over
it), so the numbers of a recipe live in `conf/` and nowhere else. OmegaConf checks each override against the
schema, which is how a misspelt key or a value of the wrong type is caught before anything starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf import CONF_DIR
from mvit import list_models
from mvit.sources import SOURCES as PRETRAINED_SOURCES
from pipeline.data.augment import ERASE_MODES, parse_rand_augment
from pipeline.errors import ConfigError
from pipeline.precision import PRECISIONS

DEFAULT_CONFIG = CONF_DIR / "default.yaml"
CROP_MODES = ("short_side_jitter", "inception")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
INTERPOLATIONS = ("bilinear", "bicubic")
POOL_MEMORY_FORMATS = ("contiguous", "channels_last_3d")
RESUME_LATEST = "latest"


@dataclass
class ModelConfig:
    name: str = MISSING
    num_classes: int = MISSING  # 0: take it from the label map
    pretrained: str | None = None
    pretrained_source: str = MISSING
    drop_path_rate: float = MISSING
    head_dropout: float = MISSING
    activation_checkpointing: bool = MISSING  # recompute each block in backward: less memory, ~1/3 more compute
    pool_memory_format: str = MISSING  # contiguous | channels_last_3d (layout of the pooling convs' volumes)


@dataclass
class AugmentConfig:
    crop: str = MISSING
    min_short_side: int = MISSING
    max_short_side: int = MISSING
    min_area: float = MISSING
    max_area: float = MISSING
    min_aspect: float = MISSING
    max_aspect: float = MISSING
    flip: bool = MISSING
    crop_interpolation: str = MISSING  # bilinear | bicubic: resizing the crop box to crop_size²
    rand_augment: str = MISSING  # timm's RandAugment string, e.g. rand-m7-n4-mstd0.5-inc1; "" = off
    rand_augment_interpolation: str = MISSING  # bilinear | bicubic | random: RandAugment's rotate/shear/translate
    color_jitter: float = MISSING  # brightness, contrast and saturation jitter strength; 0 = off
    erase_prob: float = MISSING  # random erasing, per clip (on the training device, after normalisation); 0 = off
    erase_mode: str = MISSING  # pixel | rand | const: what fills the erased box
    erase_count: int = MISSING  # at most this many boxes per clip


@dataclass
class DemoConfig:
    out: str = MISSING
    seed: int = MISSING
    videos_per_class: int = MISSING


@dataclass
class DataConfig:
    train: str = MISSING
    val: str = MISSING
    test: str = MISSING
    root: str = MISSING
    labels: str = MISSING
    allow_outside_root: bool = MISSING
    index_cache: str = MISSING  # folder of probed indexes, keyed by what was probed; "": ~/.cache/mvit-ray/index
    num_frames: int = MISSING
    sampling_rate: int = MISSING
    target_fps: float = MISSING
    crop_size: int = MISSING
    num_clips: int = MISSING
    test_short_side: int = MISSING
    test_clips: int = MISSING
    test_crops: int = MISSING
    cpus_per_task: float = MISSING
    decode_concurrency: int = MISSING
    decode_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per decode task
    videos_per_task: int = MISSING  # videos each training/validation decode task takes
    prefetch_batches: int = MISSING
    mean: list[float] = field(default_factory=lambda: [MISSING] * 3)
    std: list[float] = field(default_factory=lambda: [MISSING] * 3)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class TrainConfig:
    epochs: int = MISSING
    compile: bool = MISSING  # torch.compile the DDP model
    batch_size: int = MISSING
    lr: float = MISSING
    lr_reference_batch: int = MISSING
    min_lr: float = MISSING
    warmup_epochs: float = MISSING
    warmup_start_lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = field(default_factory=lambda: [MISSING, MISSING])
    grad_clip: float = MISSING
    label_smoothing: float = MISSING
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    mixup_prob: float = MISSING
    mixup_switch_prob: float = MISSING
    precision: str = MISSING
    seed: int = MISSING
    checkpoint_every_steps: int = MISSING
    max_bad_steps: int = MISSING
    log_every_steps: int = MISSING
    accumulate_steps: int = MISSING  # micro-batches per optimizer step: global batch = batch × workers × this
    ema_decay: float = MISSING  # EMA of the weights after every optimizer step; 0 = no EMA
    model_to_log: str = MISSING  # raw | ema: the weights that pick the best model and go to MLflow
    layer_decay: float = MISSING  # layer-wise lr decay (head 1, each block below × this); 1 = off
    zero_decay_pos_cls: bool = MISSING  # exempt positional embeddings and the class token from weight decay
    eval_every_epochs: int = MISSING  # validate every N epochs (and always after the last)
    checkpoint_every_epochs: int = MISSING  # checkpoint every N epochs (and after the last)


@dataclass
class ScalingConfig:
    num_workers: int = MISSING
    use_gpu: bool = MISSING
    cpus_per_worker: float = MISSING
    num_cpus: int | None = None  # logical CPUs of a local Ray started by the job; None: the machine's
    address: str | None = None  # a running cluster to join; None: start a local one
    max_failures: int = MISSING


@dataclass
class RunConfig:
    name: str = MISSING  # "": a new name from the preset, the dataset and the time
    storage_path: str = MISSING
    checkpoints_to_keep: int = MISSING
    ray_train_log_level: str = MISSING  # Ray Train's own console lines; INFO shows every worker's report dumps
    resume: str = MISSING  # "": a new run; latest: continue run.name (or start it); a checkpoint folder
    allow_recipe_change: bool = MISSING  # resume although recipe keys differ from the checkpoint's


@dataclass
class MlflowConfig:
    tracking_uri: str = MISSING
    experiment: str = MISSING
    log_models: bool = MISSING
    registered_model_name: str | None = None
    system_metrics: bool = MISSING
    retry_seconds: float = MISSING  # how long the end of a run waits for a store that does not answer


@dataclass
class TrainingJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class EvaluateConfig:
    batch_size: int = MISSING
    replicas: int = MISSING
    use_gpu: bool = MISSING
    cpus_per_replica: float = MISSING
    precision: str = MISSING  # as train.precision; auto: bf16 on GPU replicas, fp32 on CPU
    videos_per_task: int = MISSING  # videos each decode task cuts views from


@dataclass
class EvaluationJobConfig:
    """`jobs.evaluate` and `jobs.predict`: a model reference, and the data/run/mlflow/scaling sections of training."""

    model: str = MISSING  # checkpoint folder, .pt file, runs:/ or models:/ URI, or a foreign checkpoint; "": latest
    model_source: str = MISSING  # auto | one of mvit.SOURCES
    model_name: str | None = None  # the preset, for checkpoints that don't name it
    labels: str = MISSING  # label map; "": the model's own
    allow_pickle: bool = MISSING  # load pickle-format MLflow models (they run code when loaded): trusted ones only
    top_k: int = MISSING
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


SHARED_SECTIONS = ("data", "scaling", "run", "mlflow")
EVALUATE_CONFIG = CONF_DIR / "evaluate.yaml"


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    reason = str(error).splitlines()[0]
    return f"config key '{key}': {reason}" if key else f"config: {reason}"


def load_config(
    config_file: str | Path | None = None, overrides: Sequence[str] = (), evaluation: bool = False
) -> DictConfig:
    """Merge the schema, `conf/default.yaml`, an optional recipe file and `key=value` overrides, then validate.

    With `evaluation`, the schema is `EvaluationJobConfig`: the shared sections come from the training files and
    the rest from `conf/evaluate.yaml`.
    """
    if evaluation:
        defaults = OmegaConf.load(DEFAULT_CONFIG)
        layers = [
            OmegaConf.structured(EvaluationJobConfig),
            OmegaConf.create({key: defaults[key] for key in SHARED_SECTIONS}),
            OmegaConf.load(EVALUATE_CONFIG),
        ]
    else:
        layers = [OmegaConf.structured(TrainingJobConfig), OmegaConf.load(DEFAULT_CONFIG)]
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' has no value")
    _check_choices(cfg, evaluation)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_choices(cfg: DictConfig, evaluation: bool) -> None:
    """Values that the schema types can't express: choices and ranges."""
    augment = cfg.data.augment
    choices = {
        "data.augment.crop": (augment.crop, CROP_MODES),
        "data.augment.crop_interpolation": (augment.crop_interpolation, INTERPOLATIONS),
        "data.augment.rand_augment_interpolation": (augment.rand_augment_interpolation, (*INTERPOLATIONS, "random")),
        "data.augment.erase_mode": (augment.erase_mode, ERASE_MODES),
        "run.ray_train_log_level": (cfg.run.ray_train_log_level, LOG_LEVELS),
    }
    if evaluation:
        choices["model_source"] = (cfg.model_source, ("auto", *PRETRAINED_SOURCES))
        choices["evaluate.precision"] = (cfg.evaluate.precision, PRECISIONS)
    else:
        choices["train.precision"] = (cfg.train.precision, PRECISIONS)
        choices["model.pretrained_source"] = (cfg.model.pretrained_source, PRETRAINED_SOURCES)
        choices["train.model_to_log"] = (cfg.train.model_to_log, ("raw", "ema"))
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}': '{value}' is not one of {', '.join(allowed)}")
    positive = [
        "data.num_frames",
        "data.sampling_rate",
        "data.crop_size",
        "data.num_clips",
        "scaling.num_workers",
        "data.test_clips",
        "data.test_crops",
    ]
    positive += (
        ["evaluate.batch_size", "evaluate.replicas", "top_k"]
        if evaluation
        else ["train.epochs", "train.batch_size", "train.lr"]
    )
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {OmegaConf.select(cfg, key)}")
    if cfg.data.test_crops not in (1, 3):
        raise ConfigError(f"config key 'data.test_crops': must be 1 or 3, got {cfg.data.test_crops}")
    if cfg.scaling.max_failures < -1:
        raise ConfigError(f"config key 'scaling.max_failures': must be >= -1, got {cfg.scaling.max_failures}")
    _check_augment(augment)
    if not evaluation:
        _check_kit(cfg)
    _check_ranges(cfg, evaluation)


def _check_interval(key: str, value: float, low: float, high: float, closed_high: bool = True) -> None:
    if not (low <= value <= high if closed_high else low <= value < high):
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"config key '{key}': must be in [{low}, {high}{bracket}, got {value}")


def _check_augment(augment: DictConfig) -> None:
    try:
        parse_rand_augment(augment.rand_augment)
    except ValueError as error:
        raise ConfigError(f"config key 'data.augment.rand_augment': {error}") from None
    _check_interval("data.augment.color_jitter", augment.color_jitter, 0.0, 1.0)
    if augment.rand_augment and augment.color_jitter > 0:
        raise ConfigError(
            "config key 'data.augment.color_jitter': has no effect while data.augment.rand_augment is set "
            "(timm's rule, and PySlowFast's Kinetics loader never applies it); set it to 0"
        )
    _check_interval("data.augment.erase_prob", augment.erase_prob, 0.0, 1.0)
    if augment.erase_count < 1:
        raise ConfigError(f"config key 'data.augment.erase_count': must be >= 1, got {augment.erase_count}")


def _check_kit(cfg: DictConfig) -> None:
    """The training kit's keys: accumulation, EMA, layer decay, periods."""
    train = cfg.train
    for key in ("accumulate_steps", "eval_every_epochs", "checkpoint_every_epochs"):
        if train[key] < 1:
            raise ConfigError(f"config key 'train.{key}': must be >= 1, got {train[key]}")
    _check_interval("train.ema_decay", train.ema_decay, 0.0, 1.0, closed_high=False)
    if train.layer_decay <= 0 or train.layer_decay > 1:
        raise ConfigError(f"config key 'train.layer_decay': must be in (0, 1], got {train.layer_decay}")
    if train.layer_decay < 1 and not cfg.model.pretrained:
        raise ConfigError("config key 'model.pretrained': not set, but train.layer_decay < 1 is for fine-tuning")
    if train.model_to_log == "ema" and train.ema_decay == 0:
        raise ConfigError("config key 'train.model_to_log': 'ema' needs train.ema_decay > 0 (no EMA is kept)")


# What a worker would otherwise fail on, minutes in: (key, lowest, highest, whether the lowest is allowed).
SHARED_RANGES = [
    ("data.target_fps", 0, None, False),
    ("data.test_short_side", 0, None, False),
    ("data.cpus_per_task", 0, None, False),
    ("data.decode_concurrency", 0, None, False),
    ("data.videos_per_task", 0, None, False),
    ("data.prefetch_batches", 0, None, True),
    ("data.augment.min_short_side", 0, None, False),
    ("data.augment.min_area", 0, 1, False),
    ("data.augment.max_area", 0, 1, False),
    ("data.augment.min_aspect", 0, None, False),
    ("data.demo.videos_per_class", 0, None, False),
    ("data.demo.seed", 0, None, True),
    ("scaling.cpus_per_worker", 0, None, False),
    ("run.checkpoints_to_keep", 1, None, True),
]
TRAINING_RANGES = [
    ("model.num_classes", 0, None, True),
    ("model.drop_path_rate", 0, 1, True),
    ("model.head_dropout", 0, 1, True),
    ("train.lr_reference_batch", 0, None, False),
    ("train.log_every_steps", 0, None, False),
    ("train.grad_clip", 0, None, False),
    ("train.min_lr", 0, None, True),
    ("train.warmup_epochs", 0, None, True),
    ("train.warmup_start_lr", 0, None, True),
    ("train.weight_decay", 0, None, True),
    ("train.label_smoothing", 0, 1, True),
    ("train.mixup_alpha", 0, None, True),
    ("train.cutmix_alpha", 0, None, True),
    ("train.mixup_prob", 0, 1, True),
    ("train.mixup_switch_prob", 0, 1, True),
    ("train.seed", 0, None, True),
    ("train.checkpoint_every_steps", 0, None, True),
    ("train.max_bad_steps", 0, None, True),
]
EVALUATION_RANGES = [("evaluate.cpus_per_replica", 0, None, False), ("evaluate.videos_per_task", 0, None, False)]


def _check_range(key: str, value: float, low: float, high: float | None, low_allowed: bool) -> None:
    if value < low or (value == low and not low_allowed) or (high is not None and value > high):
        bound = f"{'>=' if low_allowed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ConfigError(f"config key '{key}': must be {bound}, got {value}")


def _check_ranges(cfg: DictConfig, evaluation: bool) -> None:
    """Ranges, orders and choices of every key that would otherwise fail only inside a worker or a decode task."""
    ranges = SHARED_RANGES + (EVALUATION_RANGES if evaluation else TRAINING_RANGES)
    for key, low, high, low_allowed in ranges:
        _check_range(key, OmegaConf.select(cfg, key), low, high, low_allowed)
    data, augment = cfg.data, cfg.data.augment
    for first, second in [("min_short_side", "max_short_side"), ("min_area", "max_area"), ("min_aspect", "max_aspect")]:
        if augment[first] > augment[second]:
            raise ConfigError(
                f"config key 'data.augment.{first}': {augment[first]} is above data.augment.{second}={augment[second]}"
            )
    if not evaluation and augment.crop == "short_side_jitter" and data.crop_size > augment.min_short_side:
        raise ConfigError(
            f"config key 'data.crop_size': {data.crop_size} is above the short side it is cut from "
            f"(data.augment.min_short_side={augment.min_short_side})"
        )
    if not evaluation and data.crop_size > data.test_short_side:  # evaluation: checked on the model's settings
        raise ConfigError(
            f"config key 'data.crop_size': {data.crop_size} is above data.test_short_side={data.test_short_side}, "
            "the short side validation crops are cut from"
        )
    for key in ("mean", "std"):
        values = list(data[key])
        if len(values) != 3 or (key == "std" and min(values) <= 0):
            positive = ", all > 0" if key == "std" else ""
            raise ConfigError(f"config key 'data.{key}': needs 3 values, one per RGB channel{positive}; got {values}")
    for name, amount in data.decode_resources.items():
        _check_range(f"data.decode_resources.{name}", amount, 0, None, False)
    if cfg.scaling.num_cpus is not None:
        _check_range("scaling.num_cpus", cfg.scaling.num_cpus, 0, None, False)
    _check_run(cfg)
    if evaluation:
        if cfg.model_name is not None and cfg.model_name not in list_models():
            raise ConfigError(f"config key 'model_name': '{cfg.model_name}' is not one of {', '.join(list_models())}")
        return
    choices = {"model.name": list_models(), "model.pool_memory_format": POOL_MEMORY_FORMATS}
    for key, allowed in choices.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}': '{OmegaConf.select(cfg, key)}' is not one of {', '.join(allowed)}")
    for beta in cfg.train.betas:
        if not 0 <= beta < 1:
            raise ConfigError(f"config key 'train.betas': each must be >= 0 and < 1, got {list(cfg.train.betas)}")


def _check_run(cfg: DictConfig) -> None:
    """`run.name` is one folder inside `run.storage_path`: no separators, no `..`, nothing that leaves it."""
    name = cfg.run.name
    if name in (".", "..") or any(char in name for char in "/\\\0") or name != name.strip():
        raise ConfigError(f"config key 'run.name': {name!r} must be a plain folder name inside run.storage_path")
    for key in ("run.storage_path", "mlflow.tracking_uri", "mlflow.experiment"):
        if not OmegaConf.select(cfg, key):
            raise ConfigError(f"config key '{key}': must not be empty")


def typed(cfg: DictConfig) -> TrainingJobConfig | EvaluationJobConfig:
    """The resolved config as the schema's dataclasses: what the driver, the workers and the components take."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
