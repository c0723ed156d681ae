"""The GPU section of the DINO step benchmark: img/s, model-FLOPs utilisation and peak memory.

    .venv/bin/python eval/bench/dino_step.py --gpu [--batch 64 128] [--rounds 20]
        [--no-compile] [--peak-tflops T] [--json OUT]

(or this file with the same flags, `--gpu` left out). The step of eval/bench/dino_step.py on one
CUDA GPU: ViT-S/16 student and EMA teacher, 2 global views at 224 px and 8 local views at 96 px,
DINO head 2048-256-65536, bf16 autocast, batch 64 and 128 per GPU (one table each; `--batch N`
runs only N). Variants, all fed the same input tensors:

- reference: lightly's DINO example step (`dino_step.ReferenceStep`), eager, with bf16 autocast
  around its forwards and loss as torch's AMP recipe places it (bf16 needs no GradScaler);
- ssl_kd keep 1.0 and keep 0.5: `Trainer.train_step` of configs/dino_vit_s16.yaml with
  `train.amp=true` (bf16 autocast around the method's forward and loss);
- ssl_kd keep 1.0 compiled and keep 0.5 compiled: the same with `train.compile=true`. On by
  default, since the issue asks for them; a variant compiles in its first warm-up step, whose
  time is reported ("first step s"); `--no-compile` leaves them out.

Each variant is built and warmed up (3 steps) in turn; then the variants run round-robin, one
step each per round, so drift hits all alike. Step times are CUDA-synchronised (device idle
before, finished after) and medians are reported; "vs reference" is the median over rounds of the
reference's step time / the variant's in the same round. Model FLOPs per step (`step_tflops`,
counted by torch's flop counter): student forward and backward over every view, teacher forward
over the global views at its keep ratio, attention and head included; the reference does the
work of keep 1.0 and is given its count, a compiled variant its eager twin's. MFU = model FLOPs /
step time / the device's dense bf16 peak (`PEAK_BF16_TFLOPS` by device name, or
`--peak-tflops`). Peak GiB: the variant's own, as eval/bench/device_clock.py measures it (what it
holds between steps plus its steps' highest transient; the inputs aside). A variant that runs out
of memory reports OOM in its row and is dropped, its memory freed; the others go on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_clock import allocated, or_oom, release, timed
from dino_step import OUT_DIM, ReferenceStep, SslKdStep, make_views, parse_variant

BATCHES = (64, 128)
EAGER = ("reference", "ssl_kd keep 1.0", "ssl_kd keep 0.5")
COMPILED = ("ssl_kd keep 1.0 compiled", "ssl_kd keep 0.5 compiled")
WARMUP_STEPS = 3
# Dense bf16 peak of the device (vendor data sheets), for model-FLOPs utilisation; the first
# name found in the device's name wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class Workload:
    """One step's model and views: ssl_kd overrides on top of configs/dino_vit_s16.yaml, the
    same model as `ReferenceStep` arguments, and the crops (which the overrides must match)."""

    overrides: tuple[str, ...] = ()
    reference: dict[str, Any] = field(default_factory=dict)
    global_size: int = 224
    local_size: int = 96
    num_local: int = 8
    label: str = f"ViT-S/16, 2×224 + 8×96 crops, head 2048-256-{OUT_DIM}"


def step_tflops(step: SslKdStep, batch: int) -> float:
    """Model FLOPs of one step: student forward + backward (3× forward) over every view,
    teacher forward over the global views at its keep ratio; attention and head included."""
    from ssl_kd.flops import forward_macs
    from ssl_kd.masking import num_kept

    method, data = step.trainer.method, step.trainer.cfg.data
    student = 2 * forward_macs(method.student, data.global_crop_size) + (
        data.num_local_views * forward_macs(method.student, data.local_crop_size)
    )
    keep = num_kept(method.grid[0] * method.grid[1], step.trainer.cfg.masking.keep_ratio)
    teacher = 2 * method.teacher_macs_per_view(keep)
    return 2 * batch * (3 * student + teacher) / 1e12


def build(  # type: ignore[no-untyped-def]
    name: str, batch: int, output_dir: str, workload: Workload, device: str, amp: bool
):
    """A variant by its name: "reference" or "ssl_kd keep R[ compiled]"."""
    if name == "reference":
        return ReferenceStep(**workload.reference, device=device, amp=amp)
    keep_ratio, compiled = parse_variant(name)
    overrides = [f"train.device={device}", f"train.amp={str(amp).lower()}", *workload.overrides]
    overrides += ["train.compile=true"] if compiled else []
    return SslKdStep(keep_ratio, batch, f"{output_dir}/{'_'.join(name.split()[2:])}", overrides)


def warm_up(step: Any, views: list[torch.Tensor], device: torch.device) -> float | None:
    """`WARMUP_STEPS` steps (kernels, allocator, compilation): the first one's seconds, or None
    when one ran out of memory."""
    seconds = []
    for _ in range(WARMUP_STEPS):
        result = or_oom(partial(timed, partial(step, views), device))
        if result is None:
            return None
        seconds.append(result[0])
    return seconds[0]


def run_batch(
    batch: int, variants: Sequence[str], rounds: int, workload: Workload, device: torch.device,
    amp: bool, output_dir: str,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each variant's row at `batch` (without MFU); OOM rows say where memory ran out."""
    views = make_views(batch, workload.global_size, workload.local_size, workload.num_local, device)
    steps: dict[str, Any] = {}
    oom: dict[str, str] = {}
    tflops: dict[str, float] = {}
    resident: dict[str, int] = {}
    first_step_s: dict[str, float] = {}
    for name in variants:  # one at a time: a compiled variant compiles in its first step
        before = allocated(device)
        step = or_oom(partial(build, name, batch, output_dir, workload, device.type, amp))
        if step is not None and name in ("ssl_kd keep 1.0", "ssl_kd keep 0.5"):
            # counted eagerly: under the flop counter a compiled forward would compile again
            tflops[name] = step_tflops(step, batch)
        first = None if step is None else warm_up(step, views, device)
        if step is None or first is None:
            oom[name] = "build" if step is None else "warm-up"
            del step
            release(device)
            continue
        steps[name] = step
        resident[name] = allocated(device) - before
        first_step_s[name] = first

    times: dict[str, list[float]] = {name: [] for name in steps}
    transient: dict[str, int | None] = dict.fromkeys(steps, 0)
    for index in range(rounds):
        for name in list(steps):
            result = or_oom(partial(timed, partial(steps[name], views), device))
            if result is None:
                oom[name] = f"round {index + 1}"
                del steps[name], times[name]
                release(device)
                continue
            seconds, extra = result
            times[name].append(seconds)
            peak = transient[name]
            transient[name] = None if extra is None or peak is None else max(peak, extra)
    del steps, views
    release(device)

    rows: dict[str, dict[str, Any]] = {}
    reference = times.get("reference")
    for name in variants:
        if name in oom:
            rows[name] = {"oom": oom[name]}
            continue
        step_s = statistics.median(times[name])
        twin = "ssl_kd keep 1.0" if name == "reference" else name.removesuffix(" compiled")
        extra = transient[name]
        rows[name] = {
            "oom": None,
            "step_s": step_s,
            "images_per_s": batch / step_s,
            "first_step_s": first_step_s[name],
            "model_tflops_per_step": tflops.get(twin),
            "peak_memory_gib": None if extra is None else (resident[name] + extra) / 2**30,
            # Paired by round: drift that slows one round slows both steps of the pair.
            "speed_vs_reference": None if reference is None else statistics.median(
                r / t for r, t in zip(reference, times[name], strict=True)
            ),
        }  # fmt: skip
    return rows


