"""The contract every method fulfils; the trainer, the config loader, the data and the weights
code know nothing else about a method.

A method is one file in `ssl_kd/methods/`: a `Method` subclass registered with `@register`
that declares, in one place, its names, its typed config section, the views it needs from the
data, its masking defaults, its checks, how it is built, and where its evaluated backbone is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_kd.adaptive import KeepRatioController
from ssl_kd.config.sections import Config, MaskingConfig
from ssl_kd.data import Views
from ssl_kd.errors import ConfigError
from ssl_kd.masking import keep_ratio_schedule
from ssl_kd.models.backbone import ViTBackbone


@dataclass
class StepState:
    """Where training is; a method derives its schedules (keep ratio, momentum, ...) from it."""

    step: int
    epoch: int
    generator: torch.Generator | None = None
    # (rank, world_size): random masks are drawn for the global batch and sliced per rank
    # (`masking.select(shard=...)`), so a sample's mask does not depend on the world size.
    shard: tuple[int, int] = (0, 1)


@dataclass
class StepOutput:
    """What one forward returns to the trainer.

    Attributes:
        loss: the scalar to minimise.
        metrics: named floats (or 0-d tensors) for the logs; names ending in `loss` are the
            loss terms a non-finite-loss message lists.
        teacher_macs: the teacher's multiply-adds in this step (this process's share), the
            adaptive keep ratio's probe included.
        teacher_macs_unmasked: what the same teacher would have cost on every patch (without
            a probe: what a run that never masks pays).
        images: images this process trained on in this step.
        keep_ratio: the fraction of patches the masked network saw, if the method masks.
        keep_ratio_gap: on a probe step of the adaptive keep ratio, how far the masked
            teacher's targets were from the full teacher's (`Method.adaptive`); else None.
        probe_macs: the part of `teacher_macs` the probe's full teacher cost.
    """

    loss: Tensor
    metrics: Mapping[str, float | Tensor] = field(default_factory=dict)
    teacher_macs: float = 0.0
    teacher_macs_unmasked: float = 0.0
    images: int = 0
    keep_ratio: float | None = None
    keep_ratio_gap: float | None = None
    probe_macs: float = 0.0


class Method(nn.Module):
    """A method owns its networks, heads, loss and schedules; the trainer only drives it.

    Subclasses set the class attributes below, implement `build`, `forward` and
    `export_backbone`, and are registered with `ssl_kd.methods.registry.register`.
    """

    names: ClassVar[tuple[str, ...]] = ()  # what `method:` may say
    section: ClassVar[str] = ""  # the key of its config section
    config_class: ClassVar[type] = object  # that section's dataclass
    views: ClassVar[Views] = Views.MULTI_CROP  # what the training stream yields
    # masking.keep_ratio / masking.strategy when the config leaves them unset (None).
    default_keep_ratio: ClassVar[float] = 1.0
    default_strategy: ClassVar[str] = "attention_topk"
    # masking.tolerance when the config leaves it unset (None): the largest gap between the
    # masked and the full teacher's targets the adaptive keep ratio tolerates, in the units of
    # this method's gap (eval/bench/learning.py --calibrate says how each was chosen).
    default_tolerance: ClassVar[float] = 0.05
    # model.pos_embed_interpolation when the config leaves it unset (None).
    default_pos_embed_interpolation: ClassVar[str] = "timm"
    # Where the backbones it can export sit in its state dict (part → module path of a
    # `ViTBackbone`), and which part is evaluated and exported by default.
    backbones: ClassVar[dict[str, str]] = {}
    default_backbone: ClassVar[str] = "student"
    # Whether `model.name` may name any timm model (a CNN too): a ViT student still comes
    # through `build` as a `ViTBackbone`, another model through `build_any`.
    any_timm_model: ClassVar[bool] = False

    # --- declared once per method ---------------------------------------------------------
    @classmethod
    def resolve_defaults(cls, cfg: Config) -> None:
        """Fills the config values this method chooses (masking, position embedding)."""
        if cfg.masking.keep_ratio is None:
            cfg.masking.keep_ratio = cls.default_keep_ratio
        if cfg.masking.strategy is None:
            cfg.masking.strategy = cls.default_strategy
        if cfg.masking.tolerance is None:
            cfg.masking.tolerance = cls.default_tolerance
        if cfg.model.pos_embed_interpolation is None:
            cfg.model.pos_embed_interpolation = cls.default_pos_embed_interpolation

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Checks of its own section and of how it uses the shared ones (ConfigError)."""
        check = getattr(cfg.section(cls.section), "check", None)
        if check is not None:
            check()
        if cfg.masking.adaptive:
            check_adaptive(cfg, cls.adapted_ratio(cfg))

    @classmethod
    def adapted_ratio(cls, cfg: Config) -> tuple[str, float] | None:
        """The config key and value of the teacher keep ratio `masking.adaptive` controls (the
        controller starts there); None: this method, so configured, masks no teacher."""
        return None

    @classmethod
    def init_backbone(cls, backbone: ViTBackbone) -> None:
        """The method's own initialisation of the freshly built student backbone, before
        `model.checkpoint` (if any) loads over it; timm's initialisation stays by default."""

    @classmethod
    def build(cls, cfg: Config, backbone: ViTBackbone) -> Method:
        """The method of `cfg` around a freshly built student backbone."""
        raise NotImplementedError

    @classmethod
    def build_any(cls, cfg: Config, model: nn.Module) -> Method:
        """The method of `cfg` around a student that is not a ViT (`any_timm_model` only): the
        timm model `model.name` names, built without its classifier."""
        raise NotImplementedError

    @classmethod
    def train_transform(cls, cfg: Config) -> Callable | None:
        """The per-image training transform of `Views.LABELLED` on image folders (None: the
        stream's default)."""
        return None

    # --- per run --------------------------------------------------------------------------
    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Precomputes the method's per-iteration schedules once the run length is known.

        Until it is called (a method used outside the trainer), every schedule takes its
        configured final value.
        """

    def forward(self, views: list[Tensor], state: StepState) -> StepOutput:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The method's part of the run summary (summary.json)."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups; `apply_wd=False` groups get no weight decay (biases, norms)."""
        return param_groups_without_wd_on_1d(self.trainable_module())

    # Subclasses set `self.student` (everything trained), call it through `self.student_call`
    # and may hold a `self.teacher` (EMA or frozen), which stays in eval mode.
    student: nn.Module

    @property
    def student_call(self) -> nn.Module:
        """The student's forward: the DDP wrapper once `wrap_trainable` ran, else the student."""
        return self.__dict__.get("_student_wrapper", self.student)

    def trainable_module(self) -> nn.Module:
        """What DDP wraps: never an EMA or frozen teacher."""
        return self.student

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Routes the student's forward through a wrapper (DDP) without changing its weights.

        The wrapper is kept out of the registered submodules, so the state dict holds the
        student once, without a `module.` copy, and checkpoints load with or without DDP.
        """
        self.__dict__["_student_wrapper"] = wrap(self.student)

    def hold_frozen_teacher(self, teacher: nn.Module | None) -> None:
        """Keeps a frozen teacher as `self.teacher`, a plain attribute rather than a submodule:
        never saved in checkpoints, handed to the optimizer or wrapped in DDP, yet moved by
        `.to()` with the method."""
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.__dict__["teacher"] = teacher
        self.__dict__["_frozen_teacher"] = True

    def frozen_teacher(self) -> nn.Module | None:
        """The teacher `hold_frozen_teacher` keeps outside the submodules, if any."""
        return self.__dict__.get("teacher") if self.__dict__.get("_frozen_teacher") else None

    def to(self, *args: Any, **kwargs: Any) -> Method:
        super().to(*args, **kwargs)
        teacher = self.frozen_teacher()
        if teacher is not None:
            teacher.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.eval()  # a teacher never drops paths or tokens
        return self

    def before_optimizer_step(self, state: StepState) -> dict[str, float | Tensor]:
        """Gradient hooks (clipping, frozen layers); returns metrics such as the grad norm."""
        return {}

    @torch.no_grad()
    def update_teacher(self, state: StepState) -> None:
        """EMA update or nothing."""

    # The owner of the teacher's keep ratio under masking.adaptive (None: off). The method
    # reads its ratio and probes when it says; the trainer feeds it each step's gap, averaged
    # over the ranks, and keeps its state in the checkpoint.
    adaptive: KeepRatioController | None = None

    picture_every_steps: int = 0  # how often the trainer asks for `pictures`; 0: never

    def pictures(self, views: list[Tensor], state: StepState) -> dict[str, Tensor]:
        """Images for TensorBoard, tag → [3, H, W] in [0, 1]."""
        return {}

    def classifier(self) -> nn.Module | None:
        """The network whose logits the trainer scores on the validation split (top-1/top-5):
        images [B, C, H, W] → an output with `logits` [B, K]; None: the method classifies
        nothing."""
        return None

    @property
    def has_vit_backbone(self) -> bool:
        """Whether `export_backbone` has a ViT to give (k-NN, export); a CNN student has none."""
        return True

    def export_backbone(self, part: str | None = None) -> ViTBackbone:
        """The backbone to evaluate and export: `part` of `backbones`, default its default."""
        path = self.backbones[part or self.default_backbone]
        backbone = self.get_submodule(path)
        assert isinstance(backbone, ViTBackbone), path
        return backbone


class KeepRatioSchedule:
    """The keep ratio of a masking method per step: linear from `masking.keep_ratio_start` to
    `masking.keep_ratio` over `masking.keep_ratio_warmup_epochs`, then constant; or, given a
    controller (`masking.adaptive`), the controller's current ratio.

    The one fallback rule: before `set_schedule` (a method used outside the trainer) and past
    the schedule's end, the ratio is the configured final `masking.keep_ratio`.
    """

    def __init__(self, masking: MaskingConfig, adaptive: KeepRatioController | None = None) -> None:
        assert masking.keep_ratio is not None, "masking defaults are resolved when loading"
        self.masking = masking
        self.final = float(masking.keep_ratio)
        self.values: Tensor | None = None
        self.adaptive = adaptive

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        masking = self.masking
        self.values = keep_ratio_schedule(
            self.final,
            masking.keep_ratio_start,
            masking.keep_ratio_warmup_epochs * steps_per_epoch,
            total_steps,
        )

    def __call__(self, step: int) -> float:
        if self.adaptive is not None:
            return self.adaptive.ratio
        return scheduled(self.values, step, self.final)


PROBES_PER_RUN = 100  # masking.probe_every_steps unset: a probe every hundredth of the run


def probe_interval(total_steps: int) -> int:
    """Steps between probes when masking.probe_every_steps is unset: a hundredth of the run."""
    return max(1, total_steps // PROBES_PER_RUN)


def adaptive_controller(masking: MaskingConfig, start: float) -> KeepRatioController | None:
    """The controller `masking.adaptive` asks for, starting at `start`; None when it is off.
    masking.tolerance is resolved when loading (the method's `default_tolerance`). With
    masking.probe_every_steps unset, the trainer sets its interval from the run's length
    (`probe_interval`)."""
    if not masking.adaptive:
        return None
    assert masking.tolerance is not None  # resolved when loading
    return KeepRatioController(
        start, masking.tolerance, minimum=masking.adaptive_min, step_size=masking.adaptive_step,
        hysteresis=masking.hysteresis, probe_fraction=masking.probe_fraction,
        probe_every=masking.probe_every_steps or probe_interval(0),
    )  # fmt: skip


def check_adaptive(cfg: Config, adapted: tuple[str, float] | None) -> None:
    """`masking.adaptive` needs a masked teacher, a start within its bounds and no schedule of
    its own on the ratio it controls (ConfigError)."""
    masking = cfg.masking
    if adapted is None:
        raise ConfigError(
            f"masking.adaptive=true: {cfg.method} masks no teacher as configured, so there is "
            "no teacher keep ratio to adapt; set masking.adaptive=false"
        )
    key, start = adapted
    if not masking.adaptive_min <= start:
        raise ConfigError(
            f"{key}={start} is where masking.adaptive starts, below masking.adaptive_min="
            f"{masking.adaptive_min}; start at or above it (1.0: the full teacher)"
        )
    if key == "masking.keep_ratio" and masking.keep_ratio_warmup_epochs > 0:
        raise ConfigError(
            f"masking.adaptive=true with masking.keep_ratio_warmup_epochs="
            f"{masking.keep_ratio_warmup_epochs}: the controller alone sets the keep ratio; "
            "drop the warm-up (the ratio starts at masking.keep_ratio)"
        )


def masking_strategy(masking: MaskingConfig) -> str:
    """`masking.strategy`, which the method's default fills when the config is loaded."""
    assert masking.strategy is not None, "masking defaults are resolved when loading"
    return masking.strategy


def scheduled(values: Tensor | None, step: int, final: float) -> float:
    """`values[step]`, or `final` before a schedule exists and past its end."""
    if values is None or not 0 <= step < len(values):
        return final
    return float(values[step])


def param_groups_without_wd_on_1d(module: nn.Module) -> list[dict[str, Any]]:
    """Two groups: weights with decay; biases and norm parameters (ndim ≤ 1) without."""
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for _name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "apply_wd": True},
        {"params": no_decay, "apply_wd": False},
    ]


def clip_gradients_per_parameter(parameters: Sequence[Tensor], clip: float) -> Tensor:
    """DINO's clipping: each parameter's gradient norm is clipped to `clip` on its own.

    Returns:
        The total gradient norm before clipping (for logging), a 0-d tensor on the device.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if clip > 0:
        coefs = [(clip / (norm + 1e-6)).clamp(max=1.0) for norm in norms]
        torch._foreach_mul_(grads, coefs)
    return total
