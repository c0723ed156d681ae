"""Supervised distillation on the cluttered digits: which patches the teacher sees, at what cost.

    .venv/bin/python eval/bench/kd_study.py [--quick | --demo] [--seeds 0 1 2] [--workdir DIR]

For each seed (the seed of the weights, the augmentations and the held-out split), it trains the
teacher of configs/demo_kd_teacher.yaml (`method: supervised`) on that seed's training split,
then the student of configs/demo_kd.yaml from it:

- no KD (`method: supervised`, the same student and steps);
- logit KD (soft KL at τ, α = 0.5) with the teacher seeing every patch;
- MaskedKD: the teacher sees half of the patches, chosen by the student's last-block [CLS]
  attention (`attention_topk`), at random, or the least attended (`attention_bottomk`), the
  paper's Table 3d; and a quarter, top-k;
- ViTKD (shallow mimicking + deep generation, on logit KD), whole and at keep 0.5 top-k;
- ScaleKD (cross-attention projector, spatial + DCT mimicking, teacher parameter perception,
  on logit KD).

Each student's top-1 on the held-out split and the teacher's PFLOPs of the run are read from its
summary.json. A teacher trained on another seed's split would have seen this seed's held-out
images with their labels, so every seed trains its own.

Writes its section of `--results` (default eval/bench/RESULTS.md; with `--quick`, the work dir)
with the exact command and machine, mean ± sample std over seeds, and every run's numbers to
`kd_study.json` beside it. `--quick`: one seed, one or two epochs per run, a smoke run whose
numbers say little. `--demo` (`make demo-kd`): seed 0, the teacher and four students (no KD,
logit KD, MaskedKD 0.5, MaskedKD 0.5 + ViTKD), a table printed and nothing written but the runs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import aggregate as report_aggregate
from report import beyond_one_std, fmt, machine, train_run, write_section

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "eval" / "bench" / "RESULTS.md"
TEACHER_CONFIG = REPO / "configs" / "demo_kd_teacher.yaml"
STUDENT_CONFIG = REPO / "configs" / "demo_kd.yaml"
# The kd keys that only a distilling method has; `supervised` takes the rest of the section.
TEACHER_KEYS = ("teacher_name", "teacher_kwargs", "teacher_checkpoint", "teacher_img_size",
                "distillation", "alpha", "tau")  # fmt: skip
QUICK_EPOCHS = {"teacher": 2, "student": 1}
# `make demo-kd` must finish in 10 minutes on a 2-core CPU: its students train 20 epochs instead of
# the config's 30 (measured: 6.8 min in all; 9.8 min at 30 epochs).
DEMO_STUDENT_EPOCHS = 20


@dataclass(frozen=True)
class Row:
    slug: str
    name: str
    method: str  # supervised, kd, vitkd, scalekd
    keep: float = 1.0
    strategy: str = "attention_topk"


ROWS = [
    Row("no_kd", "no KD (supervised)", "supervised"),
    Row("logit_kd", "logit KD", "kd"),
    Row("maskedkd_topk_0.5", "MaskedKD keep 0.5, attention_topk", "kd", 0.5),
    Row("maskedkd_random_0.5", "MaskedKD keep 0.5, random", "kd", 0.5, "random"),
    Row(
        "maskedkd_bottomk_0.5",
        "MaskedKD keep 0.5, attention_bottomk",
        "kd",
        0.5,
        "attention_bottomk",
    ),
    Row("maskedkd_topk_0.25", "MaskedKD keep 0.25, attention_topk", "kd", 0.25),
    Row("vitkd", "ViTKD + logit KD", "vitkd"),
    Row("maskedkd_vitkd_0.5", "MaskedKD keep 0.5 + ViTKD", "vitkd", 0.5),
    Row("scalekd", "ScaleKD + logit KD", "scalekd"),
]
DEMO_ROWS = ["no_kd", "logit_kd", "maskedkd_topk_0.5", "maskedkd_vitkd_0.5"]
TEACHER = "teacher"


def teacher_values(seed: int, workdir: Path, quick: bool) -> dict[str, Any]:
    """configs/demo_kd_teacher.yaml for `seed`."""
    values = yaml.safe_load(TEACHER_CONFIG.read_text())
    values["output_dir"] = str(workdir / TEACHER / f"seed{seed}")
    values["train"]["seed"] = seed
    if quick:
        values["train"]["epochs"] = QUICK_EPOCHS["teacher"]
    return values


def student_values(
    row: Row, seed: int, workdir: Path, quick: bool, epochs: int | None = None
) -> dict[str, Any]:
    """configs/demo_kd.yaml as `row` runs it: the method, with the kd section moved under the
    method's name (teacher keys dropped for `supervised`), the masking, this seed's teacher."""
    values = copy.deepcopy(yaml.safe_load(STUDENT_CONFIG.read_text()))
    section = values.pop("kd")
    if row.method == "supervised":
        section = {key: value for key, value in section.items() if key not in TEACHER_KEYS}
    else:
        section["teacher_checkpoint"] = str(workdir / TEACHER / f"seed{seed}" / "checkpoint.pth")
    values["method"] = row.method
    values[row.method] = section
    values["masking"] = {**values.get("masking", {}), "keep_ratio": row.keep,
                         "strategy": row.strategy}  # fmt: skip
    values["output_dir"] = str(workdir / row.slug / f"seed{seed}")
    values["train"]["seed"] = seed
    if quick:
        values["train"]["epochs"] = QUICK_EPOCHS["student"]
    elif epochs is not None:
        values["train"]["epochs"] = epochs
    return values


def run(values: dict[str, Any], source: str, quiet: bool, reuse: bool = False) -> dict[str, Any]:
    """Trains in this process (or reads the finished run, `reuse`); returns its summary.json."""
    from ssl_kd.run_config import config_from_dict

    return train_run(config_from_dict(values, source), quiet, reuse)


def record_of(name: str, seed: int, summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("val_top1", "val_top5", "teacher_pflops", "teacher_pflops_unmasked", "wall_s",
            "steps")  # fmt: skip
    return {"row": name, "seed": seed, **{key: summary[key] for key in keys}}


def aggregate(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One line per row name, in `names` order: mean ± std of each number over its seeds."""
    return report_aggregate(
        records,
        names,
        ("val_top1", "val_top5", "teacher_pflops", "teacher_pflops_unmasked", "wall_s", "steps"),
    )


