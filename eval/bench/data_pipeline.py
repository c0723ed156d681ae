"""The data pipeline: images/s per DataLoader worker core, the official augmentation against
ssl_kd's `fast` one, side by side in one run.

    .venv/bin/python eval/bench/data_pipeline.py [--quick] [--images 300] [--repeats 5]

An ImageNet-like folder is made in a temporary directory: `--images` JPEGs (quality 90) of
500 × 375 px (a quarter of them 375 × 500), cut from scikit-learn's two sample photos rescaled
by 1–1.4×, randomly flipped and colour-shifted, in 10 class folders; nothing is downloaded. Each
pipeline reads it through a DataLoader (batch 32, the same shuffled order) with 1 and 2 worker
processes:

- DINO, official: torchvision's ImageFolder (PIL loader) + lightly's `DINOTransform` with
  `DataAugmentationDINO`'s parameters (2 × 224 at scale 0.4–1, 8 × 96 at 0.05–0.4, jitter,
  grayscale, blur, solarization, normalisation), all per image in the workers;
- DINO, ssl_kd fast: `WorkerCrops` in the workers (decode, DINO's crops and flips, uint8); the
  colours are drawn there and applied later, batched, by the training process;
- MAE, official: ImageFolder + lightly's `MAETransform(224)` (crop 0.2–1, flip, normalise);
- MAE, ssl_kd fast: `WorkerCrops` with MAE's crop (uint8; normalised by the training process).

Every (task, workers) pair times both pipelines back to back, their order alternating, in each
of `--repeats` rounds; a row reports the median and the range over rounds, and the speed-up is
the median of the per-round ratios. A timing is one pass over the folder, worker start-up
included (the same for both). Images/s per worker core is images ÷ the CPU seconds the worker
processes used (`getrusage` of the reaped children): on a machine shared with other jobs the
wall clock of a niced process says more about them than about the pipeline; the wall-clock
ratio is reported beside it. Then what the training process pays on CPU (1 thread, CPU time)
for the batched colouring (`BatchedPhotometric`) of one batch, per image. Writes its section of
eval/bench/RESULTS.md in full mode; `--quick` (a few images, one round) prints only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightly.transforms import DINOTransform, MAETransform
from PIL import Image
from sklearn.datasets import load_sample_images
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from ssl_kd.data.crops import WorkerCrops, dino_view_groups, mae_view_groups
from ssl_kd.data.datasets import image_dataset
from ssl_kd.data.photometric import BatchedPhotometric
from ssl_kd.data.training import keep_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "eval" / "bench" / "RESULTS.md"
CLASSES = 10
GLOBAL, LOCAL, NUM_LOCAL = 224, 96, 8
GLOBAL_SCALE, LOCAL_SCALE = (0.4, 1.0), (0.05, 0.4)


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs in CLASSES class folders under `root` (see the module text)."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(photo) for photo in load_sample_images().images]  # 640 × 427
    for index in range(count):
        photo = photos[index % len(photos)]
        zoom = rng.uniform(1.0, 1.4)
        photo = photo.resize((round(photo.width * zoom), round(photo.height * zoom)))
        portrait = index % 4 == 3 and photo.height >= 500
        width, height = (375, 500) if portrait else (500, 375)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        pixels = np.asarray(photo.crop((left, top, left + width, top + height)), np.float32)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        pixels = pixels * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20, size=3)
        folder = root / f"class_{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"image_{index:04d}.jpg", quality=90)
    return root


def pipelines(root: Path) -> dict[tuple[str, str], Dataset]:
    """(task, pipeline) → the dataset its DataLoader reads."""
    dino = DINOTransform(
        global_crop_size=GLOBAL, global_crop_scale=GLOBAL_SCALE, local_crop_size=LOCAL,
        local_crop_scale=LOCAL_SCALE, n_local_views=NUM_LOCAL,
    )  # fmt: skip
    dino_groups = dino_view_groups(GLOBAL, LOCAL, NUM_LOCAL, GLOBAL_SCALE, LOCAL_SCALE)
    return {
        ("DINO", "official"): ImageFolder(str(root), dino),
        ("DINO", "ssl_kd fast"): image_dataset(root, WorkerCrops(dino_groups, 0.5), keep_path),
        ("MAE", "official"): ImageFolder(str(root), MAETransform(GLOBAL)),
        ("MAE", "ssl_kd fast"): image_dataset(
            root, WorkerCrops(mae_view_groups(GLOBAL), 0.5), keep_path
        ),
    }


def loader(dataset: Dataset, batch: int, workers: int) -> DataLoader:
    order = torch.Generator().manual_seed(0)  # the same shuffled order for every pipeline
    return DataLoader(dataset, batch, shuffle=True, generator=order, num_workers=workers)


def time_pass(dataset: Dataset, batch: int, workers: int) -> tuple[float, float]:
    """One pass over the folder → (images per second of the workers' CPU time, images per
    second of wall-clock time ÷ workers). The CPU time is what the worker processes used (they
    are reaped when the pass ends), so other jobs on the machine do not change it."""
    start_cpu = children_cpu_seconds()
    start = time.perf_counter()
    images = sum(len(labels) for _, labels in loader(dataset, batch, workers))
    wall = time.perf_counter() - start
    return images / (children_cpu_seconds() - start_cpu), images / wall / workers


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def photometric_ms_per_image(dataset: Dataset, batch: int, rounds: int) -> float:
    """Median CPU ms per image of `BatchedPhotometric` on CPU, 1 thread, over a batch of
    `dataset` (CPU time: other jobs on the machine do not change it)."""
    (views, params), _ = next(iter(loader(dataset, batch, 0)))
    colour = BatchedPhotometric("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        colour(views, params)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.process_time()
            colour(views, params)
            times.append((time.process_time() - start) * 1e3 / len(views[0]))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):.{digits}f}{unit} ({low:.{digits}f}–{high:.{digits}f})"


def markdown(
    rates: dict[tuple[str, str, int], list[float]], ratios: dict[tuple[str, int], list[float]],
    wall_ratios: dict[tuple[str, int], list[float]], photometric_ms: dict[str, float],
    command: str, args: argparse.Namespace, loads: list[str],
) -> str:  # fmt: skip
    date = datetime.date.today().isoformat()
    out = [
        "# Data pipeline: images/s per DataLoader worker core, official vs ssl_kd `fast`",
        "",
        f"Produced by `{command}` on {date} on: {machine()}. Load average (1, 5, 15 min) at "
        f"start / end: {loads[0]} / {loads[-1]}; niceness {os.nice(0)}.",
        "",
        f"{args.images} JPEGs of 500 × 375 px (quality 90) in {CLASSES} class folders; "
        f"batch {args.batch}; {args.repeats} rounds, each timing both pipelines back to back "
        "(order alternating); median (min–max) over rounds. Img/s per worker core: images ÷ "
        "CPU seconds the worker processes used (user + system), which the other jobs leave "
        "alone; the wall-clock speed-up (images/s ÷ workers, fast over official in the same "
        "round) moves with them.",
        "",
        "| task | workers | official img/s per worker core | ssl_kd fast img/s per worker core "
        "| speed-up | wall-clock speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for task, workers in ratios:
        out.append(
            f"| {task} | {workers} | {spread(rates[(task, 'official', workers)])} | "
            f"{spread(rates[(task, 'ssl_kd fast', workers)])} | "
            f"{spread(ratios[(task, workers)], 2, '×')} | "
            f"{spread(wall_ratios[(task, workers)], 2, '×')} |"
        )
    out += [
        "",
        "What the training process then pays on CPU (1 thread) per image for the batched "
        "part of `fast`, run on the training device (on a GPU it costs the CPU nothing but "
        "the copy): DINO's colours and normalisation of 2 × 224 + 8 × 96 views "
        f"{photometric_ms['DINO']:.1f} ms; MAE's normalisation of one 224 view "
        f"{photometric_ms['MAE']:.2f} ms (CPU time of the process, median of 3 batches).",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few images, one round (CI)")
    parser.add_argument("--images", type=int, default=None, help="default 300 (quick: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick: 1)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (quick: 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    args.images = args.images or (16 if args.quick else 300)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.batch = args.batch or (8 if args.quick else 32)
    command = shlex.join(["python", "eval/bench/data_pipeline.py", *sys.argv[1:]])
    loads = [" ".join(f"{load:.1f}" for load in os.getloadavg())]

    with tempfile.TemporaryDirectory(prefix="data_pipeline_") as tmp:
        datasets = pipelines(make_folder(Path(tmp), args.images))
        rates: dict[tuple[str, str, int], list[float]] = {}
        ratios: dict[tuple[str, int], list[float]] = {}
        wall_ratios: dict[tuple[str, int], list[float]] = {}
        for round_index in range(args.repeats):
            for task in ("DINO", "MAE"):
                for workers in args.workers:
                    names = ["official", "ssl_kd fast"]
                    cpu, wall = {}, {}
                    for name in names if round_index % 2 == 0 else names[::-1]:
                        cpu[name], wall[name] = time_pass(
                            datasets[(task, name)], args.batch, workers
                        )
                        rates.setdefault((task, name, workers), []).append(cpu[name])
                    ratio = cpu["ssl_kd fast"] / cpu["official"]
                    ratios.setdefault((task, workers), []).append(ratio)
                    wall_ratio = wall["ssl_kd fast"] / wall["official"]
                    wall_ratios.setdefault((task, workers), []).append(wall_ratio)
                    print(
                        f"round {round_index + 1}/{args.repeats} {task} {workers} worker(s): "
                        f"official {cpu['official']:.1f}, fast {cpu['ssl_kd fast']:.1f} img/s "
                        f"per worker core ({ratio:.2f}×; wall clock {wall['official']:.1f}, "
                        f"{wall['ssl_kd fast']:.1f}, {wall_ratio:.2f}×)",
                        flush=True,
                    )
        photometric_ms = {
            task: photometric_ms_per_image(datasets[(task, "ssl_kd fast")], args.batch, 3)
            for task in ("DINO", "MAE")
        }
    loads.append(" ".join(f"{load:.1f}" for load in os.getloadavg()))
    text = markdown(rates, ratios, wall_ratios, photometric_ms, command, args, loads)
    print(text)
    if not args.quick:
        write_section(args.results, "data_pipeline", text)
        print(f"written: {args.results}")


if __name__ == "__main__":
    main()
