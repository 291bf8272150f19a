"""Run specs: YAML loaded strictly into frozen dataclasses.

An unknown or misspelled key, a value of the wrong type, or an impossible value is a ``ConfigError`` that
names the key, the file and what is allowed. ``--set section.key=value`` overrides are applied to the raw
YAML before validation, so they get the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hpcq.errors import ConfigError
from hpcq.fileio import atomic_write_text

QUICKSTART_FACTORY = "hpcq.zoo:fashion_vgg"
NO_LABELS = "none"


@dataclass(frozen=True)
class ModelConfig:
    """Which trained model to compress.

    ``kind: quickstart`` trains (once, then caches) the Fashion-MNIST teacher; ``torchvision`` loads
    ``name`` with ``weights``; ``factory`` calls ``factory`` (``pkg.module:function``) with ``kwargs`` and
    loads ``checkpoint``; ``artifact`` loads a compressed ``path``.
    """

    kind: Literal["quickstart", "torchvision", "factory", "artifact"] = "quickstart"
    name: str | None = None
    weights: str | None = None
    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None
    path: str | None = None
    input_shape: tuple[int, ...] = (1, 28, 28)

    def __post_init__(self) -> None:
        needed = {"torchvision": "name", "factory": "factory", "artifact": "path"}.get(self.kind)
        if needed and not getattr(self, needed):
            raise ConfigError(f"model.{needed} is required when model.kind is {self.kind!r}")
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"model.input_shape must be positive sizes like [3, 224, 224], got {self.input_shape}")


@dataclass(frozen=True)
class TeacherConfig:
    """Training of the quickstart teacher on Fashion-MNIST (done once, then cached)."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.003
    validation_size: int = 5000
    cache_dir: str = "~/.cache/hpcq"
    min_test_accuracy_pct: float = 91.0

    def __post_init__(self) -> None:
        _positive(self, "teacher", "epochs", "batch_size", "lr")
        if not 0 <= self.validation_size < 60000:
            raise ConfigError("teacher.validation_size must be in [0, 60000) (Fashion-MNIST has 60,000 training images)")


@dataclass(frozen=True)
class DataConfig:
    """Datasets: the labelled one the model was trained for, and the different, unlabelled one.

    ``labelled: none`` runs without any label: the sweep and the selection use fidelity to the teacher,
    and the report has no accuracy. ``labelled: imagefolder`` evaluates on folders with one subfolder per
    class (e.g. ImageNet): ``labelled_validation`` for the sweep and the selection, ``labelled_test`` for
    the report only.
    """

    labelled: Literal["fashion-mnist", "imagefolder", "none"] = "fashion-mnist"
    labelled_validation: str = ""
    labelled_test: str = ""
    labelled_resize: int = 0
    eval_workers: int = 2
    fashion_mnist_root: str = "/usr/share/datasets/fashion-mnist"
    unlabelled: str = "/usr/share/openclipart/png"
    shard_dir: str | None = None
    shard_size: int = 500
    image_size: int = 28
    channels: Literal[1, 3] = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        _positive(self, "data", "shard_size", "image_size", "eval_batch_size")
        if len(self.mean) not in (1, self.channels) or len(self.std) != len(self.mean):
            raise ConfigError(f"data.mean and data.std need 1 or {self.channels} values each")
        if any(s <= 0 for s in self.std):
            raise ConfigError("data.std values must be > 0")
        if self.labelled_resize and self.labelled_resize < self.image_size:
            raise ConfigError(
                f"data.labelled_resize ({self.labelled_resize}) must be 0 or at least data.image_size "
                f"({self.image_size}): images are resized to it, then the central image_size crop is taken"
            )
        if self.eval_workers < 0:
            raise ConfigError(f"data.eval_workers must be >= 0, got {self.eval_workers}")
        if self.labelled == "imagefolder" and not (self.labelled_validation and self.labelled_test):
            raise ConfigError(
                "data.labelled imagefolder needs data.labelled_validation (for the sweep and the selection) and "
                "data.labelled_test (for the report), each a folder with one subfolder per class"
            )


@dataclass(frozen=True)
class KMeansConfig:
    """How codebooks are fitted. ``exact``: optimal 1-D k-means on a fine histogram; ``faiss``: FAISS."""

    method: Literal["exact", "faiss"] = "exact"
    bins: int = 0
    niter: int = 25
    max_points_per_centroid: int = 0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _positive(self, "kmeans", "niter")
        if self.bins < 0 or self.max_points_per_centroid < 0:
            raise ConfigError("kmeans.bins and kmeans.max_points_per_centroid must be >= 0 (0 means automatic / all)")


@dataclass(frozen=True)
class QuantizeConfig:
    """The plan: layer selector -> number of centroids, for weights and for biases.

    Selectors are as in ``hpcq layers``: ``14-15``, ``13-49``, names, globs, ``conv``, ``fc``, or ``all``.
    Later entries override earlier ones. The paper's VGG-16 plan is ``weights: {"14-15": 32}`` with
    ``biases: {all: 1}``.
    """

    weights: dict = field(default_factory=lambda: {"fc": 32})
    biases: dict = field(default_factory=lambda: {"all": 1})

    def __post_init__(self) -> None:
        for section in ("weights", "biases"):
            for selector, k in getattr(self, section).items():
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise ConfigError(
                        f"quantize.{section}[{selector!r}] must be a number of centroids >= 1, got {k!r}"
                    )