def ordering_verdict(lines: list[dict[str, Any]]) -> str:
    """The paper's Table 3d claim (top-k > random > bottom-k at keep 0.5), said plainly."""
    by_name = {line["row"]: line for line in lines}
    topk, rand, bottom = (by_name[next(r.name for r in ROWS if r.slug == slug)]
                          for slug in ("maskedkd_topk_0.5", "maskedkd_random_0.5",
                                       "maskedkd_bottomk_0.5"))  # fmt: skip
    means = ", ".join(f"{fmt(line['val_top1'])}" for line in (topk, rand, bottom))
    holds = {"top-k > random": beyond_one_std(topk, rand, "val_top1"),
             "random > bottom-k": beyond_one_std(rand, bottom, "val_top1")}  # fmt: skip
    said = "; ".join(f"{claim}: {'yes' if ok else 'no'}" for claim, ok in holds.items())
    verdict = "holds" if all(holds.values()) else "does not hold"
    return (
        f"The ordering top-k > random > bottom-k {verdict} beyond one standard deviation "
        f"(top-k, random, bottom-k: {means}; {said})."
    )


def markdown(lines: list[dict[str, Any]], command: str, mode: str, wall_s: float) -> str:
    by_name = {line["row"]: line for line in lines}
    logit = by_name["logit KD"]
    teacher = by_name[TEACHER]
    out = [
        "# Supervised distillation on the cluttered digits: which patches the teacher sees",
        "",
        f"Produced by `{command}` ({mode} mode) on {datetime.date.today().isoformat()}, "
        f"in {wall_s / 60:.1f} min on: {machine()}.",
        "",
        "Bundled cluttered digits (64 px, 8-px patches: the digit covers a few of the 64 "
        "patches). Teacher: configs/demo_kd_teacher.yaml (ViT, width 96, depth 6), trained per "
        "seed on that seed's split; student: configs/demo_kd.yaml (ViT, width 64, depth 4). Each "
        "seed draws its own weights, augmentations and 20% held-out split (so the std also "
        "covers the split). Top-1: the student on the held-out split at the end of training. "
        "Teacher PFLOPs: the teacher's forward passes of the student's run (2 FLOPs per "
        "multiply-add). Δ: difference of the means to logit KD.",
        "",
        f"Teacher: top-1 {fmt(teacher['val_top1'])} over {len(teacher['seeds'])} seeds, "
        f"{teacher['steps'][0]:.0f} steps, {teacher['wall_s'][0]:.0f} s each.",
        "",
        "| student | seeds | top-1 | Δ top-1 | teacher PFLOPs | teacher vs unmasked | steps "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        line = by_name.get(row.name)
        if line is None:
            continue
        pflops, unmasked = line["teacher_pflops"][0], line["teacher_pflops_unmasked"][0]
        ratio = f"{pflops / unmasked:.3f}" if unmasked > 0 else ""
        delta = line["val_top1"][0] - logit["val_top1"][0]
        out.append(
            f"| {row.name} | {len(line['seeds'])} | {fmt(line['val_top1'])} | {delta:+.1f} | "
            f"{pflops:.5f} | {ratio} | {line['steps'][0]:.0f} | {line['wall_s'][0]:.0f} |"
        )
    out += ["", ordering_verdict(lines), "", "Recipes (`train.seed`, `output_dir` and the "
            "teacher checkpoint vary per run):", "",
            "- teacher: `configs/demo_kd_teacher.yaml`"]  # fmt: skip
    for row in ROWS:
        out.append(
            f"- {row.name}: `configs/demo_kd.yaml` method={row.method} (the kd section under "
            f"`{row.method}`) masking.keep_ratio={row.keep} masking.strategy={row.strategy}"
        )
    return "\n".join(out) + "\n"


def demo_table(teacher: dict[str, Any], records: list[dict[str, Any]], wall_s: float) -> str:
    lines = [
        f"teacher (ViT width 96, depth 6): top-1 {teacher['val_top1']:.1f}%",
        "",
        "| student (ViT width 64, depth 4) | top-1 (%) | teacher PFLOPs | vs logit KD |",
        "|---|---:|---:|---:|",
    ]
    logit = next(r for r in records if r["row"] == "logit KD")["teacher_pflops"]
    for record in records:
        share = f"{record['teacher_pflops'] / logit:.2f}" if logit > 0 else ""
        lines.append(
            f"| {record['row']} | {record['val_top1']:.1f} | {record['teacher_pflops']:.5f} | "
            f"{share} |"
        )
    return "\n".join(lines) + f"\n\n{wall_s / 60:.1f} min in all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode_group = parser.add_mutually_exclusive_group()
    mode_group.add_argument("--quick", action="store_true", help="1 seed, 1-2 epochs (smoke)")
    mode_group.add_argument("--demo", action="store_true", help="make demo-kd: seed 0, 4 rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    parser.add_argument("--workdir", type=Path, default=None, help="default runs/kd_study[...]")
    parser.add_argument("--results", type=Path, default=None, help="Markdown file to write")
    parser.add_argument(
        "--reuse", action="store_true",
        help="read finished runs of the same config from the work dir instead of training them",
    )  # fmt: skip
    args = parser.parse_args()
    mode = "quick" if args.quick else "demo" if args.demo else "full"
    seeds = args.seeds or ([0, 1, 2] if mode == "full" else [0])
    workdir = args.workdir or REPO / "runs" / {"full": "kd_study", "quick": "kd_study_quick",
                                               "demo": "demo_kd"}[mode]  # fmt: skip
    rows = [row for row in ROWS if mode != "demo" or row.slug in DEMO_ROWS]
    command = shlex.join(["python", "eval/bench/kd_study.py", *sys.argv[1:]])
    quick, quiet = mode == "quick", mode != "demo"

    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    for seed in seeds:
        summary = run(teacher_values(seed, workdir, quick), str(TEACHER_CONFIG), quiet, args.reuse)
        records.append(record_of(TEACHER, seed, summary))
        print(f"seed {seed} teacher: top-1 {summary['val_top1']:.1f}", flush=True)
        for row in rows:
            epochs = DEMO_STUDENT_EPOCHS if mode == "demo" else None
            values = student_values(row, seed, workdir, quick, epochs)
            summary = run(values, f"{STUDENT_CONFIG} ({row.slug})", quiet, args.reuse)
            records.append(record_of(row.name, seed, summary))
            print(
                f"seed {seed} {row.name}: top-1 {summary['val_top1']:.1f}, teacher "
                f"{summary['teacher_pflops']:.5f} PFLOPs, {summary['wall_s']:.0f} s "
                f"({(time.perf_counter() - start) / 60:.1f} min so far)",
                flush=True,
            )
    wall_s = time.perf_counter() - start
    if args.reuse:  # the runs' own training time, wherever it was spent
        wall_s = sum(record["wall_s"] for record in records)
    if mode == "demo":
        teacher = next(r for r in records if r["row"] == TEACHER)
        print("\n" + demo_table(teacher, records[1:], wall_s))
        return
    results = args.results or (workdir / "RESULTS.md" if quick else DEFAULT_RESULTS)
    lines = aggregate(records, [TEACHER] + [row.name for row in rows])
    text = markdown(lines, command, mode, wall_s)
    write_section(results, "kd", text)
    (results.parent / "kd_study.json").write_text(json.dumps(records, indent=2) + "\n")
    print(text)
    print(f"written: {results}")


if __name__ == "__main__":
    main()