def gpu_section(
    batches: Sequence[int] = BATCHES,
    rounds: int = 20,
    *,
    compile: bool = True,
    peak_tflops: float | None = None,
    device: str = "cuda",
    amp: bool = True,
    workload: Workload | None = None,
) -> dict[str, Any]:
    """Rows per batch (`result["batches"]["64"]["ssl_kd keep 0.5"]`) and the device's name and
    bf16 peak; prints one table per batch. `device`, `amp` and `workload` let a test run the
    whole section on CPU with a tiny model, where peak memory is None."""
    where = torch.device(device)
    workload = workload or Workload()
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else device
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    variants = EAGER + (COMPILED if compile else ())
    if compile:
        # Compiled variants bring graphs of their own (student, teacher, keep 0.5's [CLS]
        # attention stop), which other variants and batches may not share; past dynamo's limit
        # (8 per function) one would run eager with only a warning, its row mislabelled.
        torch._dynamo.config.recompile_limit = 64
    result: dict[str, Any] = {"device": name, "peak_bf16_tflops": peak, "batches": {}}
    for batch in batches:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_batch(batch, variants, rounds, workload, where, amp, tmp)
        for row in rows.values():
            if row["oom"]:
                continue
            tflops = row["model_tflops_per_step"]
            achieved = None if tflops is None else tflops / row["step_s"]
            row["achieved_tflops"] = achieved
            row["mfu"] = None if achieved is None or peak is None else achieved / peak
        result["batches"][str(batch)] = rows
        print_table(batch, rows, name, peak, rounds, amp, workload)
    return result


def print_table(
    batch: int, rows: dict[str, dict[str, Any]], device: str, peak: float | None, rounds: int,
    amp: bool, workload: Workload,
) -> None:  # fmt: skip
    def number(value: float | None, spec: str, unit: str = "") -> str:
        return "-" if value is None else format(value, spec) + unit

    print(f"\n# DINO step on {device}, {workload.label}, batch {batch}, "
          f"{'bf16 autocast' if amp else 'fp32'}, median of {rounds} interleaved rounds; MFU "
          f"against {peak or 'an unknown'} dense bf16 TFLOP/s")  # fmt: skip
    print("| variant | step s | img/s | vs reference | model TFLOPs/step | achieved TFLOP/s | "
          "MFU | peak GiB | first step s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if row["oom"]:
            print(f"| {name} | OOM ({row['oom']}) |" + " - |" * 7)
            continue
        print(f"| {name} | {row['step_s']:.3f} | {row['images_per_s']:.0f} | "
              f"{number(row['speed_vs_reference'], '.3f', '×')} | "
              f"{number(row['model_tflops_per_step'], '.2f')} | "
              f"{number(row['achieved_tflops'], '.0f')} | {number(row['mfu'], '.1%')} | "
              f"{number(row['peak_memory_gib'], '.1f')} | {row['first_step_s']:.1f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the train.compile=true variants (default: on)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="device's bf16 peak")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "no CUDA device: the GPU section needs one (dino_step.py without --gpu "
                       "runs the CPU comparison)\n")  # fmt: skip
    result = gpu_section(
        args.batch, args.rounds, compile=args.compile, peak_tflops=args.peak_tflops
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
