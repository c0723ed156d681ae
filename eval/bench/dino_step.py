"""One DINO training step: ssl_kd (keep 1.0, 0.66, 0.5) against lightly's example, in one run.

    .venv/bin/python eval/bench/dino_step.py [--batch 16] [--rounds 5] [--json OUT]

ViT-S/16 student and EMA teacher, 2 global views at 224 px and 8 local views at 96 px, DINO head
2048-256-65536, batch 16, CPU, fp32. The same input tensors go to every variant:

- reference: the step as lightly's DINO example (examples/pytorch/dino.py) assembles it from
  lightly's public parts, with a timm ViT as its comment suggests: `DINOProjectionHead`s,
  `deactivate_requires_grad` on the teacher, one forward per view, `DINOLoss(..., epoch=)`,
  `cancel_last_layer_gradients`, `update_momentum` of backbone and head. Same optimizer as ours
  (AdamW; the example's Adam costs the same), same drop path (0.1);
- ssl_kd at keep 1.0, 0.66, 0.5: `Trainer.train_step` of configs/dino_vit_s16.yaml (what a
  user runs: schedules, per-parameter clipping, the NaN guard, the EMA), the teacher fed the
  top-k patches of the student's last-block [CLS] attention when keep < 1.

Variants run round-robin (one step each per round) after a warm-up step, so drift hits all alike;
medians are reported, and a variant's saving is the median over rounds of 1 − its step time / keep
1.0's step time in the same round. Peak memory: each variant again in a fresh process (peak RSS
after building it and after 2 steps). Targets (issue 7): (a) ssl_kd at keep 1.0 reaches ≥ 0.95× the
reference's steps/s; (b) at keep r it saves at least 90% of what the teacher's share predicts, i.e.
saving ≥ 0.9 · teacher share at keep 1.0 · (1 − teacher GMAC ratio at r). `--compile` adds keep
1.0 and 0.5 with `train.compile=true` to the same rounds (their warm-up step compiles; its time is
reported), each compared with its eager twin round by round.

`--gpu` runs the GPU section instead, eval/bench/dino_step_gpu.py (its docstring and `--help`):
img/s, model-FLOPs utilisation and peak memory at batch 64 and 128, bf16, eager and compiled,
against the reference on the same GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
KEEP_RATIOS = (1.0, 0.66, 0.5)
VARIANTS = ("reference", *(f"ssl_kd keep {r}" for r in KEEP_RATIOS))
COMPILED = ("ssl_kd keep 1.0 compiled", "ssl_kd keep 0.5 compiled")  # `--compile` adds these
OUT_DIM = 65536


# --- the reference: lightly's DINO example with a timm ViT-S/16 ------------------------------
class LightlyDINO(nn.Module):
    def __init__(self, backbone: nn.Module, input_dim: int, head_dims: tuple[int, int, int]):
        super().__init__()
        self.student_backbone = backbone
        self.student_head = self._head(input_dim, head_dims, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = self._head(input_dim, head_dims, freeze_last_layer=-1)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    @staticmethod
    def _head(
        input_dim: int, dims: tuple[int, int, int], freeze_last_layer: int
    ) -> DINOProjectionHead:
        with warnings.catch_warnings():  # lightly still uses the old weight_norm API
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            return DINOProjectionHead(
                input_dim, *dims, norm_last_layer=False, freeze_last_layer=freeze_last_layer
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


class ReferenceStep:
    """lightly's example loop body; `model_kwargs` go to `timm.create_model`.

    On `device`; `amp`: bf16 autocast around the forwards and the loss only, as torch's AMP
    recipe places it (bf16 keeps fp32's range, so no GradScaler)."""

    def __init__(
        self,
        model: str = "vit_small_patch16_224",
        head_dims: tuple[int, int, int] = (2048, 256, OUT_DIM),
        drop_path_rate: float = 0.1,
        device: str | torch.device = "cpu",
        amp: bool = False,
        **model_kwargs: Any,
    ) -> None:
        torch.manual_seed(0)
        backbone = timm.create_model(
            model, num_classes=0, drop_path_rate=drop_path_rate, dynamic_img_size=True,
            **model_kwargs,
        )  # fmt: skip
        self.device = torch.device(device)
        self.amp = amp
        self.model = LightlyDINO(backbone, backbone.embed_dim, head_dims).to(self.device)
        self.criterion = DINOLoss(output_dim=head_dims[-1], warmup_teacher_temp_epochs=0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4)
        self.teacher_s = 0.0
        self.last_loss = float("nan")

    def __call__(self, views: list[Tensor]) -> None:
        model, epoch = self.model, 1
        views = [view.to(self.device, non_blocking=True) for view in views]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            start = time.perf_counter()  # host time: on a GPU, the launches only
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            self.teacher_s = time.perf_counter() - start
            student_out = [model.forward(view) for view in views]
            loss = self.criterion(teacher_out, student_out, epoch=epoch)
        self.last_loss = loss.item()
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        self.optimizer.step()
        self.optimizer.zero_grad()
        update_momentum(model.student_backbone, model.teacher_backbone, m=0.996)
        update_momentum(model.student_head, model.teacher_head, m=0.996)


# --- ssl_kd: the trainer's own step ---------------------------------------------------------
class SslKdStep:
    def __init__(
        self, keep_ratio: float, batch: int, output_dir: str, overrides: Sequence[str] = ()
    ) -> None:
        from ssl_kd.engine.trainer import Trainer
        from ssl_kd.run_config import load_config

        overrides = [
            f"output_dir={output_dir}", "data.name=digits", "data.transform=batched",
            "data.num_workers=0", f"train.batch_size={batch}", f"masking.keep_ratio={keep_ratio}",
            "masking.strategy=attention_topk", "train.device=cpu", "eval.knn_at_end=false",
            # as the reference's head (and the README's measured rows): the last layer's norm trains
            "dino.norm_last_layer=false",
            # as the reference's timm ViT: local crops resample the position embedding timm's way
            "model.pos_embed_interpolation=timm",
            *overrides,
        ]  # fmt: skip
        cfg = load_config(REPO / "configs" / "dino_vit_s16.yaml", overrides)
        self.trainer = Trainer(cfg)
        self.trainer.method.train()
        self.trainer.step = self.trainer.steps_per_epoch  # past the frozen-last-layer epoch
        teacher = self.trainer.method.teacher
        self._teacher_forward = teacher.forward
        teacher.forward = self._timed_teacher  # type: ignore[method-assign]
        self.teacher_s = 0.0
        self.teacher_macs = 0.0
        self.teacher_macs_unmasked = 0.0
        self.last_loss = float("nan")

    def _timed_teacher(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = self._teacher_forward(*args, **kwargs)
        self.teacher_s = time.perf_counter() - start
        return out

    def __call__(self, views: list[Tensor]) -> None:
        totals = self.trainer.totals
        before = dict(totals)
        metrics = self.trainer.train_step(views)
        self.last_loss = float(metrics["dino_loss"])
        self.teacher_macs = totals["teacher_macs"] - before["teacher_macs"]
        self.teacher_macs_unmasked = (
            totals["teacher_macs_unmasked"] - before["teacher_macs_unmasked"]
        )


def make_views(
    batch: int, global_size: int = 224, local_size: int = 96, num_local: int = 8,
    device: str | torch.device = "cpu",
) -> list[Tensor]:  # fmt: skip
    """2 global views [B, 3, global_size²] and `num_local` local ones, the same every call."""
    generator = torch.Generator().manual_seed(0)
    sizes = [global_size] * 2 + [local_size] * num_local
    return [torch.randn(batch, 3, s, s, generator=generator).to(device) for s in sizes]


def build(name: str, batch: int, output_dir: str):  # type: ignore[no-untyped-def]
    """A variant by its name: "reference" or "ssl_kd keep R[ compiled]"."""
    if name == "reference":
        return ReferenceStep()
    keep_ratio, compiled = parse_variant(name)
    overrides = ["train.compile=true"] if compiled else []
    return SslKdStep(keep_ratio, batch, f"{output_dir}/{'_'.join(name.split()[2:])}", overrides)


def parse_variant(name: str) -> tuple[float, bool]:
    """ "ssl_kd keep R[ compiled]" → (R, compiled)."""
    words = name.split()
    return float(words[2]), words[-1] == "compiled"


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM of its own address space; ru_maxrss would carry
    the launching process's peak across exec, so every fresh worker reported the parent's."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    scale = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def memory_of(name: str, batch: int) -> dict[str, float]:
    """Peak RSS of a fresh process that builds one variant, then after 2 steps of it."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", name, "--batch", str(batch)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_worker(name: str, batch: int) -> None:
    views = make_views(batch)
    with tempfile.TemporaryDirectory() as tmp:
        step = build(name, batch, tmp)
        built = peak_rss_mib()
        for _ in range(2):
            step(views)
    print(json.dumps({"built_mib": built, "peak_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU section: eval/bench/dino_step_gpu.py, given the other flags (its --help)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also keep 1.0 and 0.5 with train.compile=true, side by side",
    )
    if "--gpu" in sys.argv[1:]:  # before parsing: the GPU section has flags of its own
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import dino_step_gpu

        dino_step_gpu.main([arg for arg in sys.argv[1:] if arg != "--gpu"])
        return
    args = parser.parse_args()
    if args.memory_of:
        memory_worker(args.memory_of, args.batch)
        return

    views = make_views(args.batch)
    variants = VARIANTS + (COMPILED if args.compile else ())
    with tempfile.TemporaryDirectory() as tmp:
        steps = {name: build(name, args.batch, tmp) for name in variants}
        compile_s = {}
        for name, step in steps.items():  # warm-up (a compiled variant compiles here)
            start = time.perf_counter()
            step(views)
            compile_s[name] = time.perf_counter() - start
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step(views)
                times[name].append((time.perf_counter() - start, step.teacher_s))

    rows: dict[str, dict[str, float]] = {}
    full_times = [v[0] for v in times["ssl_kd keep 1.0"]]
    for name, values in times.items():
        steps_s = [v[0] for v in values]
        rows[name] = {
            "step_s": statistics.median(steps_s),
            "step_min_s": min(steps_s),
            "step_max_s": max(steps_s),
            "teacher_s": statistics.median(v[1] for v in values),
        }
        # the spread of the speed-up: the reference's step / this one's, round by round
        speedups = [r[0] / v for r, v in zip(times["reference"], steps_s, strict=True)]
        rows[name].update(vs_reference_min=min(speedups), vs_reference_max=max(speedups))
        if name != "reference":
            step = steps[name]
            rows[name]["teacher_gmac_ratio"] = step.teacher_macs / step.teacher_macs_unmasked
            # Paired by round: drift that slows one round slows both steps of the pair.
            rows[name]["saving"] = statistics.median(
                1 - v[0] / full for v, full in zip(values, full_times, strict=True)
            )
    for name in COMPILED if args.compile else ():
        eager = [v[0] for v in times[name.removesuffix(" compiled")]]
        rows[name]["first_step_s"] = compile_s[name]
        # Paired by round, as the savings: eager step time / compiled step time.
        rows[name]["speedup_vs_eager"] = statistics.median(
            e / v[0] for v, e in zip(times[name], eager, strict=True)
        )
    if not args.no_memory:
        for name in variants:
            rows[name].update(memory_of(name, args.batch))

    reference, full = rows["reference"], rows["ssl_kd keep 1.0"]
    share = full["teacher_s"] / full["step_s"]
    print(f"# DINO step, ViT-S/16, batch {args.batch}, 2×224 + 8×96 crops, head {OUT_DIM}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"teacher share of the ssl_kd step at keep 1.0: {share:.3f}")
    print("| variant | step s (min–max) | steps/s | vs reference (per-round min–max) | "
          "teacher s | teacher GMAC ratio | saving vs keep 1.0, paired (predicted) | "
          "peak RSS MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        speed = reference["step_s"] / row["step_s"]
        gmac = row.get("teacher_gmac_ratio")
        saving = predicted = None
        if gmac is not None:
            saving = row["saving"]
            predicted = share * (1 - gmac)
            row["predicted_saving"] = predicted
        row["speed_vs_reference"] = speed
        print(
            f"| {name} | {row['step_s']:.2f} ({row['step_min_s']:.2f}–{row['step_max_s']:.2f}) | "
            f"{1 / row['step_s']:.3f} | {speed:.3f}× ({row['vs_reference_min']:.3f}–"
            f"{row['vs_reference_max']:.3f}) | "
            f"{row['teacher_s']:.2f} | {'-' if gmac is None else f'{gmac:.3f}'} | "
            + ("-" if saving is None else f"{saving:+.1%} ({predicted:+.1%})")
            + f" | {row.get('peak_mib', float('nan')):.0f} |"
        )
    target_a = full["speed_vs_reference"] >= 0.95
    print(f"(a) keep 1.0 vs reference: {full['speed_vs_reference']:.3f}× (target ≥ 0.95): "
          f"{'met' if target_a else 'MISSED'}")  # fmt: skip
    for r in KEEP_RATIOS[1:]:
        row = rows[f"ssl_kd keep {r}"]
        met = row["saving"] >= 0.9 * row["predicted_saving"]
        print(f"(b) keep {r}: saved {row['saving']:.1%} of the step, predicted "
              f"{row['predicted_saving']:.1%} (target ≥ {0.9 * row['predicted_saving']:.1%}): "
              f"{'met' if met else 'MISSED'}")  # fmt: skip
    for name in COMPILED if args.compile else ():
        row = rows[name]
        print(f"{name}: {row['speedup_vs_eager']:.3f}× the eager step (paired by round); "
              f"first step, compile included, {row['first_step_s']:.0f} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
