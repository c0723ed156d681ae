"""`ssl-kd eval knn | linear | attention | classify`: thin front-ends over `ssl_kd.evaluation`."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssl_kd.cli_eval_classify import add_classify_command, classify_model_options
from ssl_kd.cli_eval_data import (
    add_model_arguments,
    check_data_options,
    check_options,
    eval_data_splits,
    load_backbone_of,
    open_data,
    output_dir_of,
    report_unreadable,
    write_json,
)
from ssl_kd.errors import UserError

ON_ERROR = ("skip", "error")  # as ssl_kd.data.batches.ON_ERROR, without importing torch here

RAW = argparse.RawDescriptionHelpFormatter

KNN_HELP = """\
Weighted k-NN on frozen features (DINO's protocol): [CLS] after the final norm, L2-normalised;
each of the k nearest training images (cosine similarity) votes for its class with weight
exp(sim / T), T = 0.07. Features are extracted once; every k is scored from one search.

CHECKPOINT: an ssl_kd run's checkpoint.pth (DINO: the EMA teacher, --student for the student;
MAE/DMAE: the encoder), an `ssl-kd export` folder or file, an official DINO checkpoint
(teacher/student), an official DINOv2 backbone or checkpoint (registers, chunked blocks; heads
dropped), an official MAE checkpoint ({"model": ...}) or a timm state dict. The model comes
from the export folder's config.json, the run's saved config or the official args; give
--model otherwise.

