"""params.yaml as one frozen, typed `Params` object: a dataclass per section, validated on load.

Every stage calls `load_params` first, so a typo, a wrong type, an out-of-range value or
a combination that cannot run fails before any work starts, with an error that names the
key, the bad value and what is allowed. The sections travel as they are (to Ray workers
too): `train.lr` goes from params.yaml to the optimizer through typed objects only.
"""

from __future__ import annotations

import dataclasses
import posixpath
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.rules import check_switches, crop_range
from pipeline import yamlfile
from pipeline.data.ilsvrc import MAX_TRAIN_PER_CLASS, MAX_VAL_PER_CLASS, NUM_SYNSETS
from pipeline.params_fields import EMPTY_OK, ParamsError, Section, in_range, parse_section

PARAMS_FILE = Path("params.yaml")


# The data paths dvc.yaml declares as outputs (written by the stages, cached by DVC).
DVC_OUTPUTS = tuple("sample shards stats model train_metrics eval_metrics shard_metrics plots".split())


@dataclass(frozen=True)
class DataParams(Section):
    """Where every file of the pipeline lives (paths are defined here and nowhere else).

    `raw` may be a local path or a pyarrow.fs URI (s3://, gs://) so a cluster can read
    ImageNet from object storage, as a tree, the official archives or Kaggle's zip. It
    equals `sample` by default; pointing it at a real ImageNet leaves the sample stage
    writing only its own folder.
    """

    SECTION = "data"

    sample: str = "data/sample"  # where the sample stage writes the embedded sample
    raw: str = "data/sample"  # the ILSVRC-2012 tree or archives the shard stage reads
    shards: str = "data/shards"  # the shard output: meta.json, quarantine.csv, the shards unless shard_store
    # Where the shard files go instead, e.g. s3://bucket/prefix ("": inside `shards`).
    shard_store: str = field(default="", metadata=EMPTY_OK)
    stats: str = "data/stats.json"
    format: Literal["parquet", "webdataset"] = "parquet"  # the shard format training reads
    checkpoints: str = "artifacts/checkpoints"  # Ray Train RunConfig.storage_path
    model: str = "artifacts/model"
    train_metrics: str = "metrics/train.json"
    eval_metrics: str = "metrics/eval.json"
    shard_metrics: str = "metrics/shard.json"
    plots: str = "plots"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in DVC_OUTPUTS:
            if "://" in (value := getattr(self, name)):
                raise ParamsError(
                    f"data.{name}={value!r}: expected a local path: it is a DVC output and DVC 3 has no "
                    "external outputs; data.raw, data.shard_store and data.checkpoints may be URIs, "
                    "and the model reaches S3 through MLflow's artifact store (--artifacts-destination)"
                )
        # Stages replace their outputs whole (storage.publish_dir): shards written over the
        # raw tree, or one output inside another, would delete data. raw == sample is the
        # default (the shard stage reads the sample stage's output).
        fields = [f.name for f in dataclasses.fields(self) if f.name != "format"]
        paths = [(name, getattr(self, name)) for name in fields if getattr(self, name)]
        for i, (a, pa) in enumerate(paths):
            for b, pb in paths[i + 1 :]:
                if {a, b} != {"sample", "raw"} and _overlap(pa, pb):
                    raise ParamsError(
                        f"data.{b}={pb!r}: overlaps data.{a}={pa!r}; expected separate paths, neither "
                        "inside the other (a stage replaces its output whole)"
                    )


def _overlap(a: str, b: str) -> bool:
    """Whether paths or URIs `a` and `b` are equal or one lies inside the other."""
    a, b = (posixpath.normpath(p) + "/" for p in (a, b))
    return a.startswith(b) or b.startswith(a)


@dataclass(frozen=True)
class SampleParams(Section):
    """The embedded ILSVRC-2012-shaped sample generator."""

    SECTION = "sample"

    num_classes: int = field(default=10, metadata=in_range(2, NUM_SYNSETS))
    train_per_class: int = field(default=300, metadata=in_range(2, MAX_TRAIN_PER_CLASS))
    val_per_class: int = field(default=50, metadata=in_range(1, MAX_VAL_PER_CLASS))
    seed: int = field(default=0, metadata=in_range(0))
    # tree: train/ and val/ folders; archives: the official tars; kaggle_zip: Kaggle's zip;
    # cifar10: 32-px images in CIFAR-10's python batches (the paper's Figure 1 without CIFAR-10)
    layout: Literal["tree", "archives", "kaggle_zip", "cifar10"] = "tree"


