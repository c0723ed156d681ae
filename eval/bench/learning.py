"""Does masking the teacher cost quality, and does it matter which patches it sees? A study on
the cluttered digits, where most patches hold no part of the digit.

    .venv/bin/python eval/bench/learning.py [--quick] [--seeds 0 1 2] [--workdir runs/learning]

For each seed (the seed of the weights, the augmentations and the held-out split):

- DINO on the cluttered digits (configs/demo.yaml's tiny ViT and head, the 64-px canvases read
  at 32 px with 8-px patches: 16 patches, of which the digit touches about a quarter), the
  EMA teacher scored by k-NN (k = 20, T = 0.07, DINO's protocol) and a linear probe on frozen
  features: random init; the teacher at keep 1.0; at keep 0.5 and 0.25 of the patches chosen
  by the student's last-block [CLS] attention (`attention_topk`, MaskedKD), at random, and the
  least attended (`attention_bottomk`); and the adaptive keep ratio (`masking.adaptive`,
  starting at 1.0, the default tolerance);
- supervised KD on the same images (configs/demo_kd.yaml's student from configs/
  demo_kd_teacher.yaml's teacher, trained per seed on that seed's split, both at 48 px: 36
  patches): the same nine keep ratios and strategies; the student's top-1 on the held-out split;
- MAE alone and DMAE (feature alignment to a frozen MAE teacher that sees the student's visible
  patches and stops at the aligned block) on the plain digits, configs/demo_dmae.yaml, scored
  like DINO (MAE's linear protocol); the MAE teacher is pretrained once (seed 0) and shared.

Writes its section of `--results` (default eval/bench/RESULTS.md; `--quick`: the work dir): mean
± sample std over seeds, the command and machine, the verdicts (strategies apart beyond one std at
keep 0.25; adaptive against the fixed ratios); every run's numbers go to `learning.json` beside
it. `--quick`: one seed, 1-2 epochs a run (a smoke run). `--reuse`: finished runs of the same
config are read back. `--calibrate`: eval/bench/calibration.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import aggregate, beyond_one_std, fmt, machine, train_run, write_section

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "eval" / "bench" / "RESULTS.md"

# DINO at 32 px (16 patches; the digit touches ~4): at 64 px a run costs ~4× and 3 seeds would not
# fit 45 min on 2 cores. Batch 64, 2 local views: more, smaller steps learn more per second here
# (k-NN 26.7 vs 23.3 after 20 epochs at batch 128, 4 views). KD at 48 px (36 patches): at 32 px
# the teacher reached 47% and its students stayed near chance (22%) in 20 epochs.
DINO_BASE = ["data.name=cluttered_digits", "model.img_size=32", "data.global_crop_size=32",
             "model.kwargs.patch_size=8", "data.local_crop_size=16", "data.num_local_views=2",
             "train.batch_size=64"]  # fmt: skip
KD_BASE = ["model.img_size=48", "data.global_crop_size=48"]  # configs/demo_kd*.yaml: clutter
SCHEDULES = {
    "dino": {"full": ["train.epochs=20", "optim.warmup_epochs=2"],
             "quick": ["train.epochs=2", "optim.warmup_epochs=1"]},
    "kd": {"full": ["train.epochs=20"], "quick": ["train.epochs=1"]},
    "kd_teacher": {"full": [], "quick": ["train.epochs=2"]},  # the config's 40 epochs
    "mae": {"full": ["train.epochs=20", "optim.warmup_epochs=2"],
            "quick": ["train.epochs=2", "optim.warmup_epochs=1"]},
    "mae_teacher": {"full": ["train.epochs=30"], "quick": ["train.epochs=2"]},
}  # fmt: skip
# Linear-probe base lrs (per 256 images): the ImageNet defaults underfit ~600 steps on 1,437 digits;
# picked once from {1e-3 .. 3} (SGD) and {0.1 .. 100} (LARS) on one pilot run each, fixed since.
PROBE_LR = {"dino": 0.3, "mae": 100.0}
NO_TRAINER_EVAL = ["eval.knn_at_end=false", "eval.knn_random_init=false", "eval.knn_every_epochs=0"]
STRATEGIES = ("attention_topk", "random", "attention_bottomk")


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # dino, kd, mae (and the teachers): which schedule and which table
    config: str  # under configs/
    overrides: tuple[str, ...] = ()
    train: bool = True
    keep: float | None = None  # the teacher's fixed keep ratio (None: adaptive or no teacher)
    strategy: str | None = None

    @property
    def protocol(self) -> str:
        """How the row is scored: k-NN + linear probe (dino, mae protocols) or the student's
        top-1 on the held-out split (classify)."""
        return {"dino": "dino", "mae": "mae", "mae_teacher": "mae"}.get(self.group, "classify")

    @property
    def adaptive(self) -> bool:
        return "masking.adaptive=true" in self.overrides


def masked_rows(group: str, config: str, base: list[str]) -> list[Row]:
    """Keep 1.0; keep 0.5 and 0.25 with each strategy; the adaptive keep ratio from 1.0."""
    label = {"dino": "DINO", "kd": "KD"}[group]
    rows = [Row(f"{label}, keep 1.0", group, config, (*base, "masking.keep_ratio=1.0"), keep=1.0)]
    for keep in (0.5, 0.25):
        for strategy in STRATEGIES:
            masking = (f"masking.keep_ratio={keep}", f"masking.strategy={strategy}")
            rows.append(Row(f"{label}, keep {keep}, {strategy}", group, config, (*base, *masking),
                            keep=keep, strategy=strategy))  # fmt: skip
    adaptive = ("masking.keep_ratio=1.0", "masking.adaptive=true")
    rows.append(Row(f"{label}, adaptive from 1.0", group, config, (*base, *adaptive)))
    return rows


KD_TEACHER = Row("KD teacher (per seed)", "kd_teacher", "demo_kd_teacher.yaml", tuple(KD_BASE))
MAE_TEACHER = Row("MAE teacher (pretrained once, seed 0)", "mae_teacher", "demo_mae_teacher.yaml")
ROWS = [
    Row("DINO, random init", "dino", "demo.yaml", tuple(DINO_BASE), train=False),
    *masked_rows("dino", "demo.yaml", DINO_BASE),
    *masked_rows("kd", "demo_kd.yaml", KD_BASE),
    Row("MAE, random init", "mae", "demo_dmae.yaml", ("method=mae",), train=False),
    Row("MAE alone", "mae", "demo_dmae.yaml", ("method=mae",)),
    Row("DMAE ← MAE teacher", "mae", "demo_dmae.yaml"),
]


def run_dir(workdir: Path, row: Row, seed: int) -> Path:
    slug = "".join(c if c.isalnum() or c == "." else "_" for c in row.name.lower()).strip("_")
    return workdir / f"{slug}" / f"seed{seed}"


def overrides_of(row: Row, seed: int, mode: str, workdir: Path) -> list[str]:
    teachers = {"kd": run_dir(workdir, KD_TEACHER, seed), "mae": run_dir(workdir, MAE_TEACHER, 0)}
    extra = []
    if row.group == "kd":
        extra = [f"kd.teacher_checkpoint={teachers['kd'] / 'checkpoint.pth'}"]
    elif "DMAE" in row.name:
        extra = [f"dmae.teacher_checkpoint={teachers['mae'] / 'checkpoint.pth'}"]
    return [
        *row.overrides,
        *SCHEDULES[row.group][mode],
        *extra,
        *NO_TRAINER_EVAL,
        f"train.seed={seed}",
        f"output_dir={run_dir(workdir, row, seed)}",
    ]


def evaluate(backbone: Any, protocol: str, seed: int, quick: bool, data: str) -> dict[str, float]:
    """k-NN (k = 20) and linear-probe top-1 on the split of `data` held out for this seed."""
    from ssl_kd.data.splits import eval_splits
    from ssl_kd.evaluation.knn import evaluate_knn
    from ssl_kd.evaluation.linear import LinearProbeConfig, linear_probe

    img_size = backbone.vit.patch_embed.img_size[0]
    splits = eval_splits(data, img_size, seed=seed)
    knn = evaluate_knn(backbone, splits, ks=(20,), progress=False)[20]
    probe = LinearProbeConfig(
        protocol=protocol, epochs=10 if quick else 100, lr=PROBE_LR[protocol], seed=seed
    )
    linear, _ = linear_probe(backbone, splits, probe, progress=False)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


def run_one(row: Row, seed: int, mode: str, workdir: Path, reuse: bool) -> dict[str, Any]:
    from ssl_kd.engine.build import build_backbone
    from ssl_kd.evaluation.loading import load_backbone
    from ssl_kd.run_config import load_config

    cfg = load_config(REPO / "configs" / row.config, overrides_of(row, seed, mode, workdir))
    record: dict[str, Any] = {"row": row.name, "seed": seed, "keep_mean": row.keep or 0.0}
    if row.train:
        summary = train_run(cfg, quiet=True, reuse=reuse)
        costs = ("steps", "teacher_pflops", "teacher_pflops_unmasked", "wall_s")
        record.update({key: summary[key] for key in costs})
        adaptive = summary.get("keep_ratio_adaptive")
        if adaptive:
            record.update(
                keep_mean=adaptive["mean"], keep_final=adaptive["final"],
                probe_share=adaptive["probe_share"], gap_mean=adaptive["gap_mean"],
            )  # fmt: skip
        if row.protocol == "classify":
            record["top1"] = summary["val_top1"]
            return record
        backbone, _ = load_backbone(Path(cfg.output_dir) / "checkpoint.pth")
    else:
        torch.manual_seed(seed)
        backbone = build_backbone(cfg)
        record.update(steps=0, teacher_pflops=0.0, teacher_pflops_unmasked=0.0, wall_s=0.0)
    record.update(evaluate(backbone, row.protocol, seed, mode == "quick", cfg.data.name))
    return record


NUMBERS = {
    "dino": ("knn_top1", "linear_top1"),
    "mae": ("knn_top1", "linear_top1"),
    "mae_teacher": ("knn_top1", "linear_top1"),
    "kd": ("top1",),
    "kd_teacher": ("top1",),
}
COSTS = ("teacher_pflops", "teacher_pflops_unmasked", "wall_s", "steps", "keep_mean")


def lines_of(records: list[dict[str, Any]], rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per row name: mean ± std over its seeds of its scores and costs."""
    lines = {}
    for row in rows:
        mine = [r for r in records if r["row"] == row.name]
        if mine:
            extra = ("keep_final", "probe_share", "gap_mean") if row.adaptive else ()
            (lines[row.name],) = aggregate(mine, [row.name], (*NUMBERS[row.group], *COSTS, *extra))
    return lines