DATA: 'digits' or 'cluttered_digits' (the run's held-out split, same seed) or a folder with
train/ and val/ ImageFolders (checked before the checkpoint is read). Default: what the run was
trained on (bundled data) — required otherwise. An unreadable image (truncated, not an image) is
left out of its split with its label, named on stderr and listed in the JSON, and the scores are
over the readable images (--on-error error stops at it instead, exit 1; more than
--max-bad-fraction of a split unreadable stops too).

  ssl-kd eval knn runs/demo/checkpoint.pth
  ssl-kd eval knn runs/demo/export                   # an export folder: no --model needed
  ssl-kd eval knn dino_deitsmall16_pretrain_full_checkpoint.pth --data /data/imagenet
"""

LINEAR_HELP = """\
Linear probe on the frozen backbone; writes OUTPUT/linear_<protocol>/linear_eval.json and
per-epoch val top-1/top-5 to OUTPUT/linear_<protocol>/tb (TensorBoard).

--protocol dino: concatenated [CLS] of the last n blocks (--n-last-blocks, 4 for ViT-S;
  --avgpool adds the average patch token, the ViT-B setting) -> Linear; SGD momentum 0.9,
  base lr 1e-3 (x batch / 256), cosine to 0, weight decay 0, 100 epochs.
--protocol mae: [CLS] of the last block -> BatchNorm1d(affine=False, eps=1e-6) -> Linear; LARS,
  base lr 0.1, 10 warm-up epochs then cosine, weight decay 0 (MAE: 90 epochs, batch 16384).

The lr: those base lrs are tuned for 100 ImageNet epochs (~125k steps for DINO, ~7k for MAE);
on a small data set the same epochs are a few hundred steps and the head barely moves. Without
--lr it is therefore swept, as DINOv2's linear evaluation does: one head per base lr of
base x 0.01 ... 1000 (16 heads on the same features), trained on 90% of the train split and
scored on the other 10% (never on the evaluation split); the probe is then trained on the whole
train split with the best one, exactly as --lr BEST would (with --augment or --no-cache the
sweep runs the backbone too: about twice the time). --lr fixes it (--lr 1e-3 for DINO's,
--lr 0.1 for MAE's recipe as published). A top-1 at chance level, few steps with a fixed --lr,
or a sweep whose best lr is its largest are warned about (stderr and the JSON's warnings).

Without --augment the features are extracted once and the head trains on the cache (the
result is that of running the backbone every step; --no-cache does that, to check or time it).
The reported accuracy is that of the last epoch unless --report best (best val epoch, chosen
on the evaluation split itself, hence optimistic); the JSON says which epoch and why.

  ssl-kd eval linear runs/demo/checkpoint.pth
  ssl-kd eval linear runs/demo/checkpoint.pth --protocol mae --epochs 50
"""

ATTENTION_HELP = """\
Writes OUT/<image>_attention.png for each IMAGE: the image, the last-block [CLS] attention of
each head and their mean (overlaid), and the patches a masked teacher would see at --keep-ratio,
picked by --strategy from the student's head-averaged [CLS] attention (the teacher input of
student-guided masking; the other patches are dimmed). IMAGE is a file, or sklearn:china.jpg /
sklearn:flower.jpg for scikit-learn's bundled photos. Without --checkpoint, --model builds a
randomly initialised backbone.

  ssl-kd eval attention --checkpoint runs/demo/checkpoint.pth sklearn:china.jpg --keep-ratio 0.5
"""


def _boolean(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: use true or false")
    return value == "true"


def add_strict_argument(parser: argparse.ArgumentParser, relaxed: str) -> None:
    parser.add_argument(
        "--strict",
        type=_boolean,
        default=True,
        metavar="{true,false}",
        help=f"true (default): a checkpoint that does not fit stops with the keys named; false: "
        f"{relaxed}, and print a report",
    )


def _model_args(parser: argparse.ArgumentParser) -> None:
    add_strict_argument(parser, "load the tensors that fit (missing keys keep their init)")
    parser.add_argument(
        "--student",
        action="store_true",
        help="evaluate the student of a file holding both (default: teacher)",
    )
    add_model_arguments(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _data_args(
    parser: argparse.ArgumentParser, model_options: Callable[[Any], None] = _model_args
) -> None:
    model_options(parser)
    parser.add_argument("checkpoint", help="checkpoint, state dict or export folder (see above)")
    parser.add_argument(
        "--data", help="'digits', 'cluttered_digits' or a folder with train/ and val/"
    )
    parser.add_argument("--img-size", type=int, help="default: the run's global crop size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--num-workers", type=int, default=None, help="default: 0 for bundled data, else 8"
    )
    parser.add_argument("--output-dir", help="default: CHECKPOINT's folder/eval")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="an unreadable image: skip it (its label too), named and counted (default), or "
        "stop naming it (exit 1)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.1,
        help="with --on-error skip, stop once more than this fraction of a split is unreadable "
        "(the wrong folder, a copy cut short); default 0.1",
    )


def add_eval_commands(commands: Any) -> None:
    """Adds `eval` with its knn / linear / attention / classify sub-commands to the `ssl-kd`
    parser."""
    evaluate = commands.add_parser(
        "eval", help="k-NN, linear probe, attention pictures, classification"
    )
    kinds = evaluate.add_subparsers(dest="eval_command", required=True)

    knn = kinds.add_parser(
        "knn", help="weighted k-NN (DINO protocol)", description=KNN_HELP, formatter_class=RAW
    )
    _data_args(knn)
    knn.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.set_defaults(run=_knn)

    linear = kinds.add_parser(
        "linear",
        help="linear probe (dino or mae protocol)",
        description=LINEAR_HELP,
        formatter_class=RAW,
    )
    _data_args(linear)
    linear.add_argument("--protocol", choices=("dino", "mae"), default="dino")
    linear.add_argument("--epochs", type=int, default=100)
    linear.add_argument(
        "--lr", type=float, default=None, help="base lr per 256 images (default: swept)"
    )
    linear.add_argument("--weight-decay", type=float, default=0.0)
    linear.add_argument("--warmup-epochs", type=int, default=None)
    linear.add_argument(
        "--n-last-blocks", type=int, default=None, help="dino protocol only (default 4)"
    )
    linear.add_argument("--avgpool", action="store_true", help="dino protocol only")
    linear.add_argument("--augment", action="store_true", help="random resized crops (+ flips)")
    linear.add_argument("--no-cache", action="store_true", help="run the backbone every step")
    linear.add_argument("--report", choices=("last", "best"), default="last")
    linear.add_argument("--seed", type=int, default=0)
    linear.set_defaults(run=_linear)

    attention = kinds.add_parser(
        "attention",
        help="attention and masked-teacher pictures",
        description=ATTENTION_HELP,
        formatter_class=RAW,
    )
    _model_args(attention)
    attention.add_argument("images", nargs="+", metavar="IMAGE")
    attention.add_argument("--checkpoint", help="checkpoint (see `ssl-kd eval knn --help`)")
    attention.add_argument("--keep-ratio", type=float, default=0.5)
    attention.add_argument(
        "--strategy",
        default="attention_topk",
        help="a masking strategy, as masking.strategy in a config (default: attention_topk)",
    )
    attention.add_argument("--img-size", type=int, default=224)
    attention.add_argument("--out", help="output folder (default: CHECKPOINT's folder/eval)")
    attention.set_defaults(run=_attention)

    add_classify_command(kinds, lambda parser: _data_args(parser, classify_model_options))


def _knn(args: argparse.Namespace) -> int:
    from ssl_kd.evaluation.knn import evaluate_knn

    check_data_options(args)
    check_options({"--ks": min(args.ks), "--temperature": args.temperature})
    folders = open_data(args)
    backbone, report = load_backbone_of(args, args.checkpoint)
    splits = eval_data_splits(args, report, backbone.patch_size, folders)
    scores = evaluate_knn(
        backbone,
        splits,
        args.ks,
        args.temperature,
        args.batch_size,
        next(backbone.parameters()).device,
        args.num_workers,
    )
    unreadable = report_unreadable(splits)
    for k, score in scores.items():
        print(f"k={k:<4} top-1 {score['top1']:6.2f}  top-5 {score['top5']:6.2f}")
    result = {
        "protocol": "dino k-NN",
        "temperature": args.temperature,
        "checkpoint": args.checkpoint,
        "load": str(report),
        "data": splits.description,
        "train_size": len(splits.train_labels) - len(unreadable.get("train", [])),
        "val_size": len(splits.val_labels) - len(unreadable.get("val", [])),
        "unreadable_images": unreadable,
        "scores": {str(k): v for k, v in scores.items()},
    }
    write_json(output_dir_of(args, args.checkpoint) / "knn_eval.json", result)
    return 0


def _linear(args: argparse.Namespace) -> int:
    from torch.utils.tensorboard import SummaryWriter

    from ssl_kd.evaluation.linear import LinearProbeConfig, linear_probe

    check_data_options(args)
    check_options(
        {"--epochs": args.epochs, "--lr": args.lr, "--n-last-blocks": args.n_last_blocks},
        {"--weight-decay": args.weight_decay, "--warmup-epochs": args.warmup_epochs},
    )
    if args.protocol == "mae" and (args.n_last_blocks is not None or args.avgpool):
        raise UserError(
            "--n-last-blocks and --avgpool are for --protocol dino: MAE's probe reads the "
            "[CLS] of the last block"
        )
    folders = open_data(args)
    backbone, report = load_backbone_of(args, args.checkpoint)
    splits = eval_data_splits(args, report, backbone.patch_size, folders, augment=args.augment)
    cfg = LinearProbeConfig(
        protocol=args.protocol,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        n_last_blocks=4 if args.n_last_blocks is None else args.n_last_blocks,
        avgpool=args.avgpool,
        augment=args.augment,
        cache=not args.no_cache,
        report=args.report,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    out = output_dir_of(args, args.checkpoint) / f"linear_{args.protocol}"
    # A probe rerun into this folder replaces the earlier curves: its epochs restart at 1, and
    # TensorBoard would show both runs' events as one run (every epoch twice). Removing them up
    # front (not after) keeps the curves live while it trains, and a rerun stopped half-way
    # leaves its own epochs only, never a mix.
    if (out / "tb").is_dir():
        shutil.rmtree(out / "tb")
    writer = SummaryWriter(str(out / "tb"))

    def log(epoch: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            writer.add_scalar(tag, value, epoch)
        print(
            f"epoch {epoch}/{cfg.epochs}: val top-1 {values['linear/val_top1']:.2f} "
            f"top-5 {values['linear/val_top5']:.2f} loss {values['linear/train_loss']:.4f}"
        )

    try:
        result, _head = linear_probe(backbone, splits, cfg, next(backbone.parameters()).device, log)
    finally:
        writer.close()
    result.update(checkpoint=args.checkpoint, load=str(report))
    report_unreadable(splits)
    sweep = result["lr_sweep"]
    if sweep:
        tried = ", ".join(
            f"{lr:g}: {top1:.1f}"
            for lr, top1 in zip(sweep["base_lrs"], sweep["holdout_top1"], strict=True)
        )
        print(f"lr sweep, held-out top-1 by base lr ({tried}) → {sweep['chosen_base_lr']:g}")
    print(
        f"linear probe ({result['protocol']} protocol, base lr {result['config']['lr']:g}): "
        f"top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} at epoch "
        f"{result['reported_epoch']} ({result['epoch_choice']})"
    )
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    write_json(out / "linear_eval.json", result)
    return 0


def _attention(args: argparse.Namespace) -> int:
    from ssl_kd.evaluation.loading import load_backbone
    from ssl_kd.evaluation.pictures import open_image, write_attention_png
    from ssl_kd.masking import STRATEGIES, num_kept
    from ssl_kd.models.backbone import create_backbone

    try:
        num_kept(1, args.keep_ratio)  # checked before any work
    except ValueError as err:
        raise UserError(f"--keep-ratio: {err}") from None
    if args.strategy not in STRATEGIES:
        raise UserError(f"--strategy {args.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    check_options({"--img-size": args.img_size})
    selector = None
    if args.checkpoint:
        backbone, report = load_backbone_of(args, args.checkpoint)
        if report.part == "teacher":  # the student's attention picks the teacher's patches
            selector, _ = load_backbone(
                args.checkpoint, part="student", model=args.model,
                model_kwargs=args.model_kwargs, strict=args.strict,
            )  # fmt: skip
            selector = selector.to(next(backbone.parameters()).device)
            print("patches ranked by the student's attention (student-guided masking)")
        out = Path(args.out or Path(args.checkpoint).parent / "eval")
    elif args.model:
        import torch

        torch.manual_seed(0)
        backbone = create_backbone(args.model, args.img_size, **(args.model_kwargs or {})).eval()
        print(f"no --checkpoint: {args.model} with random initial weights (seed 0)")
        out = Path(args.out or "attention")
    else:
        raise UserError("give --checkpoint FILE, or --model NAME for a random-init backbone")
    for spec in args.images:
        name, image = open_image(spec)
        path = write_attention_png(
            backbone,
            image,
            out / f"{name}_attention.png",
            img_size=args.img_size,
            keep_ratio=args.keep_ratio,
            strategy=args.strategy,
            selector=selector,
        )
        print(f"wrote {path}")
    return 0
