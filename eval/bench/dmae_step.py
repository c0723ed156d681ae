"""One DMAE training step: ours vs the naive teacher the official code runs, in one run.

    .venv/bin/python eval/bench/dmae_step.py [--gpu] [--batch 8] [--steps 5] [--json OUT]

ViT-B/16 student (25% of patches visible, MAE decoder 512×8), ViT-L/16 MAE teacher, 224 px,
CPU. Variants, interleaved step by step, medians reported:
- naive: the teacher runs all 24 blocks on the visible patches and then its MAE decoder, whose
  output nobody uses (what the official DMAE code does);
- ours: the teacher stops after block 17, the deepest aligned one, and never decodes;
- ours, teacher_keep_ratio 0.5: the teacher sees the half of the visible patches the student's
  [CLS] attention ranks highest.
Targets (issue 3): teacher time ≤ 0.8× naive, whole step ≥ 1.2× faster.

`--gpu`: the same on one CUDA GPU with bf16 autocast around the forward (loss included), batch
64 and 20 steps by default; step times CUDA-synchronised, teacher times by CUDA events, and two
more columns: img/s and each variant's own peak memory (eval/bench/device_clock.py says how).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssl_kd.config import MaskingConfig
from ssl_kd.masking import complement
from ssl_kd.methods.base import StepState
from ssl_kd.methods.dmae import DMAE, DmaeConfig
from ssl_kd.models.backbone import create_backbone
from ssl_kd.models.heads import MAEDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_clock import SpanTimer, allocated, timed

GPU_BATCH, GPU_STEPS = 64, 20


@dataclass(frozen=True)
class Models:
    """Student and teacher (timm names and arguments), image size, the aligned (student,
    teacher) block pairs, and the MAE decoder (dim, depth, heads) of the student and of the
    naive teacher."""

    student: str = "vit_base_patch16_224"
    teacher: str = "vit_large_patch16_224"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    aligned_blocks: tuple[tuple[int, int], ...] = ((8, 17),)
    decoder: tuple[int, int, int] = (512, 8, 16)
    label: str = "ViT-B/16 ← ViT-L/16"


class TimedTeacher:
    """Wraps the teacher's forward to time it; `naive` adds the unused full depth and decoder."""

    def __init__(
        self, dmae: DMAE, naive: bool, decoder: tuple[int, int, int], device: torch.device
    ) -> None:
        self.teacher = teacher = dmae.teacher
        assert teacher is not None
        self.forward = teacher.forward
        self.num_patches = dmae.grid[0] * dmae.grid[1]
        self.timer = SpanTimer(device)
        self.decoder = None
        if naive:
            pixels = 3 * teacher.patch_size**2
            self.decoder = MAEDecoder(self.num_patches, teacher.embed_dim, pixels, *decoder)
            self.decoder.eval().to(device)
        teacher.forward = self  # type: ignore[method-assign]

    def __call__(self, images, keep_idx=None, stop_after_block=None, return_blocks=()):  # type: ignore[no-untyped-def]
        with self.timer.span():
            if self.decoder is None:
                return self.forward(
                    images, keep_idx, stop_after_block=stop_after_block,
                    return_blocks=return_blocks,
                )  # fmt: skip
            out = self.forward(images, keep_idx, return_blocks=return_blocks)  # all blocks
            self.decoder(out.tokens, keep_idx, complement(keep_idx, self.num_patches))  # unused
            return out


def build(
    teacher_keep_ratio: float, naive: bool, models: Models, device: torch.device
) -> tuple[DMAE, TimedTeacher, torch.optim.Optimizer]:
    torch.manual_seed(0)
    student = create_backbone(models.student, models.img_size, **models.student_kwargs)
    teacher = create_backbone(models.teacher, models.img_size, **models.teacher_kwargs)
    dim, depth, heads = models.decoder
    cfg = DmaeConfig(
        decoder_dim=dim, decoder_depth=depth, decoder_heads=heads,
        aligned_blocks=[list(pair) for pair in models.aligned_blocks],
        teacher_keep_ratio=teacher_keep_ratio,
    )  # fmt: skip
    dmae = DMAE(student, teacher, cfg, MaskingConfig(0.25, "random"), models.img_size)
    dmae.to(device)
    optimizer = torch.optim.AdamW(dmae.param_groups(), lr=1e-4, betas=(0.9, 0.95))
    return dmae, TimedTeacher(dmae, naive, models.decoder, device), optimizer


