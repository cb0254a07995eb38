"""Typed configuration: one pydantic tree, recipes as YAML files, overrides as dotted keys.

    cfg = load_config("demo", ["train.epochs=3", "model.backbone=resnet101"])

A recipe is a YAML file in ``components/recipes/`` (by name) or any YAML path; it only lists what
differs from the defaults below, which are the ``strong`` recipe's. Unknown keys and bad values raise
``ConfigError`` naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from components.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class SyntheticConfig(_Strict):
    """The generated dataset in the real Cityscapes layout (demo, tests, benchmarks)."""

    train: int = 24
    """Training frames to generate."""
    val: int = 8
    """Validation frames to generate."""
    height: int = 128
    """Frame height in pixels (width must be 2x, as in Cityscapes)."""
    width: int = 256
    """Frame width in pixels."""
    cities: int = 3
    """Cities per split (real Cityscapes city names)."""
    seed: int = 0
    """Generator seed: the same settings give byte-identical files."""

    @model_validator(mode="after")
    def _two_to_one(self) -> SyntheticConfig:
        if self.width != 2 * self.height:
            raise ValueError(
                f"synthetic frames are 2:1 like Cityscapes: width must be 2*height, got "
                f"{self.width}x{self.height}"
            )
        if self.train < 1 or self.val < 1 or self.cities < 1:
            raise ValueError("train, val and cities must be >= 1")
        return self


class DataConfig(_Strict):
    source: Literal["synthetic", "download", "local", "s3"] = "download"
    """Where the dataset comes from: synthetic (generated), download (cityscapes-dataset.com, needs
    CITYSCAPES_USERNAME/PASSWORD), local (data.uri in place) or s3 (data.uri mirror)."""
    uri: str | None = None
    """For source=local: the extracted dataset's path; for source=s3: ``s3://bucket/prefix`` mirror."""
    root: str = "data/cityscapes"
    """Where the prepared dataset (leftImg8bit/, gtFine/ with labelTrainIds) lives."""
    synthetic: SyntheticConfig = SyntheticConfig()
    trainid_workers: int | None = None
    """Processes for trainId generation; None = all cores, at most one per 64 annotations."""
    num_workers: int = 4
    """DataLoader workers per rank."""
    cache: bool = True
    """Decode each image once into a memory-mapped uint8 cache when the recipe's resize allows it."""

    @model_validator(mode="after")
    def _uri_for_source(self) -> DataConfig:
        if self.source in ("local", "s3") and not self.uri:
            raise ValueError(f"data.uri is required when data.source={self.source}")
        if self.source == "s3" and self.uri and not self.uri.startswith("s3://"):
            raise ValueError(f"data.uri must be s3://bucket/prefix for data.source=s3, got {self.uri!r}")
        return self


