"""`ssl-kd eval classify`: top-1/top-5 of a classifier (a supervised or kd run, a DeiT or timm
release) on a labelled validation split."""

from __future__ import annotations

import argparse
from typing import Any

from ssl_kd.cli_eval_data import (
    add_model_arguments,
    check_data_options,
    device_of,
    eval_data_splits,
    open_data,
    output_dir_of,
    report_unreadable,
    write_json,
)

CLASSIFY_HELP = """\
Top-1 and top-5 accuracy of a classifier on the val split: images resized to size / 0.875 and
centre-cropped (DeiT's evaluation), every image once.

CHECKPOINT: an ssl_kd supervised or kd run's checkpoint.pth (its student; the run says its
model), a DeiT release ({"model": ...}), a timm state dict or a .safetensors file (give --model
and --model-kwargs). The number of classes is read from the file's head; every tensor must fit.

DATA: as for `ssl-kd eval knn` (the run's bundled data by default; a folder with train/ and val/
ImageFolders whose class folders are the classes the model was trained on, in sorted order).

  ssl-kd eval classify runs/deit_s/checkpoint.pth --data /data/imagenet
  ssl-kd eval classify deit_small_patch16_224-cd65a155.pth --model deit_small_patch16_224 \\
      --data /data/imagenet
"""


def classify_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --model-kwargs, --device: a classifier is loaded whole (no --student, no
    --strict: every tensor must fit)."""
    add_model_arguments(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_classify_command(kinds: Any, data_args: Any) -> None:
    """`classify` under `ssl-kd eval`; `data_args` adds the options every evaluation takes."""
    classify = kinds.add_parser(
        "classify",
        help="top-1/top-5 of a classifier",
        description=CLASSIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data_args(classify)
    classify.set_defaults(run=_classify)


def _classify(args: argparse.Namespace) -> int:
    from ssl_kd.data.splits import ValSplit
    from ssl_kd.evaluation.classify import evaluate_classifier
    from ssl_kd.models.classifier import load_classifier

    check_data_options(args)
    folders = open_data(args)
    classifier, loaded = load_classifier(
        args.checkpoint, args.model, args.model_kwargs, args.img_size
    )
    print(loaded)
    device = device_of(args.device)
    classifier.to(device)
    patch = classifier.vit.patch_size if classifier.is_vit else 1
    splits = eval_data_splits(args, loaded, patch, folders)
    split = ValSplit(splits.val, splits.val_labels, splits.description, splits.unreadable)
    scores = evaluate_classifier(classifier, split, args.batch_size, device, args.num_workers)
    unreadable = report_unreadable(splits)
    print(f"top-1 {scores['top1']:6.2f}  top-5 {scores['top5']:6.2f}  ({scores['images']} images)")
    result = {
        "protocol": "classification, resize size / 0.875 + centre crop",
        "checkpoint": args.checkpoint,
        "load": str(loaded),
        "data": splits.description,
        "val_size": scores["images"],
        "unreadable_images": unreadable,
        "scores": {"top1": scores["top1"], "top5": scores["top5"]},
    }
    write_json(output_dir_of(args, args.checkpoint) / "classify_eval.json", result)
    return 0
