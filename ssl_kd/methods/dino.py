"""DINO with student-guided teacher masking.

DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
arXiv:2104.14294. Teacher masking: Son et al., "The Role of Masking for Efficient Supervised
Knowledge Distillation of Vision Transformers" (MaskedKD), arXiv:2302.10494, §4.3 and Table 5.

The student sees every view in full. For each global view, the student's last-block [CLS]→patch
attention (mean over heads) ranks the patches and the EMA teacher sees only the top-k patches of
that same view, so its cost falls with the keep ratio.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightly.loss import DINOLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import update_momentum
from torch import Tensor, nn
from torchvision.utils import make_grid

from ssl_kd.config.sections import (
    Config,
    MaskingConfig,
    check_not_negative,
    check_positive,
    check_unit_interval,
)
from ssl_kd.data import Views
from ssl_kd.data.transforms import to_unit_range
from ssl_kd.errors import ConfigError
from ssl_kd.flops import forward_macs
from ssl_kd.losses import distribution_gap
from ssl_kd.masking import num_kept, select
from ssl_kd.methods.base import (
    KeepRatioSchedule,
    Method,
    StepOutput,
    StepState,
    adaptive_controller,
    clip_gradients_per_parameter,
    masking_strategy,
    scheduled,
)
from ssl_kd.methods.registry import register
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.models.networks import DINONetwork
from ssl_kd.schedules import cosine_schedule, epoch_warmup_schedule
from ssl_kd.visualize import attention_panels


@dataclass
class DinoConfig:
    """The `dino` section: head, loss, teacher and KoLeo (official DINO defaults)."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = False  # False for ViT-S in the official recipe
    # BatchNorm in the head's MLP (DINO's --use_bn_in_head); SyncBatchNorm under DDP on CUDA.
    batch_norm: bool = False
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

    def check(self) -> None:
        check_positive(
            {
                "dino.out_dim": self.out_dim,
                "dino.hidden_dim": self.hidden_dim,
                "dino.bottleneck_dim": self.bottleneck_dim,
                "dino.student_temp": self.student_temp,
                "dino.teacher_temp": self.teacher_temp,
                "dino.warmup_teacher_temp": self.warmup_teacher_temp,
            }
        )
        check_unit_interval(
            {
                "dino.momentum_teacher": self.momentum_teacher,
                "dino.center_momentum": self.center_momentum,
            }
        )
        check_not_negative(
            {
                "dino.warmup_teacher_temp_epochs": self.warmup_teacher_temp_epochs,
                "dino.freeze_last_layer_epochs": self.freeze_last_layer_epochs,
                "dino.clip_grad": self.clip_grad,
                "dino.koleo_weight": self.koleo_weight,
            }
        )