def step(  # type: ignore[no-untyped-def]
    dmae: DMAE, timer: TimedTeacher, optimizer, images, index: int, amp: bool
) -> tuple[float, float, int | None]:
    """Seconds of the step and of its teacher, and the step's transient peak of allocated
    bytes (None off CUDA)."""

    def run() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            out = dmae([images], StepState(index, 0, torch.Generator().manual_seed(index)))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    seconds, transient = timed(run, images.device)
    return seconds, timer.timer.seconds(), transient


VARIANTS = {  # name: (teacher_keep_ratio, naive)
    "naive (full teacher + decoder)": (1.0, True),
    "ours (blocks 0..17, no decoder)": (1.0, False),
    "ours, teacher_keep_ratio 0.5": (0.5, False),
}


def measure(
    batch: int, steps: int, models: Models | None = None, device: str = "cpu", amp: bool = False
) -> dict[str, dict[str, Any]]:
    """Each variant's median step and teacher seconds, img/s and own peak memory (GiB; None off
    CUDA), variants built and warmed up one by one, then interleaved step by step."""
    where, models = torch.device(device), models or Models()
    images = torch.randn(batch, 3, models.img_size, models.img_size).to(where)
    variants, resident = {}, {}
    for name, (teacher_keep_ratio, naive) in VARIANTS.items():
        before = allocated(where)
        variants[name] = build(teacher_keep_ratio, naive, models, where)
        step(*variants[name], images, 0, amp)  # warm-up
        resident[name] = allocated(where) - before
    times: dict[str, list[tuple[float, float, int | None]]] = {name: [] for name in variants}
    for index in range(1, steps + 1):
        for name, (dmae, timer, optimizer) in variants.items():
            times[name].append(step(dmae, timer, optimizer, images, index, amp))
    rows = {}
    for name, values in times.items():
        step_s = statistics.median(v[0] for v in values)
        transients = [v[2] for v in values if v[2] is not None]
        rows[name] = {
            "step_s": step_s,
            "teacher_s": statistics.median(v[1] for v in values),
            "images_per_s": batch / step_s,
            "peak_memory_gib": (resident[name] + max(transients)) / 2**30 if transients else None,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None, help=f"8; {GPU_BATCH} with --gpu")
    parser.add_argument("--steps", type=int, default=None, help=f"5; {GPU_STEPS} with --gpu")
    parser.add_argument("--gpu", action="store_true", help="one CUDA GPU, bf16 autocast")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.exit(2, "--gpu: no CUDA device\n")
    batch = args.batch or (GPU_BATCH if args.gpu else 8)
    steps = args.steps or (GPU_STEPS if args.gpu else 5)
    device = "cuda" if args.gpu else "cpu"
    rows = measure(batch, steps, device=device, amp=args.gpu)
    naive = rows["naive (full teacher + decoder)"]
    if args.gpu:
        print(f"# DMAE step on {torch.cuda.get_device_name()}, {Models().label}, batch {batch}, "
              f"224 px, 25% visible, bf16 autocast, median of {steps} steps")  # fmt: skip
    else:
        print(f"# DMAE step, ViT-B/16 ← ViT-L/16, batch {batch}, 224 px, 25% visible, "
              f"{torch.get_num_threads()} threads, median of {steps} steps")  # fmt: skip
    extra = " img/s | peak GiB |" if args.gpu else ""
    print("| variant | step s | teacher s | teacher / naive | step speed-up |" + extra)
    print("|---|---|---|---|---|" + "---|" * (2 if args.gpu else 0))
    for name, row in rows.items():
        teacher_ratio = row["teacher_s"] / naive["teacher_s"]
        speedup = naive["step_s"] / row["step_s"]
        line = (
            f"| {name} | {row['step_s']:.2f} | {row['teacher_s']:.2f} | "
            f"{teacher_ratio:.2f} | {speedup:.2f}× |"
        )
        if args.gpu:
            line += f" {row['images_per_s']:.0f} | {row['peak_memory_gib']:.1f} |"
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