def verdicts(lines: dict[str, dict[str, Any]], label: str, score: str) -> list[str]:
    """(a) top-k > random > bottom-k at keep 0.25, (b) the adaptive run against keep 1.0, said
    plainly for one group's score."""
    topk, rand, bottom = (lines.get(f"{label}, keep 0.25, {s}") for s in STRATEGIES)
    plain, adaptive = lines.get(f"{label}, keep 1.0"), lines.get(f"{label}, adaptive from 1.0")
    out = []
    if topk and rand and bottom:
        holds = {"top-k > random": beyond_one_std(topk, rand, score),
                 "random > bottom-k": beyond_one_std(rand, bottom, score)}  # fmt: skip
        said = "; ".join(f"{claim}: {'yes' if ok else 'no'}" for claim, ok in holds.items())
        means = ", ".join(fmt(line[score]) for line in (topk, rand, bottom))
        out.append(
            f"- {label} {score}, keep 0.25: top-k > random > bottom-k "
            f"{'holds' if all(holds.values()) else 'does not hold'} beyond one standard "
            f"deviation (top-k, random, bottom-k: {means}; {said})."
        )
    if plain and adaptive:
        (mean, _), (ref, ref_std) = adaptive[score], plain[score]
        share = adaptive["teacher_pflops"][0] / plain["teacher_pflops"][0]
        within = mean >= ref - ref_std
        out.append(
            f"- {label} {score}, adaptive from 1.0: {fmt(adaptive[score])} against "
            f"{fmt(plain[score])} at keep 1.0 ({mean - ref:+.1f}; "
            f"{'within' if within else 'not within'} one std of keep 1.0) at {share:.2f}× its "
            f"teacher PFLOPs, probes included (target ≤ 0.60: "
            f"{'met' if within and share <= 0.6 else 'missed'}); mean keep ratio "
            f"{fmt(adaptive['keep_mean'], 2)}, final {fmt(adaptive['keep_final'], 2)}."
        )
    return out