@register
class DINO(Method):
    """DINO's student, EMA teacher, heads and loss, with optional teacher masking.

    Args:
        backbone: the student backbone; the teacher starts as an exact (deep) copy.
        cfg: the `dino` section; masking: the `masking` section.
        global_crop_size: size of the global views (for the teacher's grid and cost).
        epochs: the run's length (the teacher temperature warms up per epoch).
    """

    names = ("dino",)
    section = "dino"
    config_class = DinoConfig
    views = Views.MULTI_CROP
    default_keep_ratio = 1.0  # plain DINO; MaskedKD's teacher masking below 1
    # KL in nats between the full and the masked teacher's sharpened distributions: the mean
    # gap at keep 0.5 (top-k) over the second half of the calibration run (learning.py
    # --calibrate, eval/bench/RESULTS.md), 0.298; 0.353 at keep 0.25.
    default_tolerance = 0.3
    default_strategy = "attention_topk"
    default_pos_embed_interpolation = "dino"  # local crops' position embedding as DINO's
    backbones: ClassVar[dict[str, str]] = {
        "teacher": "teacher.backbone",
        "student": "student.backbone",
    }
    default_backbone = "teacher"  # DINO evaluates the teacher

    student: DINONetwork
    teacher: DINONetwork

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        dino: DinoConfig = cfg.section(cls.section)
        if (dino.batch_norm or dino.koleo_weight > 0) and cfg.train.batch_size < 2:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} per process is too small for "
                "dino.batch_norm / dino.koleo_weight, which need at least 2 images per process"
            )

    @classmethod
    def adapted_ratio(cls, cfg: Config) -> tuple[str, float] | None:
        assert cfg.masking.keep_ratio is not None  # resolved when loading
        return "masking.keep_ratio", cfg.masking.keep_ratio

    @classmethod
    def build(cls, cfg: Config, backbone: ViTBackbone) -> DINO:
        return cls(
            backbone, cfg.section(cls.section), cfg.masking, cfg.data.global_crop_size,
            cfg.train.epochs,
        )  # fmt: skip

    def __init__(
        self,
        backbone: ViTBackbone,
        cfg: DinoConfig,
        masking: MaskingConfig,
        global_crop_size: int,
        epochs: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.masking = masking
        self.epochs = epochs
        self.grid = backbone.grid(global_crop_size)
        self.global_crop_size = global_crop_size

        head = self._new_head(backbone.embed_dim)
        self.student = DINONetwork(backbone, head)
        # deepcopy of the backbone; the head is rebuilt because weight_norm breaks deepcopy.
        teacher_head = self._new_head(backbone.embed_dim)
        teacher_head.load_state_dict(head.state_dict())
        self.teacher = DINONetwork(copy.deepcopy(backbone), teacher_head)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.loss_fn = DINOLoss(
            output_dim=cfg.out_dim,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self.koleo = KoLeoLoss()
        self._macs_cache: dict[int, int] = {}
        assert masking.keep_ratio is not None  # resolved when loading
        self.adaptive = adaptive_controller(masking, masking.keep_ratio)
        self.keep_ratio = KeepRatioSchedule(masking, self.adaptive)
        self._momentum: Tensor | None = None
        self._teacher_temp: Tensor | None = None

    def _new_head(self, input_dim: int) -> DINOProjectionHead:
        with warnings.catch_warnings():  # lightly still uses the old weight_norm API
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            return DINOProjectionHead(
                input_dim=input_dim,
                hidden_dim=self.cfg.hidden_dim,
                bottleneck_dim=self.cfg.bottleneck_dim,
                batch_norm=self.cfg.batch_norm,
                output_dim=self.cfg.out_dim,
                freeze_last_layer=self.cfg.freeze_last_layer_epochs,
                norm_last_layer=self.cfg.norm_last_layer,
            )

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        if mode:
            # Official DINO never puts its teacher in eval mode: a BatchNorm head normalises the
            # teacher's batch with that batch's statistics. The EMA copies parameters, not
            # running statistics, so eval-mode BatchNorm would keep its initial (0, 1) forever
            # and the teacher's common mode would swamp the per-image signal.
            for module in self.teacher.head.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        return self

    # --- schedules ------------------------------------------------------------------------
    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        cfg = self.cfg
        self._momentum = cosine_schedule(cfg.momentum_teacher, 1.0, total_steps)
        self._teacher_temp = epoch_warmup_schedule(
            cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs,
            self.epochs, steps_per_epoch,
        )[:total_steps]  # fmt: skip
        self.keep_ratio.set_schedule(total_steps, steps_per_epoch)

    def momentum(self, step: int) -> float:
        return scheduled(self._momentum, step, self.cfg.momentum_teacher)

    def teacher_temp(self, step: int) -> float:
        return scheduled(self._teacher_temp, step, self.cfg.teacher_temp)

    def summary(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio.final, "masking_strategy": self.masking.strategy}

    def forward(self, views: list[Tensor], state: StepState) -> StepOutput:
        """views: [global_0, global_1, local_0, ...], each [B, C, H, W]."""
        batch = views[0].shape[0]
        global_views = torch.cat(views[:2])  # [2B, C, H, W]
        local_views = torch.cat(views[2:]) if len(views) > 2 else None
        num_patches = self.grid[0] * self.grid[1]
        keep_ratio = self.keep_ratio(state.step)
        teacher_temp = self.teacher_temp(state.step)
        keep = num_kept(num_patches, keep_ratio)
        masked = keep < num_patches
        needs_scores = masked and masking_strategy(self.masking).startswith("attention")

        student_logits, student_cls, cls_attention = self.student_call(
            global_views, local_views, cls_attention=needs_scores
        )

        # Only the 2 global views pass through the teacher, each reduced to the patches the
        # student attends to most on that same view. On CPU one view per forward: a ViT-S MLP
        # activation of both views at batch 16 (38.7 MB) is over glibc's 32 MB mmap ceiling, so
        # the batched forward page-faulted fresh memory in every block (7× the minor faults,
        # 10% slower than two forwards; eval/bench/dino_step.py).
        per_forward = batch if global_views.device.type == "cpu" else None
        with torch.no_grad():
            keep_idx = None
            if masked:
                scores = cls_attention.mean(dim=1) if cls_attention is not None else None
                keep_idx = select(
                    scores,
                    keep,
                    masking_strategy(self.masking),
                    num_patches=num_patches,
                    batch_size=global_views.shape[0],
                    grid=self.grid,
                    generator=state.generator,
                    device=global_views.device,
                    shard=state.shard,
                )
            teacher_logits, _, _ = self.teacher(
                global_views, keep_idx=keep_idx, images_per_forward=per_forward
            )

        # The loss moves the center after using it: the statistics use the center it used.
        center = self.loss_fn.center.detach().clone()
        loss = self.loss_fn(
            list(teacher_logits.float().chunk(2)),
            list(student_logits.float().chunk(len(views))),
            teacher_temp=teacher_temp,
        )
        metrics = self._teacher_stats(teacher_logits.detach().float(), teacher_temp, center)
        metrics["dino_loss"] = loss.detach()  # each term is named when the total is not finite
        if self.cfg.koleo_weight > 0:
            # DINOv2: one KoLeo term per global crop, over that crop's batch.
            koleo = sum(self.koleo(view) for view in student_cls.float().chunk(2))
            loss = loss + self.cfg.koleo_weight * koleo
            metrics["koleo_loss"] = koleo.detach()
        metrics.update(
            teacher_tokens_kept=keep + self.teacher.backbone.num_prefix_tokens,
            keep_ratio=keep_ratio,
            momentum=self.momentum(state.step),
            teacher_temp=teacher_temp,
        )
        gap, probe_macs = None, 0.0
        if self.adaptive is not None and self.adaptive.probe_due(state.step):
            gap, probe_macs = self._probe(global_views, teacher_logits, keep, center, teacher_temp)
        teacher_views = global_views.shape[0]
        return StepOutput(
            loss,
            metrics,
            teacher_macs=teacher_views * self.teacher_macs_per_view(keep) + probe_macs,
            teacher_macs_unmasked=teacher_views * self.teacher_macs_per_view(num_patches),
            images=batch,
            keep_ratio=keep_ratio,
            keep_ratio_gap=gap,
            probe_macs=probe_macs,
        )

    @torch.no_grad()
    def _probe(
        self, global_views: Tensor, teacher_logits: Tensor, keep: int, center: Tensor, temp: float
    ) -> tuple[float, float]:
        """The adaptive keep ratio's gap on the probe's images (both global views of each):
        KL(full ‖ masked) of the teacher's centred, sharpened distributions, the loss's
        targets; and the full teacher's multiply-adds. Both 0 when nothing is masked."""
        num_patches = self.grid[0] * self.grid[1]
        if keep == num_patches:
            return 0.0, 0.0
        assert self.adaptive is not None
        batch = global_views.shape[0] // 2
        first = torch.arange(self.adaptive.probe_size(batch), device=global_views.device)
        rows = torch.cat([first, batch + first])  # [2n]: the probe's images in both views
        full_logits = self.teacher(global_views[rows])[0].float()
        center = center.reshape(1, -1)
        masked_logits = teacher_logits[rows].float()
        gap = distribution_gap((full_logits - center) / temp, (masked_logits - center) / temp)
        return gap.item(), len(rows) * self.teacher_macs_per_view(num_patches)

    @torch.no_grad()
    def _teacher_stats(
        self, teacher_logits: Tensor, temp: float, center: Tensor | None = None
    ) -> dict[str, float | Tensor]:
        """Collapse signals: per-sample entropy → ln K means uniform collapse; entropy of the
        batch-mean distribution → 0 means every image lands in one dimension.

        Args:
            teacher_logits: [B, K]; center: [1, 1, K], the center the loss of this step used
                (default: the current one).
        """
        center = (self.loss_fn.center if center is None else center).reshape(1, -1)
        probs = ((teacher_logits - center) / temp).softmax(dim=-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean_probs = probs.mean(0)
        batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
        return {
            "teacher_entropy": entropy,
            "teacher_batch_entropy": batch_entropy,
            "log_out_dim": math.log(self.cfg.out_dim),
        }

    def teacher_macs_per_view(self, keep: int) -> int:
        """Teacher multiply-adds for one global view with `keep` patches, measured once."""
        if keep not in self._macs_cache:
            self._macs_cache[keep] = forward_macs(self.teacher, self.global_crop_size, keep)
        return self._macs_cache[keep]

    def before_optimizer_step(self, state: StepState) -> dict[str, float | Tensor]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = clip_gradients_per_parameter(params, self.cfg.clip_grad)
        # DINO drops the last layer's gradients during the first epoch(s).
        self.student.head.cancel_last_layer_gradients(state.epoch)
        return {"grad_norm": grad_norm}

    @torch.no_grad()
    def pictures(self, views: list[Tensor], state: StepState) -> dict[str, Tensor]:
        """Up to 4 global views, one row each: image, the student's last-block [CLS] attention
        per head and averaged, and the masked teacher's input (the patches that average picks
        at the keep ratio; the others dimmed)."""
        images = views[0][:4]
        backbone = self.student.backbone
        was_training = backbone.training
        backbone.eval()  # no drop path: the attention of the weights as they are
        attention = backbone(images, cls_attention=True).cls_attention  # [B, heads, N]
        backbone.train(was_training)
        num_patches = self.grid[0] * self.grid[1]
        strategy = self.masking.strategy
        assert strategy is not None  # resolved when the config was loaded
        keep = num_kept(num_patches, self.keep_ratio(state.step))
        keep_idx = select(
            attention.mean(dim=1), keep, strategy, grid=self.grid, generator=state.generator
        )
        panels = attention_panels(
            to_unit_range(images), attention, keep_idx, self.grid, backbone.patch_size
        )  # [B, heads + 3, 3, H, W]
        zoom = max(1, 96 // images.shape[-1])  # small crops (digits) drawn large enough to see
        pixels = panels.flatten(0, 1).repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
        return {"dino/attention": make_grid(pixels, nrow=panels.shape[1], pad_value=1.0)}

    @torch.no_grad()
    def update_teacher(self, state: StepState) -> None:
        update_momentum(self.student, self.teacher, self.momentum(state.step))