class AugmentConfig(_Strict):
    """Training-time augmentation (Albumentations). Validation never augments."""

    resize: tuple[int, int] | None = None
    """(height, width) every training image is resized to (the paper: 768x1024)."""
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    """Random rescale factor range, applied before cropping (the strong recipe)."""
    crop: tuple[int, int] | None = (512, 1024)
    """(height, width) random crop after scaling; padded with ignore where the image is smaller."""
    hflip: bool = True
    """Random horizontal flip (p=0.5)."""
    photometric: bool = True
    """Random brightness/contrast/colour jitter."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Normalisation mean (ImageNet), also written into the ONNX metadata."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalisation std (ImageNet)."""

    @field_validator("resize", "crop")
    @classmethod
    def _positive_size(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is not None and min(size) <= 0:
            raise ValueError(f"sizes are (height, width) > 0, got {size}")
        return size

    @field_validator("scale_range")
    @classmethod
    def _ordered_scale(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        if scale is not None and not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale}")
        return scale


class ModelConfig(_Strict):
    backbone: Literal["resnet50", "resnet101", "mobilenet_v3_large"] = "resnet50"
    """torchvision DeepLabv3 backbone."""
    weights: str = "DEFAULT"
    """DEFAULT (torchvision COCO-with-VOC-labels), none, or a checkpoint path / s3:// / models:/ URI."""
    num_classes: int = 19
    """Output classes (19 Cityscapes trainIds; 255 is ignored)."""
    aux_loss: bool = True
    """Build the auxiliary FCN head (its loss weight is train.aux_weight)."""

    @field_validator("num_classes")
    @classmethod
    def _enough_classes(cls, n: int) -> int:
        if not 2 <= n < 255:
            raise ValueError(f"num_classes must be in [2, 254], got {n}")
        return n


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer: sgd (strong), adam (the paper) or adamw."""
    lr: float = 0.02
    """Base learning rate (backbone); heads get lr x head_lr_mult."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """Weight decay (decoupled for adamw)."""
    head_lr_mult: float = 10.0
    """LR multiplier for the classifier heads (torchvision reference: 10x on the aux head)."""
    schedule: Literal["constant", "poly"] = "poly"
    """constant, or poly: lr x (1 - iter/total)^poly_power, stepped per iteration."""
    poly_power: float = 0.9
    """Exponent of the polynomial decay."""
    warmup_iters: int = 200
    """Linear warmup iterations before the schedule."""
    warmup_factor: float = 0.1
    """LR factor at the first warmup iteration."""
    fused: bool = True
    """Use torch's fused optimizer kernel (CUDA and CPU)."""

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, lr: float) -> float:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        return lr


