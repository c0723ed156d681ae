"""One DMAE training step: ours vs the naive teacher the official code runs, in one run.

    .venv/bin/python eval/bench/dmae_step.py [--batch 8] [--steps 5] [--json OUT]

ViT-B/16 student (25% of patches visible, MAE decoder 512×8), ViT-L/16 MAE teacher, 224 px,
CPU. Variants, interleaved step by step, medians reported:
- naive: the teacher runs all 24 blocks on the visible patches and then its MAE decoder, whose
  output nobody uses (what the official DMAE code does);
- ours: the teacher stops after block 17, the deepest aligned one, and never decodes;
- ours, teacher_keep_ratio 0.5: the teacher sees the half of the visible patches the student's
  [CLS] attention ranks highest.
Targets (issue 3): teacher time ≤ 0.8× naive, whole step ≥ 1.2× faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ssl_kd.config import MaskingConfig
from ssl_kd.masking import complement
from ssl_kd.methods.base import StepState
from ssl_kd.methods.dmae import DMAE, DmaeConfig
from ssl_kd.models.backbone import create_backbone
from ssl_kd.models.heads import MAEDecoder


class TimedTeacher:
    """Wraps the teacher's forward to time it; `naive` adds the unused full depth and decoder."""

    def __init__(self, dmae: DMAE, naive: bool) -> None:
        self.teacher = dmae.teacher
        self.forward = self.teacher.forward
        self.seconds = 0.0
        self.decoder = MAEDecoder(196, 1024, 768, 512, 8, 16).eval() if naive else None
        self.teacher.forward = self  # type: ignore[method-assign]

    def __call__(self, images, keep_idx=None, stop_after_block=None, return_blocks=()):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        if self.decoder is None:
            out = self.forward(
                images, keep_idx, stop_after_block=stop_after_block, return_blocks=return_blocks
            )
        else:
            out = self.forward(images, keep_idx, return_blocks=return_blocks)  # all blocks
            self.decoder(out.tokens, keep_idx, complement(keep_idx, 196))  # unused pixels
        self.seconds += time.perf_counter() - start
        return out


def build(
    teacher_keep_ratio: float, naive: bool
) -> tuple[DMAE, TimedTeacher, torch.optim.Optimizer]:
    torch.manual_seed(0)
    student = create_backbone("vit_base_patch16_224", 224)
    teacher = create_backbone("vit_large_patch16_224", 224)
    cfg = DmaeConfig(aligned_blocks=[[8, 17]], teacher_keep_ratio=teacher_keep_ratio)
    dmae = DMAE(student, teacher, cfg, MaskingConfig(0.25, "random"), 224)
    optimizer = torch.optim.AdamW(dmae.param_groups(), lr=1e-4, betas=(0.9, 0.95))
    return dmae, TimedTeacher(dmae, naive), optimizer


def step(dmae: DMAE, timer: TimedTeacher, optimizer, images, index: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    timer.seconds = 0.0
    start = time.perf_counter()
    out = dmae([images], StepState(index, 0, torch.Generator().manual_seed(index)))
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    return time.perf_counter() - start, timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    images = torch.randn(args.batch, 3, 224, 224)
    variants = {
        "naive (full teacher + decoder)": build(1.0, naive=True),
        "ours (blocks 0..17, no decoder)": build(1.0, naive=False),
        "ours, teacher_keep_ratio 0.5": build(0.5, naive=False),
    }
    for dmae, timer, optimizer in variants.values():  # warm-up
        step(dmae, timer, optimizer, images, 0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for index in range(1, args.steps + 1):
        for name, (dmae, timer, optimizer) in variants.items():
            times[name].append(step(dmae, timer, optimizer, images, index))
    rows = {}
    for name, values in times.items():
        rows[name] = {
            "step_s": statistics.median(v[0] for v in values),
            "teacher_s": statistics.median(v[1] for v in values),
        }
    naive = rows["naive (full teacher + decoder)"]
    print(f"# DMAE step, ViT-B/16 ← ViT-L/16, batch {args.batch}, 224 px, 25% visible, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")  # fmt: skip
    print("| variant | step s | teacher s | teacher / naive | step speed-up |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        teacher_ratio = row["teacher_s"] / naive["teacher_s"]
        speedup = naive["step_s"] / row["step_s"]
        print(
            f"| {name} | {row['step_s']:.2f} | {row['teacher_s']:.2f} | "
            f"{teacher_ratio:.2f} | {speedup:.2f}× |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
