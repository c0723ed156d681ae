"""What `ssl-kd eval` reads and writes: the model options, options checked before any work,
the --data folders checked before the checkpoint is read, the backbone, the labelled splits
(unreadable images as --on-error says) and the result files."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ssl_kd.errors import UserError
from ssl_kd.files import write_text_atomic


def _yaml_mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping like '{{depth: 4}}'")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --model-kwargs: the timm model, where the checkpoint does not say."""
    parser.add_argument(
        "--model", help="timm model name (default: from the checkpoint or export folder)"
    )
    parser.add_argument(
        "--model-kwargs",
        type=_yaml_mapping,
        default=None,
        metavar="YAML",
        help="timm overrides, e.g. '{patch_size: 4, embed_dim: 96, depth: 4}'",
    )


def check_options(
    positive: dict[str, float | None], not_negative: dict[str, float | None] | None = None
) -> None:
    """Numeric options, checked before any work (None: not given, the default applies).

    Raises:
        UserError: naming the option and its value.
    """
    for option, value in positive.items():
        if value is not None and not value > 0:  # NaN fails this too
            raise UserError(f"{option} {value} must be > 0")
    for option, value in (not_negative or {}).items():
        if value is not None and not value >= 0:
            raise UserError(f"{option} {value} must be >= 0")


def check_data_options(args: argparse.Namespace) -> None:
    """The options of `eval knn` and `eval linear` that every evaluation reads."""
    check_options(
        {"--batch-size": args.batch_size, "--img-size": args.img_size},
        {"--num-workers": args.num_workers, "--max-bad-fraction": args.max_bad_fraction},
    )
    if args.max_bad_fraction > 1:
        raise UserError(f"--max-bad-fraction {args.max_bad_fraction} must be <= 1")


def device_of(name: str) -> Any:
    """--device NAME as a torch device (auto: CUDA when there is one)."""
    from ssl_kd.devices import resolve_device

    return resolve_device(name, option="--device")


def load_backbone_of(args: argparse.Namespace, path: str) -> tuple[Any, Any]:
    """(backbone on --device, LoadReport) of the checkpoint at `path`; prints the report."""
    from ssl_kd.evaluation.loading import load_backbone

    part = "student" if args.student else None
    backbone, report = load_backbone(
        path, part=part, model=args.model, model_kwargs=args.model_kwargs, strict=args.strict
    )
    print(report)
    return backbone.to(device_of(args.device)), report


def open_data(args: argparse.Namespace) -> Any:
    """The --data folders, scanned and checked before any checkpoint is read (None: bundled
    data, or the run's data, known once the checkpoint is)."""
    from ssl_kd.data.bundled import is_bundled
    from ssl_kd.data.splits import open_eval_folders

    if args.data is None or is_bundled(args.data):
        return None
    return open_eval_folders(args.data)


def eval_data_splits(
    args: argparse.Namespace, report: Any, patch_size: int, folders: Any, augment: bool = False
) -> Any:
    """The labelled splits to evaluate on: `folders` (opened by `open_data`), --data digits (or
    cluttered_digits), or the run's own bundled data when --data is not given; at --img-size or
    the run's size."""
    from ssl_kd.data.batches import UnreadableImages
    from ssl_kd.data.bundled import is_bundled
    from ssl_kd.data.splits import eval_splits

    run = report.run_config or {}
    data = folders or args.data
    if data is None and is_bundled(run.get("data", {}).get("name")):
        data = run["data"]["name"]
    if data is None:
        raise UserError(f"{args.checkpoint}: pass --data digits or --data ROOT (train/, val/)")
    img_size = args.img_size or run.get("data", {}).get("global_crop_size") or report.img_size
    if img_size % patch_size:
        raise UserError(
            f"--img-size {img_size} is not a multiple of the backbone's patch size {patch_size}"
        )
    seed = run.get("train", {}).get("seed", 0)
    fraction = run.get("data", {}).get("test_fraction", 0.2)
    unreadable = UnreadableImages(args.on_error, args.max_bad_fraction)
    splits = eval_splits(
        data, img_size, seed=seed, test_fraction=fraction, augment=augment, unreadable=unreadable
    )
    if args.num_workers is None:
        args.num_workers = 0 if is_bundled(data) else min(8, os.cpu_count() or 1)
    print(
        f"data: {splits.description}, {len(splits.train_labels)} train / "
        f"{len(splits.val_labels)} val images at {img_size} px"
    )
    return splits


def report_unreadable(splits: Any) -> dict[str, list[str]]:
    """Prints how many images each split left out; returns split → the files."""
    files = splits.unreadable.files
    sizes = {"train": len(splits.train_labels), "val": len(splits.val_labels)}
    for split, skipped in files.items():
        if skipped:
            print(
                f"{split}: {sizes[split] - len(skipped)} of {sizes[split]} images used, "
                f"{len(skipped)} unreadable skipped (--on-error skip; listed in the JSON)"
            )
    return {split: list(skipped) for split, skipped in files.items() if skipped}


def output_dir_of(args: argparse.Namespace, checkpoint: str) -> Path:
    return Path(args.output_dir or Path(checkpoint).parent / "eval")


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")
    print(f"wrote {path}")