def table(lines: dict[str, dict[str, Any]], rows: list[Row], scores: tuple[str, ...]) -> list[str]:
    header = " | ".join(scores)
    out = [
        f"| run | seeds | {header} | teacher PFLOPs | vs keep 1.0 | mean keep | steps | wall s |",
        "|---" * (7 + len(scores)) + "|",
    ]
    plain = next((lines[r.name] for r in rows if r.keep == 1.0 and r.name in lines), None)
    for row in rows:
        line = lines.get(row.name)
        if line is None:
            continue
        pflops = line["teacher_pflops"][0]
        share = f"{pflops / plain['teacher_pflops'][0]:.3f}" if plain and pflops else ""
        keep = fmt(line["keep_mean"], 2) if row.adaptive else (f"{row.keep:g}" if row.keep else "")
        values = " | ".join(fmt(line[score]) for score in scores)
        out.append(
            f"| {row.name} | {len(line['seeds'])} | {values} | {pflops:.5f} | {share} | {keep} "
            f"| {line['steps'][0]:.0f} | {line['wall_s'][0]:.0f} |"
        )
    return out


def markdown(
    records: list[dict[str, Any]], command: str, mode: str, wall_s: float, parallel: str
) -> str:
    all_rows = [*ROWS, KD_TEACHER, MAE_TEACHER]
    lines = lines_of(records, all_rows)
    groups = {g: [r for r in ROWS if r.group == g] for g in ("dino", "kd", "mae")}
    kd_teacher, mae_teacher = lines.get(KD_TEACHER.name), lines.get(MAE_TEACHER.name)
    out = [
        "# Learning-quality study: which patches the teacher sees, and a keep ratio that finds "
        "itself",
        "",
        f"Produced by `{command}` ({mode} mode) on {datetime.date.today().isoformat()}, "
        f"in {wall_s / 60:.1f} min ({parallel}, each run in one process) on: {machine()}.",
        "",
        "Each seed draws its own weights, augmentations and 20% held-out split (so the std also "
        "covers the split). Teacher PFLOPs: the teacher's forward passes of the whole run, the "
        "adaptive runs' probes included (2 FLOPs per multiply-add); vs keep 1.0: the share of "
        "the same group's keep-1.0 row. Mean keep: the teacher's keep ratio averaged over the "
        "run's steps. Wall: training only. Adaptive rows: `masking.adaptive=true` from keep 1.0 "
        "with every other masking key at its default (no per-run tuning).",
        "",
        "## Verdicts",
        "",
        *verdicts(lines, "DINO", "knn_top1"),
        *verdicts(lines, "DINO", "linear_top1"),
        *verdicts(lines, "KD", "top1"),
        "",
        "## DINO on the cluttered digits (32 px, 16 patches)",
        "",
        "configs/demo.yaml's ViT (width 96, depth 4) and head; k-NN: k = 20, T = 0.07 on the EMA "
        "teacher; linear: frozen features, last 4 [CLS], SGD, base lr "
        f"{PROBE_LR['dino']:g}, 100 epochs, last epoch.",
        "",
        *table(lines, groups["dino"], ("knn_top1", "linear_top1")),
        "",
        "## Supervised KD on the cluttered digits (48 px, 36 patches)",
        "",
        "Student: configs/demo_kd.yaml (ViT, width 64, depth 4), logit KD (soft, τ = 1, "
        "α = 0.5). Teacher: configs/demo_kd_teacher.yaml (ViT, width 96, depth 6), trained per "
        "seed on that seed's split"
        + (f": top-1 {fmt(kd_teacher['top1'])}." if kd_teacher else "."),
        "",
        *table(lines, groups["kd"], ("top1",)),
        "",
        "## MAE and DMAE on the plain digits",
        "",
        "configs/demo_dmae.yaml; MAE's linear protocol (BatchNorm + linear, LARS, base lr "
        f"{PROBE_LR['mae']:g}). The MAE teacher is pretrained once (seed 0)"
        + (
            f": k-NN {fmt(mae_teacher['knn_top1'])}, linear {fmt(mae_teacher['linear_top1'])}."
            if mae_teacher
            else "."
        ),
        "",
        *table(lines, groups["mae"], ("knn_top1", "linear_top1")),
        "",
        "Recipes (overrides on top of the named config; `train.seed`, `output_dir` and the "
        "teacher checkpoint vary per run):",
        "",
    ]
    mode_key = "quick" if mode == "quick" else "full"
    for row in all_rows:
        args = [*row.overrides, *(SCHEDULES[row.group][mode_key] if row.train else [])]
        out.append(f"- {row.name}: `configs/{row.config}` {' '.join(args)}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short schedules (smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/learning[_quick]")
    parser.add_argument("--results", type=Path, default=None, help="Markdown file to write")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1,
        help="runs trained at once, each in its own process (default: one per core)",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate", action="store_true",
        help="measure the gaps that chose the default masking.tolerance (seed 100)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse", action="store_true",
        help="read finished runs of the same config from the work dir instead of training them",
    )  # fmt: skip
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    workdir = args.workdir or REPO / "runs" / ("learning_quick" if args.quick else "learning")
    results = args.results or (workdir / "RESULTS.md" if args.quick else DEFAULT_RESULTS)
    command = shlex.join(["python", "eval/bench/learning.py", *sys.argv[1:]])

    if args.calibrate:
        from calibration import calibrate  # it imports this module's rows and runs

        calibrate(mode, workdir, results, command, args.reuse)
        return
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    # Teachers first (the students need them), then every row of every seed, longest first.
    teachers = [(MAE_TEACHER, 0), *((KD_TEACHER, seed) for seed in seeds)]
    order = {"dino": 0, "kd": 1, "mae": 2}
    rows = sorted(((row, seed) for seed in seeds for row in ROWS),
                  key=lambda task: (order[task[0].group], not task[0].train))  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"),
        initializer=torch.set_num_threads, initargs=(threads,),
    ) as pool:  # fmt: skip
        for phase in (teachers, rows):
            futures = {pool.submit(run_one, row, seed, mode, workdir, args.reuse): (row, seed)
                       for row, seed in phase}  # fmt: skip
            for future in as_completed(futures):
                (row, seed), record = futures[future], future.result()
                records.append(record)
                scores = ", ".join(f"{key} {record[key]:.1f}" for key in NUMBERS[row.group])
                print(
                    f"seed {seed} {row.name}: {scores}, teacher {record['teacher_pflops']:.5f} "
                    f"PFLOPs, {record['wall_s']:.0f} s "
                    f"({(time.perf_counter() - start) / 60:.1f} min so far)",
                    flush=True,
                )
    names = [row.name for row in (MAE_TEACHER, KD_TEACHER, *ROWS)]
    records.sort(key=lambda r: (r["seed"], names.index(r["row"])))
    wall_s = time.perf_counter() - start
    results.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(
        records, command, mode, wall_s, f"{args.jobs} processes × {threads} torch threads"
    )
    write_section(results, "learning", text)
    (results.parent / "learning.json").write_text(json.dumps(records, indent=2) + "\n")
    print(text)
    print(f"written: {results}")


if __name__ == "__main__":
    main()
