"""Typed experiment and sweep specs: YAML in, validated pydantic objects out.

One `ExperimentSpec` describes one distillation run (student, teacher, distillation, data, optimisation, run).
A `SweepSpec` is a base experiment plus a grid over dotted keys; it expands into validated trial specs before anything
starts, so a bad value anywhere in the grid fails at load time. Every problem is raised as `SpecError` with one line
that names the field and the reason; the CLI prints that line and exits 2.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import modes
from .errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


@functools.lru_cache(maxsize=1)
def _timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def _absolute(path: str | None) -> str | None:
    """Local paths are made absolute where the spec is loaded: Ray workers and Tune trials run in other directories."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


HF_HUB_PREFIX = "hf-hub:"


def _known_model(name: str) -> str:
    """A timm architecture, optionally with a pretrained tag (`regnety_160.deit_in1k`), or `hf-hub:ORG/NAME` (a model
    on the Hugging Face hub, resolved by timm when it is loaded)."""
    if name.startswith(HF_HUB_PREFIX):
        if name.count("/") != 1 or not all(name.removeprefix(HF_HUB_PREFIX).split("/")):
            raise ValueError(f"'{name}': expected hf-hub:ORG/NAME")
        return name
    if name.split(".", 1)[0] not in _timm_models():
        raise ValueError(f"unknown timm model '{name.split('.', 1)[0]}' (see timm.list_models())")
    return name


def _pretrained_known(name: str) -> None:
    """timm has pretrained weights for `name` (a bare architecture means its default tag)."""
    if name.startswith(HF_HUB_PREFIX):
        return
    import timm

    if not timm.list_pretrained(name if "." in name else f"{name}.*"):
        tags = timm.list_pretrained(f"{name.split('.', 1)[0]}.*")
        known = f"; its pretrained tags: {', '.join(tags[:6])}" if tags else "; it has none"
        raise ValueError(f"timm has no pretrained weights named '{name}'{known}")


def _check_pretrained_arch(spec):
    """A spec asking for `pretrained: true` names weights timm has (the error is on its `arch`)."""
    if spec.pretrained:
        try:
            _pretrained_known(spec.arch)
        except ValueError as err:
            raise ValueError(f"arch: {err}") from None
    return spec


