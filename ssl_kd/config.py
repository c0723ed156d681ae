"""Run configuration: a dataclass schema, a YAML file merged over it, `a.b=value` overrides.

Defaults live here, in one place. Every entry point (CLI, torchrun, the submitit callable) goes
through `load_config`, so a wrong key, type or value fails before any work with a message that
names the key and what would be valid.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

METHODS = ("dino", "mae", "dmae")
PROJECTIONS = ("linear", "mlp")
STRATEGIES = ("attention_topk", "random", "attention_bottomk", "block")
DATASETS = ("digits", "imagefolder")
TRANSFORMS = ("lightly", "batched")
OPTIMIZERS = ("adamw", "sgd")
DIGITS_IMAGES = 1797  # scikit-learn's load_digits


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user (no traceback needed)."""


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"  # any timm ViT
    img_size: int = 224  # size of the global crops the position embedding is built for
    drop_path_rate: float = 0.1  # student only: the EMA teacher runs in eval mode
    checkpoint: str | None = None  # local file to start from; nothing is ever downloaded
    # Extra timm.create_model keyword arguments (e.g. patch_size, embed_dim, depth, num_heads).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "imagefolder"
    path: str | None = None  # ImageFolder root (class sub-folders) or a flat folder of images
    transform: str = "lightly"  # lightly's DINOTransform (PIL, per image) or batched (tensors)
    global_crop_size: int = 224
    local_crop_size: int = 96
    num_local_views: int = 8  # official DINO: 8 (lightly's DINOTransform defaults to 6)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    hflip_prob: float = 0.5
    num_workers: int = 8
    test_fraction: float = 0.2  # digits only: held-out split for k-NN
    # An unreadable image: skip (log it once, count it, train on the next readable image in
    # its place) or error (stop; the last checkpoint is kept).
    on_error: str = "skip"


@dataclass
class MaskingConfig:
    # DINO: fraction of patches the teacher sees (1.0 is plain DINO, the default);
    # MAE/DMAE: fraction of patches the encoder sees (default 0.25).
    keep_ratio: float | None = None
    # DINO: attention_topk (default), random, attention_bottomk, block; MAE/DMAE: random, block.
    strategy: str | None = None
    # Linear schedule of the keep ratio from keep_ratio_start to keep_ratio over the warm-up;
    # None keeps it constant.
    keep_ratio_start: float | None = None
    keep_ratio_warmup_epochs: int = 0


@dataclass
class DinoConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False  # False for ViT-S in the official recipe
    batch_norm: bool = False  # BatchNorm in the head's MLP (DINO's ResNet recipe)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine schedule to 1.0, per iteration
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0  # 0 disables
    # DINOv2's KoLeo regulariser on the student's global-view [CLS] features (0.1 in DINOv2);
    # it spreads the backbone features of a batch, which small datasets need (see README).
    koleo_weight: float = 0.0


@dataclass
class DmaeConfig:
    """MAE pretraining (method=mae) and DMAE distillation (method=dmae) from a frozen teacher."""

    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    teacher_name: str = "vit_large_patch16_224"  # any timm ViT with the student's patch grid
    teacher_checkpoint: str | None = None  # local file: MAE release, timm state dict, ssl_kd run
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    # (student block, teacher block) pairs, 0-based; the teacher stops after the deepest one.
    aligned_blocks: list[list[int]] = field(default_factory=lambda: [[8, 17]])
    projection: str = "linear"
    distill_weight: float = 1.0
    # Fraction of the student's visible patches the teacher sees (top of the student's [CLS]
    # attention); 1.0: all visible patches, as in DMAE.
    teacher_keep_ratio: float = 1.0
    recon_images_every_steps: int = 0  # reconstruction pictures to TensorBoard; 0: never


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4  # base lr for a global batch of 256: lr = lr * batch / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64  # per process (per GPU)
    seed: int = 0
    amp: bool = True  # bf16 autocast, used on CUDA only
    device: str = "auto"  # auto, cpu or cuda
    checkpoint_every_steps: int = 500
    log_every_steps: int = 10
    max_steps: int | None = None  # stop early (for smoke runs); schedules still span all epochs
    # Numbered copies checkpoint-<step>.pth kept beside checkpoint.pth (the oldest pruned);
    # 0 keeps none. A run always resumes from checkpoint.pth.
    keep_checkpoints: int = 2
    # A NaN/Inf loss: stop (nothing saved; the last checkpoint is kept) or skip the step (no
    # update, DINO center and BatchNorm statistics restored), at most max_skipped_steps times.
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    # Test hook: the input of these steps is set to NaN, so that the loss is NaN for real.
    debug_nan_at_steps: list[int] = field(default_factory=list)