class TrainConfig(_Strict):
    epochs: int = 20
    """Passes over the training split."""
    global_batch_size: int = 16
    """Images per optimizer step across all ranks; per-rank batch and accumulation derive from it."""
    micro_batch_size: int | None = None
    """Largest per-rank forward batch; None = global_batch_size / world_size (no accumulation)."""
    aux_weight: float = 0.4
    """Weight of the auxiliary FCN head's loss; 0 trains on ``out`` only (the paper)."""
    head_dropout: float | None = None
    """Dropout probability in the DeepLab heads while training; None keeps torchvision's (0.5 in ASPP,
    0.1 in the aux head). 0 makes a run independent of how the batch is split across ranks."""
    bn_momentum: float | None = None
    """BatchNorm running-statistics momentum while training; None keeps torchvision's (0.01 in the
    MobileNetV3 backbone, 0.1 elsewhere). From scratch and for few steps, 0.01 leaves the running
    statistics far from the weights' real ones, so evaluation (which uses them) lags far behind."""
    amp: Literal["auto", "bf16", "none"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter dtype. float64 (CPU, about 2x slower) shrinks rounding noise to ~1e-13, for checking
    numerics, e.g. that N ranks train like one process (tests/test_train_ddp.py)."""
    channels_last: bool = True
    """NHWC activations (CUDA, and CPU in float32: ~1.15x on a MobileNetV3 demo step; float64 has no
    NHWC kernels)."""
    compile: bool = False
    """torch.compile the model (CUDA; pays off on long runs)."""
    seed: int = 0
    """Seed for weights, sampling and augmentation."""
    deterministic: bool = True
    """Deterministic algorithms (bit-exact resume on CPU; off lets cuDNN autotune)."""
    output_dir: str = "runs/train"
    """Checkpoints go here (local directory or s3:// prefix); a rerun with the same one resumes."""
    log_every: int = 10
    """Log a training line every N optimizer steps."""
    val_every: int = 1
    """Validate (and keep best.pt) every N epochs."""
    collective_timeout_s: float = 600.0
    """Longest wait of a rank in a collective (gradient all-reduce, barrier) before it fails with
    CollectiveTimeout: a hung or stopped rank is detected, not waited on forever. It must exceed the
    longest work one rank does alone between collectives."""

    @field_validator("collective_timeout_s")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError(f"must be > 0, got {seconds}")
        return seconds

    @field_validator("epochs", "global_batch_size", "log_every", "val_every")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("head_dropout")
    @classmethod
    def _probability(cls, p: float | None) -> float | None:
        if p is not None and not 0 <= p < 1:
            raise ValueError(f"must be in [0, 1), got {p}")
        return p

    @field_validator("bn_momentum")
    @classmethod
    def _momentum(cls, momentum: float | None) -> float | None:
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(f"must be in (0, 1], got {momentum}")
        return momentum

    @model_validator(mode="after")
    def _micro_divides_global(self) -> TrainConfig:
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        return self


class EvaluateConfig(_Strict):
    resize: tuple[int, int] | None = None
    """None = the official protocol (logits upsampled to the label's full resolution). A size here
    makes a *resized* evaluation, labelled as such in every metric name."""
    batch_size: int = 1
    """Validation images per forward pass."""
    num_overlays: int = 4
    """Colour-coded prediction overlays written per evaluation."""
    baseline: Literal["paper-baseline", "zero-shot"] = "paper-baseline"
    """Baseline evaluated before fine-tuning: paper-baseline (fresh 19-class heads) or zero-shot (the VOC
    head mapped onto Cityscapes)."""


class TrackingConfig(_Strict):
    tracking_uri: str | None = None
    """None = $MLFLOW_TRACKING_URI, else a SQLite store in run_dir (browse with `mlflow ui`)."""
    experiment: str = "cityscapes-deeplabv3"
    """MLflow experiment for training, evaluation and registration runs."""
    artifact_location: str | None = None
    """Where a newly created experiment keeps its artifacts: ``s3://bucket/prefix`` for direct S3 mode
    (MLFLOW_S3_ENDPOINT_URL + AWS keys on the client). None = beside a local SQLite store, or the
    tracking server's default (proxied mode)."""
    system_metrics: bool = True
    """Log CPU/GPU utilisation to MLflow (psutil, pynvml)."""
    parent_run_id: str | None = None
    """Start runs as children of this MLflow run: the ``finetune`` flow sets it to its pipeline run for
    every stage, so one pipeline run is one parent with baseline, training and fine-tuned children."""


class ExportConfig(_Strict):
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    """torch.onnx's exporter. dynamo (falls back to torchscript if it fails) spends ~35 s per model on
    2 CPU cores resolving the dynamic N/H/W symbolically; torchscript (deprecated by torch) takes ~1 s.
    The parity gate checks either graph."""
    opset: int = 18
    """ONNX opset, recorded in the model's metadata."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where onnxruntime runs the fp32/fp16 parity gates, as predict would: auto (CUDA when a GPU is
    visible), cuda (fails naming what is missing) or cpu (e.g. when the GPU gate misses its bar). int8
    is always gated on the CPU, where it runs."""
    max_abs_diff: float = 1e-3
    """Parity gate: largest |ONNX - PyTorch| logit difference allowed (fp32)."""
    min_argmax_agreement: float = 0.999
    """Parity gate: smallest fraction of pixels whose argmax must agree."""
    parity_sizes: list[tuple[int, int]] = [(256, 512), (192, 384)]
    """Two (height, width) sizes the parity gate checks on real validation images."""
    parity_images: int = 2
    """Validation images the parity gate runs at each size."""
    fp16: bool = False
    """Also write an fp16 ONNX variant for GPU inference (``predict --precision fp16``), gated by the
    ``fp16_*`` bars on ``device``; the register step stores it as ``onnx/model.fp16.onnx``."""
    fp16_max_abs_diff: float = 5e-2
    """Parity bar for the fp16 variant (looser)."""
    fp16_min_argmax_agreement: float = 0.99
    """Argmax agreement bar for the fp16 variant."""
    int8: bool = False
    """Also write an int8 ONNX variant for CPU inference (``predict --precision int8``): static QDQ
    quantization of the convolutions (per-channel weights) by onnxruntime, calibrated on training images;
    the high-resolution convolutions (``int8_float_max_stride``), the classifier's last convolution and the
    upsampling stay float32. The register step stores it as ``onnx/model.int8.onnx``."""
    int8_min_argmax_agreement: float = 0.98
    """Argmax agreement bar for the int8 variant (its logits are judged by argmax only)."""
    int8_float_max_stride: int = 4
    """Convolutions whose output is at 1/N of the input's resolution or finer, N <= this, stay float32 in
    the int8 variant (0: quantize them all). On two trained demo models 4 lifts argmax agreement on the
    validation images from 0.974 and 0.981 to 0.989 and 0.985; CPU speed: no cost on MobileNetV3, ~9% on
    ResNet50 (bench/README.md, int8)."""
    calibration_images: int = 24
    """Training images the int8 calibration runs (at the first parity size), spread evenly over the split."""


class RegistryConfig(_Strict):
    model_name: str = "cityscapes-deeplabv3"
    """Registered model name in MLflow."""
    promotion_margin: float = 0.0
    """A challenger becomes champion only if its val mIoU beats the champion's by more than this."""
    create_bucket: bool = True
    """Create the S3 artifact bucket if missing (direct S3 mode)."""


StageName = Literal["prepare", "evaluate", "train", "export", "register"]


class MultiNodeConfig(_Strict):
    """Multi-node training on Kubernetes (``components/cluster/``: ``rules.py`` checks a job against this,
    ``manifests.py`` renders it, ``runner.py`` submits and follows it)."""

    enabled: bool = False
    """The training stage submits a multi-node Kubernetes job and follows it (``components/cluster/``)
    instead of running torchrun in the flow's own container."""
    image: str | None = None
    """The project image the job's pods run (the Kubernetes deployment passes ``$CITYSEG_IMAGE``, the image
    of the flow's own pod); required when ``enabled``."""
    s3_run_dir: str | None = None
    """``s3://`` stand-in for ``run_dir`` in multi-node jobs: a local ``train.output_dir`` under run_dir (the
    finetune flow's ``<run_dir>/flow-runs/<id>/train``) becomes ``<s3_run_dir>/flow-runs/<id>/train``, one
    checkpoint folder per flow run that every node reaches. None: train.output_dir must be s3:// itself
    (the rule is ``components/cluster/rules.py``'s)."""
    engine: Literal["indexed-job", "trainjob"] = "indexed-job"
    """indexed-job: a batch/v1 Indexed Job + headless Service (no operator needed); trainjob: a Kubeflow
    Trainer TrainJob (needs the operator and its ``torch-distributed`` runtime; data from the S3 mirror)."""
    nodes: int = 2
    """Pods (nodes) to start; each runs one torchrun agent with all its GPUs."""
    min_nodes: int | None = None
    """Fewest nodes the job keeps training with (torchrun ``--nnodes MIN:MAX``); None = nodes."""
    gpus_per_node: int = 8
    """``nvidia.com/gpu`` limit per pod and torchrun ``--nproc-per-node``."""
    max_restarts: int = 3
    """torchrun ``--max-restarts``: how often the agents re-form the group after a lost rank or node."""
    rdzv_port: int = 29400
    """c10d rendezvous port on pod 0, reached through the headless Service."""
    namespace: str = "cityseg"
    service_account: str = "cityseg-runner"
    credentials_secret: str = "cityseg-credentials"
    """Kubernetes Secret whose keys become environment variables (AWS_ACCESS_KEY_ID...): manifests name
    it, never carry its values."""
    data_claim: str | None = "cityseg-data"
    """ReadOnlyMany/ReadWriteMany PVC with the prepared dataset at data.root; None = data.source=s3 mirror."""
    shm_size: str = "16Gi"
    """In-memory /dev/shm for DataLoader workers."""
    cpu: str = "32"
    memory: str = "256Gi"
    active_deadline_seconds: int = 24 * 3600
    """The job is stopped after this long, hung or not."""
    ttl_seconds_after_finished: int = 3600
    """Finished jobs (their pods and Service with them) are deleted after this long, should the flow that
    submitted them not have deleted them."""

    @model_validator(mode="after")
    def _node_range(self) -> MultiNodeConfig:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("nodes and gpus_per_node must be >= 1")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ValueError(f"min_nodes must be in [1, nodes={self.nodes}], got {self.min_nodes}")
        if self.s3_run_dir is not None and not self.s3_run_dir.startswith("s3://"):
            raise ValueError(f"s3_run_dir must be s3://bucket/prefix, got {self.s3_run_dir!r}")
        return self


class OrchestrationConfig(_Strict):
    """How the Prefect flows run the stages (``flows/``); components never read this section, except the
    multi-node job's rules, renderer and runner (``components/cluster/``)."""

    stage_deployments: dict[StageName, str] = {}
    """Stage -> ``flow-name/deployment-name`` (e.g. ``prepare: prepare-data/cityscapes-cpu``) to run that
    stage in its own container on its own work pool via ``run_deployment``; stages without an entry
    run in-process as subflows."""
    stage_timeout_s: float | None = None
    """Longest wait for a stage deployment's flow run; None = no limit."""
    retries: int = 3
    """Retries of the network-bound stages (data download/S3, evaluation and registration in MLflow)."""
    retry_delay_seconds: list[float] = [10.0, 60.0, 180.0]
    """Back-off between those retries (the last value repeats)."""
    multinode: MultiNodeConfig = MultiNodeConfig()
    """Multi-node training jobs on Kubernetes."""
    mlflow_ui_url: str | None = None
    """Base URL for the MLflow links in the flow's artifacts; None = the tracking URI when it is http(s),
    else ``http://127.0.0.1:5000`` (``mlflow ui``'s default)."""

    @field_validator("retries")
    @classmethod
    def _non_negative(cls, retries: int) -> int:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        return retries


class Config(_Strict):
    recipe: str = "strong"
    """Name of the recipe this config came from (paper, strong, demo or a YAML stem)."""
    run_dir: str = "runs"
    """Local folder for run state: the default MLflow store, evaluation reports, exports."""
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI: config, then $MLFLOW_TRACKING_URI, then a SQLite file in run_dir."""
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.run_dir).resolve() / 'mlflow.db'}"

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def available_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def load_config(recipe: str | Path = "strong", overrides: Iterable[str] = ()) -> Config:
    """Build a Config from a recipe name or YAML path plus ``key.sub=value`` overrides."""
    tree = _read_recipe(recipe)
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Validate a plain dict (a recipe, a checkpoint's saved config) into a Config."""
    try:
        return Config.model_validate(dict(tree))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _read_recipe(recipe: str | Path) -> dict[str, Any]:
    path = Path(recipe)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown recipe {str(recipe)!r}: choose one of {available_recipes()} "
                "or pass the path of a YAML file"
            )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(tree).__name__}")
    tree.setdefault("recipe", path.stem)
    return tree


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted_key}: {part} is not a section")
        node = child
    node[leaf] = value


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown key (check spelling; see docs/configuration.md)")
        else:
            problems.append(f"{field}: {error['msg']} (got {error.get('input')!r})")
    return "invalid configuration: " + "; ".join(problems)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md): every field with its default and meaning."""
    header = ["| key | default | meaning |", "|---|---|---|"]
    return "\n".join(header + _reference_rows("", Config, Config().model_dump(mode="json"))) + "\n"


def _reference_rows(prefix: str, section: type[BaseModel], defaults: dict[str, Any]) -> list[str]:
    rows = []
    for name, field in section.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            rows.extend(_reference_rows(f"{prefix}{name}.", field.annotation, defaults[name]))
            continue
        meaning = " ".join((field.description or "").replace("|", "\\|").split())
        shown = yaml.safe_dump(defaults[name], default_flow_style=True, width=10**6).removesuffix("...\n")
        rows.append(f"| `{prefix}{name}` | `{shown.strip()}` | {meaning} |")
    return rows


if __name__ == "__main__":
    print(reference_markdown(), end="")
