"""`ssl-kd`: train, submit, flops, export, eval. Every command ends in the same library calls
the launchers use."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ssl_kd.cli_eval import add_eval_commands, add_strict_argument
from ssl_kd.cli_eval_data import add_model_arguments
from ssl_kd.errors import Interrupted, UserError

TRAIN_HELP = """\
Train with the method the config names (<methods>), resuming from OUTPUT_DIR/checkpoint.pth if
present.

CONFIG is a YAML file merged over the defaults (ssl_kd/config.py); each KEY=VALUE after it
overrides one key, e.g.

  ssl-kd train configs/demo.yaml masking.keep_ratio=0.66 train.epochs=10

masking.keep_ratio is the fraction of patches the masked network sees (DINO: the teacher, 1.0
is plain DINO; MAE/DMAE: the encoder, 0.25); masking.strategy picks them: attention_topk (the
student's [CLS] attention, MaskedKD), random, attention_bottomk or block. The resolved config
is saved as OUTPUT_DIR/config.yaml; TensorBoard logs go to OUTPUT_DIR/tb, a line per log step
to OUTPUT_DIR/metrics.jsonl and the end result to OUTPUT_DIR/summary.json.

Reliability: a killed run started again with the same command resumes from
OUTPUT_DIR/checkpoint.pth (written atomically every train.checkpoint_every_steps and at each
epoch end; train.keep_checkpoints numbered copies are kept); SIGTERM saves one at the next step
and exits 143. One run at a time per OUTPUT_DIR (a lock, OUTPUT_DIR/.lock). A different config
in an OUTPUT_DIR that holds another run (its checkpoint, or its config.yaml before the first
checkpoint) is refused unless --resume (continue the saved run with its config) or
--overwrite (delete everything it wrote, eval/ and logs/ included, and start this one);
data.path may change if the data order (images, batches per epoch) stays the same. A NaN/Inf
loss stops the run (train.on_nonfinite=skip skips up to train.max_skipped_steps steps); the
same command with a lower optim.lr (or another optim.* key, dino.clip_grad,
train.on_nonfinite) then resumes, the change logged. Unreadable images are skipped and counted
(data.on_error=error stops instead). Exit status: 0 done, 1 the run failed (non-finite loss or
weights, unreadable image, a full disk), 2 a bad command, config, data path, output dir or
checkpoint, or OUTPUT_DIR in use, 130 Ctrl-C (the last checkpoint is kept and the same
command resumes), 143 stopped by SIGTERM after a final checkpoint.
"""

FLOPS_HELP = """\
Teacher cost of one image, measured with torch.utils.flop_counter on the real forward:
full vs keeping a fraction of the patches (and optionally stopping after block J).
GMACs are multiply-adds, what the MaskedKD and DMAE papers call FLOPs.

With --stop-after-block J there are two baselines, named apart:
  ratio_vs_whole_teacher   masked blocks 0..J / every block on all tokens (gmacs_whole_teacher,
                           what the official DMAE runs, decoder aside): the saving
  ratio_vs_truncated_full  masked blocks 0..J / blocks 0..J on all tokens
                           (gmacs_truncated_full): the masking's share of it

  ssl-kd flops vit_large_patch16_224 --keep-ratio 0.25 --stop-after-block 17
"""


def _train(args: argparse.Namespace) -> int:
    from ssl_kd.run_config import load_config  # a missing config file fails before torch loads

    cfg = load_config(args.config, args.overrides)

    from ssl_kd.devices import resolve_device
    from ssl_kd.engine.trainer import train
    from ssl_kd.files import check_writable_folder

    resolve_device(cfg.train.device)  # train.device=cuda without CUDA: before any folder
    check_writable_folder(cfg.output_dir)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, strict=args.strict)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_run(cfg.output_dir)) from None
    print(_summary_text(summary))
    return 0


def _interrupted_run(output_dir: str) -> str:
    """What Ctrl-C leaves: the checkpoint on disk, which the same command resumes from."""
    from ssl_kd.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint

    path = Path(output_dir) / CHECKPOINT_NAME
    if not path.exists():
        return (
            f"interrupted before the first checkpoint of {output_dir}: the same command "
            "starts the run again"
        )
    try:
        step = load_checkpoint(path, mmap=True)["step"]
    except UserError:  # not readable: the next start says what to do
        return f"interrupted; the same command resumes from {path}"
    return f"interrupted; {path} (step {step}) is kept, and the same command resumes from it"


SUBMIT_HELP = """\
Submit the same training as `ssl-kd train CONFIG [KEY=VALUE ...]` (any method: <methods>) as
a Slurm job through submitit: NODES × GPUS_PER_NODE tasks, one per GPU, each one
torch.distributed rank (NCCL).
train.batch_size is per GPU; the lr scales with the global batch (optim.lr × batch × tasks / 256).

  ssl-kd submit configs/dino_vit_s16.yaml data.path=/data/imagenet/train \\
      output_dir=/checkpoints/dino_s16 --nodes 2 --gpus-per-node 8 --partition gpu \\
      --timeout-min 2880 --cpus-per-task 10 --mem-gb 400

Prints the job id, its folder (submitit's pickles and the tasks' stdout/stderr) and the run's
output dir. Nothing is submitted (and no folder created) unless the checks pass: the config and
model, the data against train.batch_size × tasks, train.device=cuda without GPUs, a writable
output dir. On preemption or time-out submitit requeues the job and it resumes from
OUTPUT_DIR/checkpoint.pth (written every train.checkpoint_every_steps and at each epoch end);
so does a job requeued with `scontrol requeue JOBID`. On a CPU-only cluster use
--gpus-per-node 0 --tasks-per-node N (gloo). --local runs the same tasks as local processes,
without Slurm, and waits for them (debugging).
"""


def _extra_option(text: str) -> tuple[str, str | bool]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"--slurm-extra {text!r}: use KEY=VALUE, e.g. exclusive=user"
        )
    return key, True if value.lower() == "true" else value


def _submit(args: argparse.Namespace) -> int:
    from ssl_kd.run_config import load_config

    cfg = load_config(args.config, args.overrides)

    from ssl_kd.launch import SlurmOptions, submit

    options = SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        partition=args.partition, timeout_min=args.timeout_min, account=args.account,
        qos=args.qos, constraint=args.constraint, mem_gb=args.mem_gb,
        cpus_per_task=args.cpus_per_task, extra=dict(args.slurm_extra or []), local=args.local,
        folder=args.folder,
    )  # fmt: skip
    try:
        job = submit(cfg, options)
    except RuntimeError as err:  # no Slurm here, or sbatch refused the job
        print(f"ssl-kd: error: submission failed: {err}", file=sys.stderr)
        return 1
    print(f"job id: {job.job_id}")
    print(f"job folder: {job.paths.folder}")
    print(f"output dir: {cfg.output_dir}")
    print(f"task 0 log: {job.paths.stdout}")
    if args.local:
        print(_summary_text(job.results()[0]))  # rank 0's summary
    return 0


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [f"run: {summary['output_dir']} ({summary['steps']} steps, {summary['wall_s']:.0f} s)"]
    if "knn_top1" in summary:
        baseline = summary.get("knn_top1_random_init")
        extra = f" (untrained backbone: {baseline:.2f})" if baseline is not None else ""
        lines.append(f"k-NN top-1 on the held-out split: {summary['knn_top1']:.2f}{extra}")
    masked, full = summary["teacher_pflops"], summary["teacher_pflops_unmasked"]
    if full > 0:
        lines.append(
            f"teacher cost: {masked * 1e3:.3f} TFLOPs at keep ratio {summary.get('keep_ratio')} vs "
            f"{full * 1e3:.3f} TFLOPs unmasked ({100 * (1 - masked / full):.1f}% saved)"
        )
    if summary.get("skipped_steps") or summary.get("skipped_images"):
        lines.append(
            f"skipped: {len(summary.get('skipped_steps', []))} non-finite steps, "
            f"{len(summary.get('skipped_images', []))} unreadable images (see summary.json)"
        )
    lines.append(f"summary: {summary['output_dir']}/summary.json")
    lines.append(f"TensorBoard: tensorboard --logdir {summary['output_dir']}/tb")
    return "\n".join(lines)


def _flops(args: argparse.Namespace) -> int:
    from ssl_kd.flops import cost_report

    report = cost_report(args.model, args.keep_ratio, args.img_size, args.stop_after_block)
    if args.json:
        print(json.dumps(report))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:>{width}}: {value}")
    return 0


EXPORT_HELP = """\
Writes the backbone a run evaluates (DINO: the EMA teacher, --student for the student;
MAE/DMAE: the encoder) as a folder that timm and Hugging Face tools load with no arguments:

  ssl-kd export runs/demo/checkpoint.pth --out runs/demo/export
  python -c 'import timm; timm.create_model("local-dir:runs/demo/export", pretrained=True)'

The folder holds config.json (written by timm's save_config_for_hf: the timm name, the model
arguments that rebuild it exactly, and the input size, mean, std, interpolation and crop of
ssl-kd's evaluation) and model.safetensors. `ssl-kd eval knn|linear|attention` take the folder
with no --model. An OUT ending in .safetensors, .pth or .pt is one file holding the state dict
alone (timm then needs the model name and kwargs).

CHECKPOINT: anything `ssl-kd eval` reads (an ssl_kd checkpoint.pth, an export, an official DINO,
DINOv2 or MAE checkpoint, a timm state dict); read weights-only (a file that would run code is
refused). The model comes from the file (run config, official args), else from --model and
--model-kwargs. The weights are loaded strictly first: a tensor that does not fit the model
stops the export with the keys named; keys dropped on purpose (heads, MAE's decoder, DINOv2's
mask token) are listed. OUT is never the input nor a training checkpoint; an existing export
is replaced (atomically) only with --force, and a folder holding anything else never.
"""


def _export(args: argparse.Namespace) -> int:
    from ssl_kd.models.export import export_backbone

    report = export_backbone(
        args.checkpoint, args.out, args.force, part="student" if args.student else None,
        model=args.model, model_kwargs=args.model_kwargs,
    )  # fmt: skip
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-kd",
        description="ViT pretraining and distillation with a cheaper teacher.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (anywhere in argv)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help=f"train with any method ({METHODS})", description=TRAIN_HELP,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="OUTPUT_DIR holds a run with another config: continue it, with its saved config",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="OUTPUT_DIR holds a run with another config: delete what it wrote (checkpoints, "
        "logs, tb/, eval/; other files are kept) and start this one",
    )
    add_strict_argument(train, "an unreadable checkpoint.pth: resume from the newest readable "
                        "checkpoint-<step>.pth; keys that do not fit: load the rest")  # fmt: skip
    train.set_defaults(run=_train)

    sub = commands.add_parser(
        "submit", help=f"train as a Slurm job through submitit ({METHODS})",
        description=SUBMIT_HELP, formatter_class=HelpFormatter,
    )  # fmt: skip
    sub.add_argument("config", help="YAML config file")
    sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    sub.add_argument("--nodes", type=int, default=1)
    sub.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU")
    sub.add_argument(
        "--tasks-per-node", type=int, default=None, help="with --gpus-per-node 0 (CPU cluster)"
    )
    sub.add_argument("--partition", default=None)
    sub.add_argument("--timeout-min", type=int, default=24 * 60)
    sub.add_argument("--account", default=None)
    sub.add_argument("--qos", default=None)
    sub.add_argument("--constraint", default=None)
    sub.add_argument("--mem-gb", type=int, default=None)
    sub.add_argument("--cpus-per-task", type=int, default=None)
    sub.add_argument(
        "--slurm-extra", type=_extra_option, action="append", metavar="KEY=VALUE",
        help="any other sbatch option, repeatable (exclusive=user, mail-type=END, ...)",
    )  # fmt: skip
    sub.add_argument("--folder", default=None, help="job folder (default OUTPUT_DIR/submitit)")
    sub.add_argument("--local", action="store_true", help="run locally, without Slurm")
    sub.set_defaults(run=_submit)

    flops = commands.add_parser(
        "flops",
        help="teacher cost of one image, full vs masked",
        description=FLOPS_HELP,
        formatter_class=HelpFormatter,
    )
    flops.add_argument("model", help="timm model name, e.g. vit_small_patch16_224")
    flops.add_argument("--keep-ratio", type=float, default=1.0)
    flops.add_argument("--img-size", type=int, default=224)
    flops.add_argument("--stop-after-block", type=int, default=None, metavar="J")
    flops.add_argument("--json", action="store_true", help="print one JSON object")
    flops.set_defaults(run=_flops)

    export = commands.add_parser(
        "export", help="write the backbone as a folder timm loads with no arguments",
        description=EXPORT_HELP, formatter_class=HelpFormatter,
    )  # fmt: skip
    export.add_argument("checkpoint", help="checkpoint file or export folder (see above)")
    export.add_argument(
        "--out", required=True,
        help="a new folder (config.json + model.safetensors), or FILE.safetensors / FILE.pth",
    )  # fmt: skip
    export.add_argument(
        "--force", action="store_true", help="replace an earlier export at OUT (atomically)"
    )
    export.add_argument(
        "--student", action="store_true", help="export the student of a file holding both"
    )
    add_model_arguments(export)
    export.set_defaults(run=_export)

    add_eval_commands(commands)
    return parser


METHODS = "<methods>"  # in help texts: the registered method names, filled in when shown


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills in the registered methods only when help is shown: importing them loads torch,
    which the other commands' argument errors need not wait for."""

    def format_help(self) -> str:
        text = super().format_help()
        if METHODS in text:
            from ssl_kd.methods import method_names

            text = text.replace(METHODS, ", ".join(method_names()))
        return text


def main(argv: list[str] | None = None) -> int:
    """`ssl-kd`. A `UserError` (a bad command, config, path or file; a run that failed for a
    reason the user can act on) is one line on stderr with its exit status (2, or 1 for a
    failed run); Ctrl-C is one line too, exit 130; anything else is a bug in ssl_kd and shows
    its traceback (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, not only before the command
    args = build_parser().parse_args([arg for arg in argv if arg != "--debug"])
    try:
        return int(args.run(args))
    except Interrupted as err:
        if debug:
            raise
        print(f"ssl-kd: {err}", file=sys.stderr)
        return err.exit_code
    except UserError as err:
        if debug:
            raise
        print(f"ssl-kd: error: {err} (--debug shows the traceback)", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C in any other command: nothing to keep
        if debug:
            raise
        print("ssl-kd: interrupted", file=sys.stderr)
        return Interrupted.exit_code


if __name__ == "__main__":
    sys.exit(main())
