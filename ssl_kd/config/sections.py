"""The shared sections of a run config: typed dataclasses, each with the checks its types alone
cannot make (choices, ranges, files). A method's own section lives in the method's file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_kd.errors import ConfigError

# The bundled data sets (ssl_kd.data.bundled, generated in memory) and image folders.
BUNDLED_DATASETS = ("digits", "cluttered_digits")
DATASETS = (*BUNDLED_DATASETS, "imagefolder")
TRANSFORMS = ("lightly", "fast", "batched")
OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "loop", "foreach", "fused")
DEVICES = ("auto", "cpu", "cuda")


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def check_positive(values: dict[str, float | int]) -> None:
    for key, value in values.items():
        if not value > 0:  # NaN fails this too
            raise ConfigError(f"{key}={value} must be > 0")


def check_not_negative(values: dict[str, float | int]) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ConfigError(f"{key}={value} must be >= 0")


def check_unit_interval(values: dict[str, float]) -> None:
    """Probabilities and EMA momenta: [0, 1]."""
    for key, value in values.items():
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise ConfigError(f"{key}={value} must lie in [0, 1]")


def check_pair(key: str, pair: Any, lowest: float, highest: float) -> None:
    """A `[min, max]` range with lowest < min <= max <= highest (crop scales)."""
    if len(pair) != 2 or not lowest < pair[0] <= pair[1] <= highest:
        raise ConfigError(
            f"{key}={list(pair)} must be [min, max] with {lowest} < min <= max <= {highest}"
        )


def check_ratio(key: str, ratio: float | None) -> None:
    """A fraction of patches a network sees: (0, 1]."""
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ConfigError(
            f"{key}={ratio} is impossible: it is the fraction of patches the teacher sees "
            "and must lie in (0, 1]; use 1.0 for an unmasked teacher"
        )


def check_file(key: str, path: str | None) -> None:
    """A local weights file, or an export folder (its config.json says which model it holds)."""
    if not path or Path(path).is_file() or (Path(path) / "config.json").is_file():
        return
    if Path(path).is_dir():
        raise ConfigError(
            f"{key}={path} is a folder without config.json: name a weights file or an "
            "`ssl-kd export` folder"
        )
    raise ConfigError(f"{key}={path} does not exist (nothing is ever downloaded)")


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"  # any timm ViT
    img_size: int = 224  # size of the global crops the position embedding is built for
    drop_path_rate: float = 0.1  # student only: the EMA teacher runs in eval mode
    checkpoint: str | None = None  # local file to start from; nothing is ever downloaded
    # Extra timm.create_model keyword arguments (e.g. patch_size, embed_dim, depth, num_heads).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # How the position embedding is resampled for crops on another patch grid (DINO's 96-px
    # local crops): dino (official DINO: bicubic by grid + 0.1, no antialiasing) or timm
    # (bicubic to the grid, antialiased). None takes the method's default (DINO: dino, else timm).
    pos_embed_interpolation: str | None = None

    def check(self) -> None:
        # Imported here, as in MaskingConfig.check: pos_embed imports torch.
        from ssl_kd.pos_embed import INTERPOLATIONS

        check_choice("model.pos_embed_interpolation", self.pos_embed_interpolation, INTERPOLATIONS)
        check_positive({"model.img_size": self.img_size})
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate={self.drop_path_rate} must lie in [0, 1)")
        check_file("model.checkpoint", self.checkpoint)


@dataclass
class DataConfig:
    name: str = "imagefolder"
    path: str | None = None  # ImageFolder root (class sub-folders) or a flat folder of images
    # lightly: lightly's DINOTransform/MAETransform per image (PIL, in the workers); fast: the
    # same augmentation, workers decode and crop, the training process colours whole batches
    # on its device; batched (bundled data only): crops and brightness/contrast on tensors.
    transform: str = "lightly"
    global_crop_size: int = 224
    local_crop_size: int = 96
    num_local_views: int = 8  # official DINO: 8 (lightly's DINOTransform defaults to 6)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    hflip_prob: float = 0.5
    # DeiT's repeated augmentation: each image of an epoch's shuffled order appears this many
    # times in a row, the copies on different ranks; an epoch keeps its number of samples (1/r
    # of the images, each r times). 1: off (DeiT: 3).
    repeated_augmentation: int = 1
    num_workers: int = 8
    test_fraction: float = 0.2  # bundled data only: the held-out split for evaluation
    # An unreadable image: skip (log it once, count it, train on the next readable image in
    # its place) or error (stop; the last checkpoint is kept).
    on_error: str = "skip"
    # Under on_error=skip, the run stops once more than this fraction of the data set's files
    # turned out unreadable: a folder that bad is more likely a wrong path or a broken copy.
    max_bad_fraction: float = 0.1

    def check(self) -> None:
        check_choice("data.name", self.name, DATASETS)
        check_choice("data.transform", self.transform, TRANSFORMS)
        check_choice("data.on_error", self.on_error, ("skip", "error"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:  # NaN fails this too
            raise ConfigError(
                f"data.max_bad_fraction={self.max_bad_fraction} must lie in [0, 1]: the "
                "largest fraction of the images that may be unreadable (data.on_error=skip)"
            )
        check_positive(
            {
                "data.global_crop_size": self.global_crop_size,
                "data.local_crop_size": self.local_crop_size,
                "data.repeated_augmentation": self.repeated_augmentation,
            }
        )
        check_not_negative(
            {"data.num_local_views": self.num_local_views, "data.num_workers": self.num_workers}
        )
        check_pair("data.global_crop_scale", self.global_crop_scale, 0.0, 1.0)
        check_pair("data.local_crop_scale", self.local_crop_scale, 0.0, 1.0)
        check_unit_interval({"data.hflip_prob": self.hflip_prob})
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction={self.test_fraction} must lie in (0, 1)")
        if self.name == "imagefolder":
            if not self.path:
                raise ConfigError(
                    "data.path is not set: point it at an ImageFolder root (or a flat image "
                    "folder), or use data.name=digits (or cluttered_digits) for the bundled "
                    "demo data"
                )
            if not Path(self.path).is_dir():
                raise ConfigError(f"data.path={self.path} is not a folder")


@dataclass
class MaskingConfig:
    # The fraction of patches the masked network sees; None takes the method's default
    # (DINO: the teacher, 1.0 = plain DINO; MAE/DMAE: the encoder, 0.25).
    keep_ratio: float | None = None
    # attention_topk, random, attention_bottomk or block; None takes the method's default.
    strategy: str | None = None
    # Linear schedule of the keep ratio from keep_ratio_start to keep_ratio over the warm-up;
    # None keeps it constant.
    keep_ratio_start: float | None = None
    keep_ratio_warmup_epochs: int = 0
    # Adaptive keep ratio (ssl_kd/adaptive.py, README "Adaptive keep ratio"): the teacher's
    # ratio (DINO, kd, vitkd, scalekd: masking.keep_ratio; dmae: dmae.teacher_keep_ratio),
    # starting at its configured value, is lowered while the masked teacher's targets stay
    # within `tolerance` of the full teacher's and raised when they are not.
    adaptive: bool = False
    # The largest gap tolerated, in the units of the method's loss (DINO, kd: KL in nats; dmae:
    # its alignment loss). 0 never lowers the ratio. None takes the method's default, chosen
    # once on the study of the adaptive keep ratio (eval/bench/learning.py --calibrate).
    tolerance: float | None = None
    adaptive_min: float = 0.1  # the lowest ratio the controller goes to (the highest is 1.0)
    adaptive_step: float = 0.05  # how far one probe moves the ratio
    # Dead band: lowered only while gap < tolerance × (1 − hysteresis), raised once gap >
    # tolerance, held in between.
    hysteresis: float = 0.2
    # The gap is measured on steps 0, N, 2N, ...; None: a hundredth of the run's steps.
    probe_every_steps: int | None = None
    probe_fraction: float = 0.125  # of each process's batch (at least one image)

    def check(self) -> None:
        # Imported here: masking imports torch, and `ssl_kd.config` stays light (the CLI parses
        # the command line and reads the YAML file before anything imports torch).
        from ssl_kd.masking import STRATEGIES

        check_choice("masking.strategy", self.strategy, STRATEGIES)
        check_ratio("masking.keep_ratio", self.keep_ratio)
        check_ratio("masking.keep_ratio_start", self.keep_ratio_start)
        check_not_negative({"masking.keep_ratio_warmup_epochs": self.keep_ratio_warmup_epochs})
        if self.tolerance is not None:
            check_not_negative({"masking.tolerance": self.tolerance})
        check_ratio("masking.adaptive_min", self.adaptive_min)
        if not 0.0 < self.probe_fraction <= 1.0:
            raise ConfigError(
                f"masking.probe_fraction={self.probe_fraction} must lie in (0, 1]: the share of "
                "each process's batch the full teacher also sees on a probe step"
            )
        check_positive({"masking.adaptive_step": self.adaptive_step})
        if self.probe_every_steps is not None:
            check_positive({"masking.probe_every_steps": self.probe_every_steps})
        if not 0.0 <= self.hysteresis < 1.0:
            raise ConfigError(f"masking.hysteresis={self.hysteresis} must lie in [0, 1)")


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4  # base lr for a global batch of 256: lr = lr * batch / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    # How the update runs (engine/optimizer.py): auto (fused where torch has the kernel for the
    # device), loop, foreach or fused; the same update up to float rounding.
    implementation: str = "auto"

    def check(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_choice("optim.implementation", self.implementation, OPTIMIZER_IMPLEMENTATIONS)
        check_positive({"optim.lr": self.lr})
        check_not_negative(
            {
                "optim.min_lr": self.min_lr,
                "optim.warmup_epochs": self.warmup_epochs,
                "optim.weight_decay": self.weight_decay,
                "optim.weight_decay_end": self.weight_decay_end,
            }
        )
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optim.min_lr={self.min_lr} is larger than optim.lr={self.lr}: the cosine "
                "schedule decays from optim.lr down to optim.min_lr"
            )
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(
                f"optim.betas={list(self.betas)} must be two values in [0, 1), e.g. [0.9, 0.999]"
            )


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64  # per process (per GPU)
    seed: int = 0
    amp: bool = True  # bf16 autocast, used on CUDA only
    # torch.compile of the backbones' blocks (models/backbone.py says how recompiles stay few).
    compile: bool = False
    device: str = "auto"  # auto, cpu or cuda
    checkpoint_every_steps: int = 500
    log_every_steps: int = 10
    max_steps: int | None = None  # stop early (for smoke runs); schedules still span all epochs
    # Numbered copies checkpoint-<step>.pth kept beside checkpoint.pth (the oldest pruned);
    # 0 keeps none. A run always resumes from checkpoint.pth.
    keep_checkpoints: int = 2
    # A NaN/Inf loss: stop (nothing saved; the last checkpoint is kept) or skip the step (no
    # update, the method's buffers restored), at most max_skipped_steps times.
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    # Test hook: the input of these steps is set to NaN, so that the loss is NaN for real.
    debug_nan_at_steps: list[int] = field(default_factory=list)

    def check(self) -> None:
        check_choice("train.device", self.device, DEVICES)
        check_choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        check_positive(
            {
                "train.epochs": self.epochs,
                "train.batch_size": self.batch_size,
                "train.log_every_steps": self.log_every_steps,
                "train.checkpoint_every_steps": self.checkpoint_every_steps,
            }
        )
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps={self.max_steps} must be > 0 (or null)")
        check_not_negative(
            {
                "train.keep_checkpoints": self.keep_checkpoints,
                "train.max_skipped_steps": self.max_skipped_steps,
            }
        )


@dataclass
class EvalConfig:
    knn_every_epochs: int = 0  # 0: only at the end (if knn_at_end)
    knn_at_end: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_random_init: bool = False  # also score the untrained backbone (a baseline)
    batch_size: int = 256
    # Labelled ImageFolders for k-NN with data.name=imagefolder (bundled data has its own split).
    knn_train_path: str | None = None
    knn_val_path: str | None = None
    # Top-1/top-5 of the method's classifier (supervised, kd) on the validation split: the
    # bundled data's held-out split, or eval.val_path (an ImageFolder with data.path's classes).
    classify_every_epochs: int = 0  # 0: only at the end (if classify_at_end)
    classify_at_end: bool = True
    val_path: str | None = None
    # Pictures of what the method does (DINO: attention and the masked teacher's input; MAE:
    # reconstructions) to TensorBoard every N steps; 0: never.
    pictures_every_steps: int = 0

    def check(self) -> None:
        if self.pictures_every_steps < 0:
            raise ConfigError(
                f"eval.pictures_every_steps={self.pictures_every_steps} must be >= 0 (0: never)"
            )
        check_not_negative(
            {
                "eval.knn_every_epochs": self.knn_every_epochs,
                "eval.classify_every_epochs": self.classify_every_epochs,
            }
        )
        check_positive({"eval.knn_k": self.knn_k, "eval.batch_size": self.batch_size})
        if self.val_path is not None and not Path(self.val_path).is_dir():
            raise ConfigError(f"eval.val_path={self.val_path} is not a folder")
        if not math.isfinite(self.knn_temperature) or self.knn_temperature <= 0:
            raise ConfigError(f"eval.knn_temperature={self.knn_temperature} must be > 0")


@dataclass
class Config:
    """A run: the method's name, the shared sections and every method's own section."""

    method: str = ""  # a registered method's name; empty: the default method (DINO)
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Method sections by config key (`dino`, `dmae`, ...): the typed dataclasses the registered
    # methods declare. In YAML each is a top-level key like the shared sections.
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, key: str) -> Any:
        """The typed section a method declared under `key`."""
        return self.sections[key]

    def check(self) -> None:
        """Every shared section's own checks."""
        for part in (self.model, self.data, self.masking, self.optim, self.train, self.eval):
            part.check()


SHARED_SECTIONS = ("model", "data", "masking", "optim", "train", "eval")