@dataclass(frozen=True)
class ShardParams(Section):
    """Resizing and sharding (paper: shorter side 256, centre crop 256x256)."""

    SECTION = "shard"

    source: Literal["imagenet", "cifar10"] = "imagenet"
    size: int = field(default=256, metadata=in_range(32, 1024))
    quality: int = field(default=90, metadata=in_range(1, 100))
    format: Literal["parquet", "webdataset", "both"] = "both"
    shard_size: int = field(default=1000, metadata=in_range(1))
    seed: int = field(default=0, metadata=in_range(0))
    max_bad_fraction: float = field(default=0.001, metadata=in_range(0.0, 1.0))


@dataclass(frozen=True)
class StatsParams(Section):
    """Training-set statistics (mean, std, RGB covariance eigenpairs for PCA lighting)."""

    SECTION = "stats"

    max_shards: int = field(default=0, metadata=in_range(0))  # 0: every train shard (they are class-mixed)


@dataclass(frozen=True)
class ModelParams(Section):
    """Network choice and the paper's ablation switches (see models/)."""

    SECTION = "model"

    arch: Literal["paper", "torchvision", "cifar"] = "paper"
    activation: Literal["relu", "tanh"] = "relu"
    pooling: Literal["overlap", "nonoverlap"] = "overlap"
    lrn: bool = True
    groups: int = field(default=2, metadata={"choices": (1, 2)})
    dropout: float = field(default=0.5, metadata=in_range(0.0, 0.99))
    width: float = field(default=1.0, metadata=in_range(0.0, 4.0, lo_open=True))
    init: Literal["paper", "kaiming"] = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        # The architecture's own rules (models/) are the one home of what combines.

        try:
            check_switches(**dataclasses.asdict(self))
        except ValueError as e:
            raise ParamsError(str(e)) from None


