"""Does masking the teacher cost representation quality? A study on the bundled digits.

    .venv/bin/python eval/bench/learning.py [--quick] [--seeds 0 1 2] [--workdir runs/learning]

For each seed (the seed of the weights, the augmentations and the held-out split), it trains
and then evaluates the backbone each method hands over (DINO: the EMA teacher; MAE/DMAE: the
encoder) with k-NN (k = 20, T = 0.07, DINO's protocol) and a linear probe on frozen features
(DINO's protocol for DINO rows, MAE's BatchNorm + LARS protocol for MAE rows; last epoch):

- random init of each architecture (no training);
- DINO with the teacher at keep 1.0, 0.66 and 0.5 of the patches, chosen by the student's
  last-block [CLS] attention (MaskedKD), and at keep 0.5 chosen at random and by the lowest
  attention (`attention_bottomk`), all from configs/demo.yaml at 16 px (4×4 patches of 4 px,
  local crops 8 px) so that one run takes about a minute on a 2-core CPU;
- MAE alone and DMAE (the same student and steps, plus feature alignment to a frozen MAE
  teacher that sees the student's visible patches and stops at the aligned block), from
  configs/demo_dmae.yaml; the teacher is pretrained once (configs/demo_mae_teacher.yaml, seed 0)
  and shared by every seed, its cost reported on its own row.

Writes a Markdown table (mean ± sample std over seeds) with the exact command and machine to
`--results` (default eval/bench/RESULTS.md; with `--quick`, the work dir) and every run's
numbers to `learning.json` beside it. `--quick`: one seed and short schedules, a smoke run of
a few minutes whose numbers say little.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import aggregate as report_aggregate
from report import fmt, machine, write_section

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "eval" / "bench" / "RESULTS.md"

# DINO at 16 px: the digits are 8×8, so 4×4 patches of 4 px still cover 2×2 source pixels each;
# a run costs a quarter of the demo's 32 px and learns more per second (k-NN 64.7 vs 50.3 after
# 85 s vs 102 s of training, seed 0, keep 0.5).
DINO_BASE = ["model.img_size=16", "data.global_crop_size=16", "data.local_crop_size=8"]
DINO_SCHEDULE = {"full": ["train.epochs=20", "optim.warmup_epochs=2"],
                 "quick": ["train.epochs=3", "optim.warmup_epochs=1"]}  # fmt: skip
MAE_SCHEDULE = {"full": ["train.epochs=20", "optim.warmup_epochs=2"],
                "quick": ["train.epochs=2", "optim.warmup_epochs=1"]}  # fmt: skip
TEACHER_SCHEDULE = {"full": ["train.epochs=30"], "quick": ["train.epochs=2"]}
# Base learning rates (per 256 images) of the linear probe. The ImageNet defaults (SGD 1e-3,
# LARS 0.1) underfit in the ~600 steps of 100 epochs on 1,437 digits; these were chosen once
# from {1e-3, 0.03, 0.3, 3} and {0.1, 1, 10, 30, 100} on one pilot run per protocol (seed 0's
# held-out split: a DINO keep-0.5 run and the MAE teacher) and are fixed for every row.
PROBE_LR = {"dino": 0.3, "mae": 100.0}
NO_TRAINER_EVAL = ["eval.knn_at_end=false", "eval.knn_random_init=false", "eval.knn_every_epochs=0"]


@dataclass
class Row:
    name: str
    config: str  # under configs/
    overrides: list[str] = field(default_factory=list)
    protocol: str = "dino"  # linear-probe protocol
    train: bool = True
    group: str = "dino"  # which schedule; "teacher": trained once, seed 0


def dino_row(name: str, keep: float, strategy: str = "attention_topk") -> Row:
    masking = [f"masking.keep_ratio={keep}", f"masking.strategy={strategy}"]
    return Row(name, "demo.yaml", DINO_BASE + masking)


ROWS = [
    Row("random init (DINO's ViT, 16 px)", "demo.yaml", DINO_BASE, train=False),
    dino_row("DINO, keep 1.0 (plain)", 1.0),
    dino_row("DINO, keep 0.66, student-guided", 0.66),
    dino_row("DINO, keep 0.5, student-guided", 0.5),
    dino_row("DINO, keep 0.5, random", 0.5, "random"),
    dino_row("DINO, keep 0.5, attention_bottomk", 0.5, "attention_bottomk"),
    Row("random init (MAE student's ViT)", "demo_dmae.yaml", ["method=mae"], "mae", False, "mae"),
    Row("MAE alone", "demo_dmae.yaml", ["method=mae"], "mae", group="mae"),
    Row("DMAE ← MAE teacher", "demo_dmae.yaml", [], "mae", group="mae"),
]
TEACHER = Row("MAE teacher (pretrained once, seed 0)", "demo_mae_teacher.yaml", [], "mae",
              group="teacher")  # fmt: skip


def overrides_of(row: Row, seed: int, mode: str, workdir: Path, teacher_ckpt: Path) -> list[str]:
    schedule = {"dino": DINO_SCHEDULE, "mae": MAE_SCHEDULE, "teacher": TEACHER_SCHEDULE}
    extra = [f"dmae.teacher_checkpoint={teacher_ckpt}"] if row.name.startswith("DMAE") else []
    return [
        *row.overrides,
        *schedule[row.group][mode],
        *extra,
        *NO_TRAINER_EVAL,
        f"train.seed={seed}",
        f"output_dir={run_dir(workdir, row, seed)}",
    ]


def run_dir(workdir: Path, row: Row, seed: int) -> Path:
    slug = "".join(c if c.isalnum() or c == "." else "_" for c in row.name.lower()).strip("_")
    return workdir / f"{slug}" / f"seed{seed}"


def evaluate(backbone: Any, protocol: str, seed: int, quick: bool) -> dict[str, float]:
    """k-NN (k = 20) and linear-probe top-1 on the digits split held out for this seed."""
    from ssl_kd.data.splits import eval_splits
    from ssl_kd.evaluation.knn import evaluate_knn
    from ssl_kd.evaluation.linear import LinearProbeConfig, linear_probe

    img_size = backbone.vit.patch_embed.img_size[0]
    splits = eval_splits("digits", img_size, seed=seed)
    knn = evaluate_knn(backbone, splits, ks=(20,), progress=False)[20]
    probe = LinearProbeConfig(
        protocol=protocol, epochs=10 if quick else 100, lr=PROBE_LR[protocol], seed=seed
    )
    linear, _ = linear_probe(backbone, splits, probe, progress=False)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


def run_one(row: Row, seed: int, mode: str, workdir: Path, teacher_ckpt: Path) -> dict[str, Any]:
    from ssl_kd.engine.build import build_backbone
    from ssl_kd.engine.trainer import train
    from ssl_kd.evaluation.loading import load_backbone
    from ssl_kd.run_config import load_config

    cfg = load_config(
        REPO / "configs" / row.config, overrides_of(row, seed, mode, workdir, teacher_ckpt)
    )
    record: dict[str, Any] = {"row": row.name, "seed": seed}
    if row.train:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "study.log").open("w") as log, contextlib.redirect_stdout(log):
            summary = train(cfg, overwrite=True)
        backbone, _ = load_backbone(out / "checkpoint.pth")
        record.update(
            steps=summary["steps"],
            teacher_pflops=summary["teacher_pflops"],
            teacher_pflops_unmasked=summary["teacher_pflops_unmasked"],
            wall_s=summary["wall_s"],
        )
    else:
        torch.manual_seed(seed)
        backbone = build_backbone(cfg)
        record.update(steps=0, teacher_pflops=0.0, teacher_pflops_unmasked=0.0, wall_s=0.0)
    record.update(evaluate(backbone, row.protocol, seed, mode == "quick"))
    return record


def aggregate(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One line per row name, in `names` order: mean ± std of each number over its seeds."""
    return report_aggregate(
        records,
        names,
        ("knn_top1", "linear_top1", "teacher_pflops", "teacher_pflops_unmasked", "wall_s", "steps"),
    )