@dataclass
class EvalConfig:
    knn_every_epochs: int = 0  # 0: only at the end (if knn_at_end)
    knn_at_end: bool = True
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_random_init: bool = False  # also score the untrained backbone (a baseline)
    batch_size: int = 256
    # Labelled ImageFolders for k-NN with data.name=imagefolder (digits has its own split).
    knn_train_path: str | None = None
    knn_val_path: str | None = None
    # Attention / masked-teacher-input pictures (DINO; DMAE: reconstructions) to TensorBoard
    # every N steps; 0: never (DMAE's own dmae.recon_images_every_steps still applies).
    pictures_every_steps: int = 0


@dataclass
class Config:
    method: str = "dino"
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    dmae: DmaeConfig = field(default_factory=DmaeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _keys_of(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _unknown_key_message(schema: DictConfig, dotted: str) -> str:
    parts = dotted.split(".")
    node: Any = schema
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(parts[:depth]) or "<top level>"
            valid = _keys_of(node)
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean '{'.'.join([*parts[:depth], close[0]])}'?" if close else ""
            return (
                f"unknown config key '{dotted}'. Valid keys in {where}: {', '.join(valid)}.{hint}"
            )
        node = node[part]
    return f"unknown config key '{dotted}'"


def _merge(schema: DictConfig, other: DictConfig, source: str) -> DictConfig:
    for dotted in _dotted_keys(other):
        if OmegaConf.select(schema, dotted, default=_MISSING) is _MISSING and not _under_free_dict(
            dotted
        ):
            raise ConfigError(f"{source}: {_unknown_key_message(schema, dotted)}")
    try:
        return OmegaConf.merge(schema, other)  # type: ignore[return-value]
    except (ValidationError, ConfigKeyError) as err:
        key = getattr(err, "full_key", "") or "?"
        reason = str(err.msg).splitlines()[0]  # OmegaConf appends the node's details
        raise ConfigError(f"{source}: bad value for '{key}': {reason}") from None


_MISSING = object()
_FREE_DICTS = ("model.kwargs", "dmae.teacher_kwargs")


def _under_free_dict(dotted: str) -> bool:
    return any(dotted.startswith(prefix + ".") for prefix in _FREE_DICTS)


def _dotted_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        dotted = f"{prefix}{key}"
        value = node._get_node(key)  # no interpolation resolution
        if isinstance(value, DictConfig) and dotted not in _FREE_DICTS:
            keys.extend(_dotted_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _first_line(err: Exception) -> str:
    """OmegaConf's messages go on with the node's full_key/reference_type on more lines."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults ← YAML file ← `a.b=value` overrides, validated.

    Raises:
        ConfigError: with a message naming the key and the valid choices.
    """
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as err:  # yaml errors carry the line number
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        merged = _merge(merged, file_cfg, str(path))
    for override in overrides or []:
        if "=" not in override:
            raise ConfigError(
                f"override {override!r} must look like key=value (e.g. train.epochs=10)"
            )
        try:
            dotlist = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {override!r}: {_first_line(err)}") from None
        merged = _merge(merged, dotlist, f"override {override!r}")
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_first_line(err)) from None
    resolve_defaults(cfg)
    from ssl_kd.validation import validate  # it imports this module

    validate(cfg)
    return cfg


def resolve_defaults(cfg: Config) -> None:
    """Fills the defaults that depend on the method."""
    dino = cfg.method == "dino"
    if cfg.masking.keep_ratio is None:
        cfg.masking.keep_ratio = 1.0 if dino else 0.25
    if cfg.masking.strategy is None:
        cfg.masking.strategy = "attention_topk" if dino else "random"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