@dataclass(frozen=True)
class TrainParams(Section):
    """The paper's SGD-momentum recipe and the Ray Train scaling/fault-tolerance knobs."""

    SECTION = "train"

    epochs: int = field(default=90, metadata=in_range(1))
    batch_size: int = field(default=128, metadata=in_range(1))  # global, split over workers
    lr: float = field(default=0.01, metadata=in_range(0.0, 10.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=in_range(0.0, 0.999))
    weight_decay: float = field(default=0.0005, metadata=in_range(0.0, 1.0))
    schedule: Literal["plateau", "step"] = "plateau"
    warmup_epochs: int = field(default=0, metadata=in_range(0))  # linear lr warmup, per step (schedules.py)
    patience: int = field(default=2, metadata=in_range(0))
    max_reductions: int = field(default=3, metadata=in_range(0))
    step_size: int = field(default=30, metadata=in_range(1))
    crop: int = field(default=227, metadata=in_range(16, 1024))
    pca_std: float = field(default=0.1, metadata=in_range(0.0, 10.0))
    seed: int = field(default=0, metadata=in_range(0))
    num_workers: int = field(default=1, metadata=in_range(1))
    use_gpu: bool = False
    # Fractions let several workers share a core (Ray accepts fractional CPU requests).
    cpus_per_worker: float = field(default=1.0, metadata=in_range(0.0, 64.0, lo_open=True))
    placement: Literal["spread", "pack"] = "spread"  # workers over as many nodes as possible, or few
    augment_threads: int = field(default=2, metadata=in_range(1))
    max_failures: int = field(default=2, metadata=in_range(-1))
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    gpu_augment: bool = False
    run_name: str = "alexnet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gpu_augment and not self.use_gpu:
            raise ParamsError("train.gpu_augment=True: expected false unless train.use_gpu is true")
        if self.batch_size % self.num_workers:
            raise ParamsError(
                f"train.batch_size={self.batch_size}: expected a multiple of train.num_workers="
                f"{self.num_workers} (the global batch is split evenly over the workers)"
            )


@dataclass(frozen=True)
class DivergenceParams(Section):
    """When a training run counts as diverged: it stops early, is tagged `diverged` in
    MLflow and is never registered (pipeline/train/divergence.py).

    A loss that is not finite always counts. From epoch `after_epochs` on (0: never), so
    does an epoch whose train loss is still within `chance_margin` (a fraction) of ln C,
    the loss of a network that predicts the uniform distribution over its C classes.
    """

    SECTION = "divergence"

    after_epochs: int = field(default=5, metadata=in_range(0))
    chance_margin: float = field(default=0.02, metadata=in_range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class EvaluateParams(Section):
    """Validation: centre crop and the paper's 10-crop."""

    SECTION = "evaluate"

    batch_size: int = field(default=128, metadata=in_range(1))
    ten_crop: bool = True


@dataclass(frozen=True)
class MlflowParams(Section):
    """Experiment tracking. The tracking URI itself comes from MLFLOW_TRACKING_URI or
    defaults to the local SQLite store; it never lives in params (it may hold secrets)."""

    SECTION = "mlflow"

    experiment: str = "alexnet"
    registered_model: str = "alexnet"
    system_metrics: bool = True


@dataclass(frozen=True)
class Params:
    """Every section of a params file, validated alone and together."""

    data: DataParams
    sample: SampleParams
    shard: ShardParams
    stats: StatsParams
    model: ModelParams
    train: TrainParams
    divergence: DivergenceParams
    evaluate: EvaluateParams
    mlflow: MlflowParams

    def __post_init__(self) -> None:
        crop, (lo, hi) = self.train.crop, crop_range(self.model.arch, self.model.pooling)
        if not lo <= crop <= hi:
            allowed = f"{lo}" if lo == hi else f">= {lo}"
            raise ParamsError(
                f"train.crop={crop}: expected {allowed} for model.arch={self.model.arch!r} with "
                f"model.pooling={self.model.pooling!r} (the smallest input its convolutions and "
                "poolings take)"
            )
        if crop > self.shard.size:
            raise ParamsError(f"train.crop={crop}: expected <= shard.size={self.shard.size}")
        if self.shard.format not in ("both", self.data.format):
            raise ParamsError(
                f"data.format={self.data.format!r}: expected a format the shard stage writes "
                f"(shard.format={self.shard.format!r})"
            )
        self._check_sample_source()

    def _check_sample_source(self) -> None:
        """The shard stage must read the generated sample in the format it was written in."""
        if posixpath.normpath(self.data.raw) != posixpath.normpath(self.data.sample):
            return
        expected = "cifar10" if self.sample.layout == "cifar10" else "imagenet"
        if self.shard.source != expected:
            raise ParamsError(
                f"shard.source={self.shard.source!r}: expected {expected!r} for sample.layout="
                f"{self.sample.layout!r} (data.raw is the generated sample, data.sample)"
            )

    def flat(self) -> dict[str, Any]:
        """{"train.lr": 0.01, ...}: every param under its dotted key, for experiment tracking."""
        return {
            f"{f.name}.{k}": v
            for f in dataclasses.fields(self)
            for k, v in dataclasses.asdict(getattr(self, f.name)).items()
        }


SECTIONS: dict[str, type] = typing.get_type_hints(Params)  # section name -> its dataclass, in order


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Reads and validates every section of a params file.

    Args:
        path: The YAML file.

    Returns:
        The frozen, validated params; a missing section takes its defaults.

    Raises:
        ParamsError: On a missing file, an unknown section, any bad value, or a
            combination of values that cannot run.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yamlfile.load(path) or {}
    except ValueError as e:
        raise ParamsError(str(e)) from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        raise ParamsError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    return Params(**{name: parse_section(name, raw.get(name), cls) for name, cls in SECTIONS.items()})


def load_params_or_exit(path: str | Path = PARAMS_FILE) -> Params:
    """`load_params` for a stage's `main`: bad params end the process with
    `error: <message>` on stderr and exit status 2 (a usage error), not a traceback.

    Args:
        path: The YAML file.

    Returns:
        The frozen, validated params.
    """
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
