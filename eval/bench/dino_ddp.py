"""DINO training steps/s on CPU with 1 and 2 processes (DDP, gloo) at the same per-process batch.

    .venv/bin/python eval/bench/dino_ddp.py [--steps 20] [--warmup 3] [--batch 128] [--json OUT]

configs/demo_32px.yaml (tiny ViT, 32 px, 2 global + 4 local views, teacher at 50% of the patches),
each world size started with torchrun. Threads (OMP_NUM_THREADS): 1 process on 1 thread and
on every core; 2 processes split the cores.
Timed: `--steps` training steps after `--warmup` ones, between barriers, no k-NN, no
checkpoint. Reports steps/s and images/s of the global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def worker(steps: int, warmup: int, batch: int, output_dir: str) -> None:
    """One rank (started by torchrun): trains warmup + steps and prints rank 0's timing."""
    from ssl_kd.engine import distributed
    from ssl_kd.engine.trainer import Trainer
    from ssl_kd.run_config import load_config

    ctx = distributed.init("cpu")
    overrides = [
        f"output_dir={output_dir}", f"train.batch_size={batch}", "eval.knn_at_end=false",
        "eval.knn_random_init=false", "eval.knn_every_epochs=0",
    ]  # fmt: skip
    trainer = Trainer(load_config(REPO / "configs" / "demo_32px.yaml", overrides), ctx)
    trainer.method.train()
    # the demo's digits give 11 batches of 128 per epoch (5 per rank with 2 ranks): go on
    batches = (views for epoch in range(10**6) for views in trainer.stream.epoch(epoch))
    for _ in range(warmup):
        trainer.train_step(next(batches))
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    distributed.barrier()
    seconds = time.perf_counter() - start
    if ctx.is_main:
        result = {
            "processes": ctx.world_size,
            "threads_per_process": int(os.environ.get("OMP_NUM_THREADS", "0")),
            "batch_per_process": batch,
            "steps_per_s": steps / seconds,
            "images_per_s": steps * batch * ctx.world_size / seconds,
        }
        print("RESULT " + json.dumps(result), flush=True)
    distributed.cleanup()


def run(processes: int, threads: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", __file__, "--worker", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--batch={args.batch}", f"--output-dir={output_dir}",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="per process (demo: 128)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.warmup, args.batch, args.output_dir)
        return
    cores = os.cpu_count() or 1
    # 1 process on 1 thread too: on a busy machine a 2-thread process can lose more to thread
    # synchronisation than it gains, which would flatter the 2-process numbers.
    variants = [(1, 1), (1, cores), (2, max(1, cores // 2))]
    results = [run(processes, threads, args) for processes, threads in dict.fromkeys(variants)]
    for result in results:
        print(
            f"{result['processes']} process(es) × {result['threads_per_process']} thread(s), "
            f"batch {result['batch_per_process']}/process: {result['steps_per_s']:.2f} steps/s, "
            f"{result['images_per_s']:.0f} images/s"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