def markdown(lines: list[dict[str, Any]], command: str, mode: str, wall_s: float) -> str:
    plain = next(line for line in lines if line["row"].startswith("DINO, keep 1.0"))
    out = [
        "# Learning-quality study: does masking the teacher cost quality?",
        "",
        f"Produced by `{command}` ({mode} mode) on {datetime.date.today().isoformat()}, "
        f"in {wall_s / 60:.1f} min on: {machine()}.",
        "",
        "Bundled scikit-learn digits; each seed draws its own weights, augmentations and 20% "
        "held-out split (so the std also covers the split). k-NN: k = 20, T = 0.07 on the "
        "backbone each method hands over (DINO: the EMA teacher; MAE/DMAE: the encoder). "
        "Linear: frozen features, last epoch (DINO protocol: last 4 [CLS], SGD, base lr "
        f"{PROBE_LR['dino']:g}; MAE protocol: BatchNorm + linear, LARS, base lr "
        f"{PROBE_LR['mae']:g}; 100 epochs; the rates picked once on a pilot run, see the "
        "script). Teacher PFLOPs: the teacher's "
        "forward passes of the whole run (2 FLOPs per multiply-add). Wall: training only. "
        "Δ: difference of the means to DINO at keep 1.0.",
        "",
        "| run | seeds | k-NN top-1 | linear top-1 | Δ k-NN | Δ linear | teacher PFLOPs | "
        "teacher vs unmasked | steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        dino = line["row"].startswith("DINO")
        delta = (
            (
                f"{line['knn_top1'][0] - plain['knn_top1'][0]:+.1f}",
                f"{line['linear_top1'][0] - plain['linear_top1'][0]:+.1f}",
            )
            if dino
            else ("", "")
        )
        pflops, unmasked = line["teacher_pflops"][0], line["teacher_pflops_unmasked"][0]
        ratio = f"{pflops / unmasked:.3f}" if unmasked > 0 else ""
        out.append(
            f"| {line['row']} | {len(line['seeds'])} | {fmt(line['knn_top1'])} | "
            f"{fmt(line['linear_top1'])} | {delta[0]} | {delta[1]} | "
            f"{pflops:.5f} | {ratio} | {line['steps'][0]:.0f} | {line['wall_s'][0]:.0f} |"
        )
    out += ["", "Recipes (overrides on top of the named config; `train.seed` and "
            "`output_dir` vary per run):", ""]  # fmt: skip
    mode_key = "quick" if mode == "quick" else "full"
    for row in [*ROWS, TEACHER]:
        schedule = {"dino": DINO_SCHEDULE, "mae": MAE_SCHEDULE, "teacher": TEACHER_SCHEDULE}
        args = [*row.overrides, *(schedule[row.group][mode_key] if row.train else [])]
        out.append(f"- {row.name}: `configs/{row.config}` {' '.join(args)}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short schedules (smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/learning[_quick]")
    parser.add_argument("--results", type=Path, default=None, help="Markdown file to write")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    workdir = args.workdir or REPO / "runs" / ("learning_quick" if args.quick else "learning")
    results = args.results or (workdir / "RESULTS.md" if args.quick else DEFAULT_RESULTS)
    command = shlex.join(["python", "eval/bench/learning.py", *sys.argv[1:]])

    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    teacher = run_one(TEACHER, 0, mode, workdir, Path())
    records.append(teacher)
    teacher_ckpt = run_dir(workdir, TEACHER, 0) / "checkpoint.pth"
    print(f"{TEACHER.name}: k-NN {teacher['knn_top1']:.1f}, linear {teacher['linear_top1']:.1f}")
    for seed in seeds:
        for row in ROWS:
            record = run_one(row, seed, mode, workdir, teacher_ckpt)
            records.append(record)
            print(
                f"seed {seed} {row.name}: k-NN {record['knn_top1']:.1f}, linear "
                f"{record['linear_top1']:.1f}, teacher {record['teacher_pflops']:.5f} PFLOPs, "
                f"{record['wall_s']:.0f} s ({(time.perf_counter() - start) / 60:.1f} min so far)",
                flush=True,
            )
    lines = aggregate(records, [row.name for row in ROWS] + [TEACHER.name])
    results.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(lines, command, mode, time.perf_counter() - start)
    write_section(results, "learning", text)
    (results.parent / "learning.json").write_text(json.dumps(records, indent=2) + "\n")
    print(text)
    print(f"written: {results}")


if __name__ == "__main__":
    main()