@dataclass(frozen=True)
class SweepConfig:
    """The per-layer sweep: each selected layer quantized alone at each k, one scheduler task per pair."""

    layers: str = "all"
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    executor: Literal["debug", "local", "slurm", "pbs", "sge"] = "local"
    max_parallel: int = 2
    timeout_min: int = 30
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    eval_images: int = 5000
    fidelity_images: int = 1000
    slurm_partition: str = ""
    slurm_account: str = ""
    gpus_per_task: int = 0
    qsub_queue: str = ""
    qsub_project: str = ""
    qsub_resources: str = ""

    def __post_init__(self) -> None:
        _positive(self, "sweep", "max_parallel", "timeout_min", "cpus_per_task", "mem_gb", "eval_images",
                  "fidelity_images")
        if self.gpus_per_task < 0:
            raise ConfigError(f"sweep.gpus_per_task must be >= 0, got {self.gpus_per_task}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"sweep.ks must be numbers of centroids >= 1, got {list(self.ks)}")


@dataclass(frozen=True)
class SelectConfig:
    """How per-layer k is chosen from the sweep.

    ``plan: auto`` picks the smallest model whose predicted accuracy drop stays within
    ``max_accuracy_drop`` points (or whose fidelity stays above ``min_agreement_pct`` when there are no
    labels), then verifies the combined plan and backs off while it breaks the budget. ``plan: spec`` uses
    the ``quantize`` section as written (e.g. the paper's hand-picked plans).
    """

    plan: Literal["auto", "spec"] = "auto"
    metric: Literal["accuracy", "fidelity"] = "accuracy"
    max_accuracy_drop: float = 0.5
    min_agreement_pct: float = 99.0
    max_backoff_steps: int = 20

    def __post_init__(self) -> None:
        if self.max_accuracy_drop < 0:
            raise ConfigError("select.max_accuracy_drop must be >= 0 (points of top-1)")
        if not 0 < self.min_agreement_pct <= 100:
            raise ConfigError("select.min_agreement_pct must be in (0, 100]")


@dataclass(frozen=True)
class RetrainConfig:
    """Retraining after quantization: label-free distillation (and the labelled baseline).

    Only non-quantized parameters train (the paper's choice); ``train_codebooks`` also fine-tunes the
    centroids of quantized layers (their indices stay fixed).
    """

    loss: Literal["kl", "mse"] = "kl"
    temperature: float = 2.0
    epochs: int = 2
    batches_per_epoch: int = 100
    batch_size: int = 128
    lr: float = 0.0005
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    train_codebooks: bool = False
    num_workers: int = 1
    shuffle_buffer: int = 1000
    augment: bool = True
    checkpoint_every_steps: int = 50
    nproc_per_node: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    labelled_baseline: bool = True

    def __post_init__(self) -> None:
        _positive(self, "retrain", "temperature", "epochs", "batches_per_epoch", "batch_size", "lr",
                  "checkpoint_every_steps", "nproc_per_node")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.weight_decay < 0:
            raise ConfigError("retrain.num_workers, shuffle_buffer and weight_decay must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: where it writes, its seed, and one section per stage."""

    run_dir: str = "runs/quickstart"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def __post_init__(self) -> None:
        if self.data.labelled == NO_LABELS:
            if self.select.metric == "accuracy":
                raise ConfigError("data.labelled is none, so select.metric must be fidelity (no labels to measure "
                                  "accuracy with): --set select.metric=fidelity")
            if self.retrain.labelled_baseline:
                raise ConfigError("data.labelled is none: the labelled baseline cannot run; set "
                                  "retrain.labelled_baseline: false")
            if self.model.kind == "quickstart":
                raise ConfigError("the quickstart model is trained on Fashion-MNIST: keep data.labelled: fashion-mnist")
        elif self.data.labelled == "imagefolder":
            if self.retrain.labelled_baseline:
                raise ConfigError("the labelled retraining baseline needs data.labelled fashion-mnist for now; with "
                                  "an image folder set retrain.labelled_baseline: false")
            if self.model.kind == "quickstart":
                raise ConfigError("the quickstart model is trained on Fashion-MNIST: keep data.labelled: fashion-mnist")
        elif self.select.metric == "accuracy" and self.teacher.validation_size == 0:
            raise ConfigError("select.metric accuracy needs a validation split: teacher.validation_size must be > 0 "
                              "(the test set is never used for choices)")
        elif self.data.labelled == "fashion-mnist" and (self.data.image_size, self.data.channels) != (28, 1):
            raise ConfigError(
                f"data.labelled fashion-mnist has 28x28 gray images, but data.image_size is {self.data.image_size} "
                f"and data.channels {self.data.channels}; for a model of other inputs (e.g. ImageNet) without a "
                "labelled set here, set data.labelled: none and select.metric: fidelity"
            )


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation, converting lists to tuples where declared."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is Any:
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    raise ConfigError(f"{where}: unsupported type {_type_name(annotation)}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the spec'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {path!r}.{hint} Valid keys{' of ' + where if where else ''}: {', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(str(exc)) from None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw spec dict (value parsed as YAML)."""
    key_path, sep, text = assignment.partition("=")
    if not sep or not key_path.strip():
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    keys = key_path.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run spec from YAML (or the built-in defaults when ``path`` is None) and apply overrides."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run spec {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"run spec {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"run spec {path} must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return from_dict(RunConfig, raw)
    except ConfigError as exc:
        where = f"{path}" if path is not None else "the built-in defaults"
        if overrides:
            where += f" with overrides {overrides}"
        raise ConfigError(f"{where}: {exc}") from None


def config_to_dict(config: Any) -> dict:
    """A plain dict (lists for tuples) of a config dataclass, for YAML and JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def write_resolved_config(config: RunConfig, folder: Path) -> Path:
    """Write the resolved config as ``config.yaml`` in ``folder`` (atomically) and return its path."""
    target = Path(folder) / "config.yaml"
    atomic_write_text(target, yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return target