# --------------------------------------------------------------------------------------------------------- models
class StudentSpec(_Strict):
    """A timm DeiT student. `arch` picks the family; the distillation token is chosen by `distillation.token`."""

    arch: str = "deit_tiny_patch16_224"
    img_size: int | None = Field(None, gt=0, description="defaults to data.img_size")
    patch_size: int | None = Field(None, gt=0)
    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    pretrained: bool = Field(False, description="start from timm's pretrained weights for arch (its tag, e.g."
                                                " deit_small_patch16_224.fb_in1k); a new head for the data's classes,"
                                                " the position embedding resampled to the image size")

    @field_validator("arch")
    @classmethod
    def _arch_is_deit(cls, name: str) -> str:
        plain = name.replace("_distilled", "")
        _known_model(plain)
        if not plain.startswith("deit_"):
            raise ValueError(f"'{name}' is not a timm DeiT model with a distillation-token variant (deit_tiny/small/base_*)")
        return plain

    _pretrained_weights_exist = model_validator(mode="after")(lambda self: _check_pretrained_arch(self))

    def timm_name(self, token: bool) -> str:
        return self.arch.replace("_patch", "_distilled_patch", 1) if token else self.arch

    def timm_kwargs(self, img_size: int) -> dict[str, Any]:
        sizes = dict(patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        return {"img_size": self.img_size or img_size, "drop_path_rate": self.drop_path_rate,
                **{k: v for k, v in sizes.items() if v is not None}}


class TeacherSpec(_Strict):
    """A frozen teacher: a timm architecture with weights from a local checkpoint, an MLflow model URI, or timm's
    pretrained weights (`pretrained: true`, from the Hugging Face hub cache; `deitlab teacher import` registers them
    once, so that workers read them from MLflow instead of the hub)."""

    name: str | None = Field(None, description="label used in params and reports; defaults to the arch or URI")
    arch: str | None = Field(None, description="timm model name (with a pretrained tag, or hf-hub:ORG/NAME, when"
                                               " pretrained); read from the checkpoint when omitted")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    uri: str | None = Field(None, description="MLflow model URI: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/PATH")
    pretrained: bool = Field(False, description="timm's pretrained weights for `arch`, loaded by timm (HF_HOME,"
                                                " HF_HUB_OFFLINE honoured)")

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, name: str | None) -> str | None:
        return None if name is None else _known_model(name)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_absolute(cls, path: str | None) -> str | None:
        return _absolute(path)

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "file:/")):
            raise ValueError(f"'{uri}' is not an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/PATH)")
        return uri

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if self.pretrained:
            given = [k for k in ("checkpoint", "uri") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"'pretrained: true' takes its weights from timm; it cannot be combined with"
                                 f" '{given[0]}' (give one source)")
            if self.arch is None:
                raise ValueError("'pretrained: true' needs 'arch', e.g. regnety_160.deit_in1k")
            _pretrained_known(self.arch)
        elif (self.checkpoint is None) == (self.uri is None):
            raise ValueError("give exactly one of 'checkpoint' (a local file), 'uri' (an MLflow model URI) or"
                             " 'pretrained: true' with a timm 'arch'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.arch or self.uri or Path(self.checkpoint or "teacher").stem


# --------------------------------------------------------------------------------------------------- distillation
class DistillationSpec(_Strict):
    """DeiT distillation. mode: one of modes.names() (none, soft, hard and any registered one); token=False gives
    class-token-only KD (Table 3, rows 2-3)."""

    mode: str = Field("hard", description="a registered distillation mode: none, soft, hard")
    token: bool = Field(True, description="use the DeiT distillation token; False distils into the class head")
    tau: float = Field(3.0, gt=0, description="soft-mode temperature")
    lambda_: float | None = Field(None, alias="lambda", ge=0, le=1,
                                  description="weight of the distillation term; default: paper value for the mode")
    soft_normalization: Literal["batchmean", "official"] = Field(
        "batchmean", description="batchmean: KL summed / batch (the paper's formula, timm); official: / (batch*classes)")
    hard_label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_head: Literal["cls", "dist", "fused"] = Field(
        "fused", description="head whose accuracy is the run's headline metric `acc` (Table 3, rows 4-6)")
    fusion: Literal["logits", "softmax"] = Field(
        "logits", description="how the fused prediction joins the two heads: the mean of their logits (the official"
                              " DeiT code, timm) or of their softmaxes")

    @field_validator("mode")
    @classmethod
    def _registered_mode(cls, name: str) -> str:
        if name not in modes.names():
            known = [f"'{m}'" for m in modes.names()]
            raise ValueError(f"Input should be {', '.join(known[:-1])} or {known[-1]} (got '{name}')")
        return name

    @property
    def spec_mode(self) -> modes.DistillationMode:
        return modes.get(self.mode)

    @property
    def weight(self) -> float:
        """The effective distillation weight: lambda, or the paper's value for the mode (soft 0.1, hard 0.5)."""
        if not self.spec_mode.uses_lambda:
            return 0.0
        return self.spec_mode.paper_lambda if self.lambda_ is None else self.lambda_

    @property
    def uses_token(self) -> bool:
        return self.token and self.spec_mode.needs_teacher


# ------------------------------------------------------------------------------------------------------------ data
class AugmentSpec(_Strict):
    """Batch-level augmentation, sized for tiny images. The teacher sees the augmented batch the student sees."""

    rotate: float = Field(5.0, ge=0, le=180, description="max rotation, degrees (in-memory data sets)")
    translate: float = Field(0.05, ge=0, lt=1, description="max shift, fraction of the image (in-memory data sets)")
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False
    mixup: float = Field(0.0, ge=0, description="timm Mixup alpha; 0 disables")
    cutmix: float = Field(0.0, ge=0, description="timm CutMix alpha; 0 disables")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    random_erasing: float = Field(0.0, ge=0, le=1)
    auto_augment: str | None = Field(None, description="timm auto-augment policy for imagefolder, e.g. rand-m9-mstd0.5;"
                                                       " parquet (on the device) takes RandAugment: rand-mM[-nN][-mstdS]")


class DataSpec(_Strict):
    dataset: Literal["digits", "imagefolder", "synthetic", "parquet"] = "digits"
    path: str | None = Field(None, description="imagefolder root holding train/ and val/ class folders; parquet: a pack"
                                               " (`deitlab data pack`), a folder or s3://bucket/prefix")
    img_size: int = Field(16, gt=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    batch_size: int = Field(32, gt=0)
    num_workers: int = Field(0, ge=0)
    synthetic_classes: int = Field(10, ge=2)
    synthetic_size: int = Field(512, ge=8)
    repeated_aug: int = Field(1, ge=1, description="repeated augmentation (DeiT, the official RASampler): each"
                                                   " training image appears this many times per epoch, each copy on"
                                                   " another rank with its own augmentation; the epoch keeps its"
                                                   " length (1: off)")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, path: str | None) -> str | None:
        return _absolute(path)

    @model_validator(mode="after")
    def _path_for_imagefolder(self) -> DataSpec:
        if self.dataset == "imagefolder":
            if not self.path:
                raise ValueError("dataset 'imagefolder' needs 'path' (a folder with train/ and val/)")
            for split in ("train", "val"):
                if not (Path(self.path) / split).is_dir():
                    raise ValueError(f"imagefolder path '{self.path}' has no '{split}/' folder")
        return self

    @model_validator(mode="after")
    def _path_for_parquet(self) -> DataSpec:
        if self.dataset != "parquet":
            return self
        from .shards import check_pack_uri  # torch + pyarrow: only for parquet specs

        if not self.path:
            raise ValueError("dataset 'parquet' needs 'path' (a pack made by `deitlab data pack`: a folder or"
                             " s3://bucket/prefix)")
        try:
            check_pack_uri(self.path, "path")
        except SpecError as err:
            raise ValueError(str(err)) from None
        if "://" not in self.path and not (Path(self.path) / "meta.json").is_file():
            raise ValueError(f"parquet path '{self.path}' has no meta.json (not a pack, or its packing did not finish)")
        if self.augment.auto_augment:
            from .gpu_augment import parse_rand_augment

            parse_rand_augment(self.augment.auto_augment)
        return self


# ---------------------------------------------------------------------------------------------------- optimisation
class OptimSpec(_Strict):
    epochs: int = Field(10, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    opt: str = "adamw"
    sched: Literal["cosine", "poly", "tanh", "none"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    clip_grad: float | None = Field(None, gt=0)
    lr_base_batch: int | None = Field(
        None, gt=0, description="when set, `lr` is the rate for this global batch and is scaled linearly to the real"
                                " one (DeiT: lr 5e-4 at 512); when unset, `lr` is used as given")

    def scaled_lr(self, global_batch: int) -> float:
        """The learning rate for `global_batch` images per step (per-worker batch × workers)."""
        return self.lr if self.lr_base_batch is None else self.lr * global_batch / self.lr_base_batch


# ------------------------------------------------------------------------------------------------------------- run
# Every metric an epoch reports (engine.Engine.run); checkpoints can be ranked by any of them.
EPOCH_METRICS = frozenset({
    "acc", "acc_cls", "acc_dist", "acc_fused", "acc_teacher", "agreement", "val_loss", "train_loss",
    "train_base_loss", "train_kd_loss", "best_acc"})


def _epoch_metric(name: str) -> str:
    if name not in EPOCH_METRICS:
        raise ValueError(f"unknown metric '{name}' (one of {', '.join(sorted(EPOCH_METRICS))})")
    return name


def check_tracking_uri(uri: str) -> str:
    """A tracking URI without credentials: they would travel in Ray's pickled trial state and in every record of the
    run. MLflow reads them from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."""
    scheme, _, rest = uri.partition("://")
    if rest and ("@" in rest.split("/", 1)[0] or any(k in rest.lower() for k in ("token=", "password=", "secret="))):
        raise ValueError("credentials do not belong in the tracking URI; set MLFLOW_TRACKING_USERNAME and"
                         " MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
    return uri


class RunSpec(_Strict):
    workers: int = Field(1, gt=0, description="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker, e.g. {\"accelerator_type:H100\": 0.001} or"
                                          " a resource the cluster's nodes declare (ray start --resources)")
    torch_threads: int = Field(1, gt=0, description="intra-op threads per worker on CPU")
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU")
    compile: bool = Field(False, description="torch.compile students and teacher (slower start, faster steps)")
    workdir: str = Field("deitlab-work", validate_default=True,
                         description="local home of the default MLflow store and Ray results")
    storage: str | None = Field(None, description="Ray storage path (local dir or s3://...); default WORKDIR/ray_results")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite in WORKDIR")
    experiment: str = Field("deitlab", description="MLflow experiment name")
    artifacts: str | None = Field(
        None, description="where a new MLflow experiment keeps its artifacts: a directory or s3://bucket/prefix (the"
                          " endpoint from AWS_ENDPOINT_URL); default WORKDIR/mlartifacts for the local store, the"
                          " server's artifact root for a tracking server")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags on the run (team, ticket, ...)")
    log_every_steps: int = Field(50, ge=0, description="log the training loss and lr every N steps (0: per epoch"
                                                        " only); sent in the background, never waited for")
    checkpoint_every: int = Field(1, gt=0, description="epochs between checkpoints (the last epoch always has one)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept: the best by checkpoint_metric, plus the latest")
    checkpoint_metric: str = Field("acc", description="metric that ranks checkpoints, e.g. acc, val_loss")
    checkpoint_order: Literal["max", "min"] = "max"
    max_failures: int = Field(3, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack", description="Ray placement of the workers: pack onto few nodes, or spread over nodes")

    @field_validator("resources")
    @classmethod
    def _custom_resources_only(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"'{name}' is set by cpus_per_worker / gpus_per_worker, not run.resources")
            if amount <= 0:
                raise ValueError(f"'{name}': expected an amount > 0, got {amount:g}")
        return resources

    @field_validator("workdir")
    @classmethod
    def _workdir_absolute(cls, path: str) -> str:
        return _absolute(path)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_in_tracking_uri(cls, uri: str | None) -> str | None:
        return check_tracking_uri(uri) if uri else uri

    @field_validator("storage")
    @classmethod
    def _no_credentials_in_storage(cls, uri: str | None) -> str | None:
        # run.storage is logged as an MLflow param: credentials belong in the environment (AWS_* variables, profiles).
        if uri and any(k in uri.lower() for k in ("access_key", "secret_key", "session_token", "@")):
            raise ValueError("credentials do not belong in run.storage; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                             " (or a profile) in the environment")
        return _absolute(uri.removeprefix("file://")) if uri else uri

    @field_validator("artifacts")
    @classmethod
    def _artifact_location(cls, uri: str | None) -> str | None:
        if not uri:
            return None
        if "@" in uri or "?" in uri:
            raise ValueError("run.artifacts takes s3://bucket/prefix or a directory, without credentials or query"
                             " options (the S3 endpoint comes from AWS_ENDPOINT_URL)")
        if "://" in uri and not uri.startswith(("s3://", "file://", "gs://", "wasbs://")):
            raise ValueError(f"'{uri}': expected s3://bucket/prefix or a directory")
        return uri if "://" in uri and not uri.startswith("file://") else Path(_absolute(uri.removeprefix("file://"))).as_uri()

    _known_metric = field_validator("checkpoint_metric")(_epoch_metric)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    @property
    def resolved_storage(self) -> str:
        return self.storage or str(self.workdir_path / "ray_results")


# ------------------------------------------------------------------------------------------------------ experiment
class ExperimentSpec(_Strict):
    name: str = "experiment"
    student: StudentSpec = Field(default_factory=StudentSpec)
    init_from: str | None = Field(
        None, description="start the student from trained weights (fine-tuning, DeiT Table 7): runs:/RUN_ID (the"
                          " newest checkpoint of a deitlab run), models:/NAME/VERSION, or a checkpoint directory or"
                          " file; the position embedding is resampled to the new image size, a head with another"
                          " class count starts fresh")
    teacher: TeacherSpec | None = None
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    @field_validator("init_from")
    @classmethod
    def _init_source(cls, source: str | None) -> str | None:
        if source is None or source.startswith(("runs:/", "models:/")):
            return source
        if "://" in source:
            raise ValueError(f"'{source}': expected runs:/RUN_ID, models:/NAME/VERSION or a local checkpoint path")
        path = _absolute(source)
        if not Path(path).exists():
            raise ValueError(f"no checkpoint at '{path}'")
        return path

    @model_validator(mode="after")
    def _patches_tile_image(self) -> ExperimentSpec:
        img = self.student.img_size or self.data.img_size
        patch = self.student.patch_size or 16
        if img % patch:
            raise ValueError(f"student image size {img} is not a multiple of its patch size {patch}"
                             " (set student.patch_size)")
        return self

    @model_validator(mode="after")
    def _teacher_when_distilling(self, info: ValidationInfo) -> ExperimentSpec:
        # A sweep's base experiment may leave the teacher to the grid; each trial spec is checked in full.
        sweep_base = bool(info.context and info.context.get("sweep_base"))
        if self.distillation.spec_mode.needs_teacher and self.teacher is None and not sweep_base:
            raise ValueError(f"distillation mode '{self.distillation.mode}' needs a 'teacher' section")
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentSpec:
        """A new validated spec with dotted-key overrides applied (what --set and sweep grids use)."""
        raw = self.model_dump(by_alias=True, exclude_unset=True)
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return validate(ExperimentSpec, raw, source="override")

    def flat_params(self) -> dict[str, Any]:
        """Flattened, effective parameters for tracking (defaults included, derived values resolved)."""
        flat = _flatten(self.model_dump(by_alias=True, mode="json"))
        flat["distillation.lambda"] = self.distillation.weight
        flat["distillation.token"] = self.distillation.uses_token
        flat["student.timm_name"] = self.student.timm_name(self.distillation.uses_token)
        flat["teacher"] = self.teacher.label if self.teacher else "none"
        return flat


class TeacherTrainingSpec(_Strict):
    """`deitlab teacher train`: a plain classifier trained on the data, then registered in MLflow."""

    name: str = Field(..., description="registered model name, e.g. digits-convnet")
    alias: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
                              description="registry alias moved to each new version (models:/NAME@ALIAS)")
    arch: str
    pretrained: bool = Field(False, description="fine-tune from timm's pretrained weights for arch: a new head for"
                                                " the data's classes, the first convolution adapted to its channels")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, name: str) -> str:
        return _known_model(name)

    _pretrained_weights_exist = model_validator(mode="after")(lambda self: _check_pretrained_arch(self))

    def flat_params(self) -> dict[str, Any]:
        return _flatten(self.model_dump(by_alias=True, mode="json"))


# ----------------------------------------------------------------------------------------------------------- sweep
TEACHER_KEY = "teacher"
SAMPLE_DIGITS = 4  # sampled values are rounded to 4 significant digits: readable names and params, exact replay


def _round(value: float) -> float:
    return float(f"{value:.{SAMPLE_DIGITS}g}")


class Distribution(_Strict):
    """One sampled key of a sweep's `space`: exactly one of choice / uniform / loguniform / randint.

    `when` makes the key conditional: it is only drawn for trials whose values match (a value or a list of values per
    key), e.g. `distillation.tau: {loguniform: [1, 10], when: {distillation.mode: soft}}`.
    """

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="integers low..high, both included")
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_distribution(self) -> Distribution:
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, randint"
                             + (f" (got {', '.join(given)})" if given else ""))
        bounds = self.uniform or self.loguniform or self.randint
        if bounds and not bounds[0] < bounds[1] + (self.randint is not None):
            raise ValueError(f"{given[0]}: low must be below high (got {list(bounds)})")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got {list(self.loguniform)})")
        return self

    def matches(self, values: dict[str, Any]) -> bool:
        for key, wanted in self.when.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if values.get(key) not in options:
                return False
        return True

    def draw(self, rng) -> Any:
        import math

        if self.choice is not None:
            return self.choice[rng.randrange(len(self.choice))]
        if self.randint is not None:
            return rng.randint(*self.randint)
        if self.uniform is not None:
            return _round(rng.uniform(*self.uniform))
        low, high = self.loguniform
        return _round(math.exp(rng.uniform(math.log(low), math.log(high))))


class EarlyStopping(_Strict):
    """ASHA: at epochs grace_period × reduction_factor^k, stop trials outside the best 1/reduction_factor."""

    grace_period: int = Field(1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(_Strict):
    """A base experiment, a grid over dotted keys and an optional sampled `space`. `teacher` picks from `teachers`.

    Meaningless combinations are collapsed: tau only matters for soft mode; mode none uses no teacher for training
    (the first teacher is kept as the reference that agreement is measured against), no tau and no lambda.
    Sampling (random search) happens here, in the planner, seeded per (search_seed, sample, grid point): every trial
    is known and validated before anything starts, and adding seeds, samples or grid points never changes the
    values already drawn — so `sweep extend` runs only what is new.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    experiment: ExperimentSpec
    teachers: dict[str, TeacherSpec] = Field(default_factory=dict)
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = Field(default_factory=dict)
    space: dict[str, Distribution] = Field(default_factory=dict, description="sampled keys (random search)")
    samples: int = Field(1, gt=0, description="draws of `space` per grid point")
    search_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metric: str = "acc"
    mode: Literal["max", "min"] = "max"
    early_stopping: EarlyStopping | None = None
    max_concurrent_trials: int | None = Field(None, gt=0, alias="max_concurrent")
    pack: int = Field(1, ge=1, le=64, description="train up to this many trials together when they share teacher,"
                                                  " data and batch schedule: one batch and one teacher forward per"
                                                  " step for all (1: every trial alone)")

    @model_validator(mode="before")
    @classmethod
    def _experiment_per_family(cls, raw: Any) -> Any:
        # Each sweep family (a sweep, its resumes and extensions) gets an MLflow experiment named after it, unless
        # the base experiment names one: the UI then compares one family's runs side by side.
        if isinstance(raw, dict) and isinstance(raw.get("experiment"), dict) and isinstance(raw.get("name"), str):
            run = raw["experiment"].get("run") or {}
            if isinstance(run, dict) and "experiment" not in run:
                raw = {**raw, "experiment": {**raw["experiment"], "run": {**run, "experiment": raw["name"]}}}
        return raw

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, grid):
        for sub in grid if isinstance(grid, list) else [grid]:
            for key, values in sub.items():
                if not values:
                    raise ValueError(f"grid key '{key}' has no values")
        return grid

    _known_metric = field_validator("metric")(_epoch_metric)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @property
    def subgrids(self) -> list[dict[str, list[Any]]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    @model_validator(mode="after")
    def _teachers_named(self) -> SweepSpec:
        named = [n for sub in self.subgrids for n in sub.get(TEACHER_KEY, [])]
        if TEACHER_KEY in self.space:
            named += self.space[TEACHER_KEY].choice or [None]
        for name in named:
            if name not in self.teachers:
                known = ", ".join(self.teachers) or "none defined"
                raise ValueError(f"teacher '{name}' is not in 'teachers' ({known})")
        return self

    @model_validator(mode="after")
    def _space_is_consistent(self) -> SweepSpec:
        for key, dist in self.space.items():
            if any(key in sub for sub in self.subgrids):
                raise ValueError(f"space key '{key}' is also in grid; give each key in one of them")
            if key == "run.seed":
                raise ValueError("seeds are given by 'seeds', not sampled")
            if key == TEACHER_KEY and dist.choice is None:
                raise ValueError("space key 'teacher' needs 'choice'")
            for cond in dist.when:
                if cond == key or (cond not in self.space and not any(cond in sub for sub in self.subgrids)
                                   and _lookup(self.experiment, cond) is _MISSING):
                    raise ValueError(f"space key '{key}': 'when' refers to '{cond}', which is neither a grid or space"
                                     " key nor a field of the experiment")
        return self

    def trial_overrides(self) -> list[dict[str, Any]]:
        """Expanded, sampled, collapsed and de-duplicated trial points, in a stable order; each includes run.seed."""
        points: list[dict[str, Any]] = []
        for sample in range(self.samples if self.space else 1):
            for sub in self.subgrids:
                keys = list(sub)
                for values in itertools.product(*(sub[k] for k in keys)):
                    point = self._collapse(self._sampled(dict(zip(keys, values)), sample))
                    for seed in self.seeds:
                        seeded = {**point, "run.seed": seed}
                        if seeded not in points:
                            points.append(seeded)
        return points

    def _sampled(self, point: dict[str, Any], sample: int) -> dict[str, Any]:
        """Draw the space's keys for one grid point, from an RNG seeded by (search_seed, sample, grid point)."""
        import json
        import random

        if not self.space:
            return point
        rng = random.Random(json.dumps([self.search_seed, sample, point], sort_keys=True, default=str))
        for key, dist in self.space.items():  # in spec order: a `when` may look at keys drawn before it
            value = dist.draw(rng)  # drawn even when unused, so one key's condition never shifts another's draws
            view = {**{k: _lookup(self.experiment, k) for k in dist.when}, **point}
            if dist.matches(view):
                point[key] = value
        return point

    def _collapse(self, point: dict[str, Any]) -> dict[str, Any]:
        # describe(): an unknown mode in the grid keeps its keys; its trial spec then says what is wrong
        mode = modes.describe(point.get("distillation.mode", self.experiment.distillation.mode))
        if not mode.uses_tau:
            point.pop("distillation.tau", None)
        if not mode.uses_lambda:
            point.pop("distillation.lambda", None)
        if not mode.needs_teacher and TEACHER_KEY in point:  # the reference teacher for agreement: the first listed
            point[TEACHER_KEY] = next(iter(self.teachers))
        return point

    def trial_spec(self, overrides: dict[str, Any]) -> ExperimentSpec:
        values = dict(overrides)
        teacher = values.pop(TEACHER_KEY, None)
        if teacher is not None:
            values[TEACHER_KEY] = {"name": teacher, **self.teachers[teacher].model_dump(by_alias=True, exclude_unset=True)}
        return self.experiment.with_overrides(values)

    def trial_specs(self) -> list[tuple[dict[str, Any], ExperimentSpec]]:
        return [(o, self.trial_spec(o)) for o in self.trial_overrides()]


_MISSING = object()


def _lookup(spec: BaseModel, key: str) -> Any:
    """The value of a dotted key in a spec (`distillation.mode`), or _MISSING."""
    node: Any = spec.model_dump(by_alias=True)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------- loading and errors
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree[a][b][c] = value for key 'a.b.c'; a dict key that itself contains dots (grid keys) matches whole."""
    node = tree
    parts = key.split(".")
    while parts:
        rest = ".".join(parts)
        if rest in node or len(parts) == 1:
            node[rest] = value
            return
        head = parts.pop(0)
        child = node.get(head)
        if child is None:
            child = node[head] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: '{head}' is a value, not a section")
        node = child


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars or lists (`tau=3`, `grid.teacher=[a,b]`, `token=false`)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set '{item}': expected KEY=VALUE, e.g. distillation.tau=3")
        try:
            overrides[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise SpecError(f"--set '{item}': value is not valid YAML ({_yaml_problem(err)})") from None
    return overrides


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union")))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    if "input" in err and err["type"] not in ("extra_forbidden", "missing", "value_error", "model_type"):
        shown = repr(err["input"])
        msg += f" (got {shown if len(shown) < 60 else shown[:57] + '...'})"
    return f"{loc}: {msg}" if loc else msg


def validate(model: type[_Strict], raw: Any, source: str = "spec"):
    """Validate `raw` into `model`, turning pydantic's report into one SpecError line."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw, context={"sweep_base": model is SweepSpec})
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise SpecError(f"{source}: {problems}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what, as a user reads it: `line 3, column 5: found character '\\t' …` (PyYAML's own text also
    names the "<unicode string>" it parsed and draws a caret on further lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or not problem:
        return _first_line(err)
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"{path}: a folder, not a spec file")
    if not p.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML at {_yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        raise SpecError(f"{path}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


# Top-level keys only one kind of spec has: a spec of another kind given to a command names the right command.
_KIND_KEYS = {"sweep": ("grid", "teachers", "space", "seeds", "experiment"), "teacher": ("arch",),
              "experiment": ("student", "teacher", "distillation", "init_from")}
_COMMANDS = {"sweep": "deitlab sweep run", "teacher": "deitlab teacher train", "experiment": "deitlab train"}


def _wrong_kind(model: type[_Strict], raw: dict[str, Any], path: str | Path) -> None:
    """A sweep given to `train` (or any kind to the wrong command) says so, instead of listing unknown fields."""
    wanted = {ExperimentSpec: "experiment", SweepSpec: "sweep", TeacherTrainingSpec: "teacher"}.get(model)
    article = {"experiment": "an", "sweep": "a", "teacher": "a"}
    for kind, keys in _KIND_KEYS.items():
        found = [k for k in keys if k in raw]
        if kind != wanted and found and not (model is SweepSpec and "experiment" in raw):
            raise SpecError(f"{path}: {article[kind]} {kind} spec (it has '{found[0]}'), not {article[wanted]}"
                            f" {wanted} spec; use `{_COMMANDS[kind]}` (or `deitlab check --kind {kind}`)")


def load(model: type[_Strict], path: str | Path, overrides: dict[str, Any] | None = None):
    raw = read_yaml(path)
    _wrong_kind(model, raw, path)
    if model is SweepSpec and isinstance(raw.get("experiment"), str):  # a sweep may point at an experiment file
        raw["experiment"] = read_yaml(Path(path).parent / raw["experiment"])
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return validate(model, raw, source=str(path))


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    return load(ExperimentSpec, path, overrides)


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    sweep = load(SweepSpec, path, overrides)
    try:
        sweep.trial_specs()  # every grid point must validate before anything starts
    except SpecError as err:
        raise SpecError(f"{path}: grid: {str(err).removeprefix('override: ')}") from None
    return sweep


def load_teacher_training(path: str | Path, overrides: dict[str, Any] | None = None) -> TeacherTrainingSpec:
    return load(TeacherTrainingSpec, path, overrides)
