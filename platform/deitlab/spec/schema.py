"""Typed experiment and sweep specs: YAML in, validated pydantic objects out.

One `ExperimentSpec` describes one distillation run (student, teacher, distillation, data, optimisation, run).
A `SweepSpec` is a base experiment plus a grid over dotted keys; it expands into validated trial specs before anything
starts, so a bad value anywhere in the grid fails at load time. Every problem is raised as `SpecError` with one line
that names the field and the reason; the CLI prints that line and exits 2.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from deitlab.core import modes
from deitlab.errors import SpecError
from deitlab.spec.base import StrictSpec, absolute_path, flatten, set_dotted, validate


@functools.lru_cache(maxsize=1)
def _timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


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
class StudentSpec(StrictSpec):
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
        plain = name.replace("distilled", "")
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


class TeacherSpec(StrictSpec):
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
        return absolute_path(path)

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
class DistillationSpec(StrictSpec):
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
class AugmentSpec(StrictSpec):
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


class DataSpec(StrictSpec):
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
        return absolute_path(path)

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
        from deitlab.data.shards import check_pack_uri

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
            from deitlab.data.gpu_augment import parse_rand_augment

            parse_rand_augment(self.augment.auto_augment)
        return self


# ---------------------------------------------------------------------------------------------------- optimisation
class OptimSpec(StrictSpec):
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


def epoch_metric(name: str) -> str:
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


def _storage_uri(uri: str | None, field_name: str) -> str | None:
    """A storage location (a local folder or s3://…) as logged in params: no credentials, local paths absolute."""
    if uri and any(k in uri.lower() for k in ("access_key", "secret_key", "session_token", "@")):
        raise ValueError(f"credentials do not belong in {field_name}; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                         " (or a profile) in the environment")
    return absolute_path(uri.removeprefix("file://")) if uri else uri


class TeacherCacheSpec(StrictSpec):
    """The teacher-logit cache (core/teacher_cache.py): a teacher's logits on every batch, written by the first run
    and read by every later run, pack, retry, resume and extension whose batches are the same."""

    enabled: bool = Field(True, description="write and read cached teacher logits")
    storage: str | None = Field(None, description="where the cache lives (STORAGE/teacher_cache/KEY): a local folder"
                                                  " or s3://bucket/prefix; default run.storage")
    logits: Literal["auto", "full", "topk"] = Field(
        "auto", description="full fp32 logits (a cached run equals a live one exactly), the top-k of each row (the"
                            " rest of the probability spread evenly), or auto: full up to 100 classes")
    topk: int = Field(10, ge=1, description="logits kept per image in the top-k layout")
    verify: bool = Field(True, description="check each cached pass against the teacher on its first batch")

    @field_validator("storage")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        return _storage_uri(uri, "run.teacher_cache.storage")


class RunSpec(StrictSpec):
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
    teacher_cache: TeacherCacheSpec = Field(default_factory=TeacherCacheSpec)

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
        return absolute_path(path)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_in_tracking_uri(cls, uri: str | None) -> str | None:
        return check_tracking_uri(uri) if uri else uri

    @field_validator("storage")
    @classmethod
    def _no_credentials_in_storage(cls, uri: str | None) -> str | None:
        # run.storage is logged as an MLflow param: credentials belong in the environment (AWS_* variables, profiles).
        return _storage_uri(uri, "run.storage")

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
        return uri if "://" in uri and not uri.startswith("file://") else Path(absolute_path(uri.removeprefix("file://"))).as_uri()

    _known_metric = field_validator("checkpoint_metric")(epoch_metric)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    @property
    def resolved_storage(self) -> str:
        return self.storage or str(self.workdir_path / "ray_results")

    @property
    def cache_storage(self) -> str:
        """Where the teacher-logit cache lives (its teacher_cache/ folder is under it)."""
        return self.teacher_cache.storage or self.resolved_storage


# ------------------------------------------------------------------------------------------------------ experiment
class ExperimentSpec(StrictSpec):
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
        path = absolute_path(source)
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
            set_dotted(raw, key, value)
        return validate(ExperimentSpec, raw, source="override")

    def flat_params(self) -> dict[str, Any]:
        """Flattened, effective parameters for tracking (defaults included, derived values resolved). A setting the
        mode does not use is left out, so that MLflow's searches and charts do not count it: τ outside modes that use
        a temperature, λ, the token and the teacher for `none` (whose teacher, if any, only measures agreement: it is
        logged as reference_teacher), the fusion and evaluation head of a student without the token."""
        distill, mode = self.distillation, self.distillation.spec_mode
        flat = flatten(self.model_dump(by_alias=True, mode="json"))
        flat["distillation.lambda"] = distill.weight
        flat["distillation.token"] = distill.uses_token
        flat["student.timm_name"] = self.student.timm_name(distill.uses_token)
        flat["teacher"] = self.teacher.label if self.teacher else "none"
        unused = set()
        if not mode.uses_tau:
            unused |= {"distillation.tau", "distillation.soft_normalization"}
        if not distill.uses_token:
            unused |= {"distillation.fusion", "distillation.eval_head"}
        if not mode.needs_teacher:
            unused |= {"distillation.lambda", "distillation.token", "teacher"}
            flat = {(f"reference_{k}" if k.startswith("teacher.") else k): v for k, v in flat.items()}
            if self.teacher:
                flat["reference_teacher"] = self.teacher.label
        return {k: v for k, v in flat.items() if k not in unused}


class TeacherTrainingSpec(StrictSpec):
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
        return flatten(self.model_dump(by_alias=True, mode="json"))
