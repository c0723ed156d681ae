"""Linear probe on a run, with cached features vs running the backbone every step, in one run.

    .venv/bin/python eval/bench/linear_cache.py [--checkpoint runs/demo/checkpoint.pth]
        [--epochs 10] [--protocol dino] [--json OUT]

Both variants see the same data in the same order with the same seed (no augmentation), so
they must reach the same accuracy; only the wall time differs. Prints one line per variant and
the speed-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ssl_kd.data.splits import eval_splits
from ssl_kd.evaluation.linear import LinearProbeConfig, linear_probe
from ssl_kd.evaluation.linear_head import BASE_LR
from ssl_kd.evaluation.loading import load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint.pth")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--protocol", choices=("dino", "mae"), default="dino")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    backbone, report = load_backbone(args.checkpoint)
    run = report.run_config or {}
    splits = eval_splits(
        "digits", run.get("data", {}).get("global_crop_size", 32),
        seed=run.get("train", {}).get("seed", 0),
    )  # fmt: skip
    print(report)
    print(f"torch threads: {torch.get_num_threads()}, {splits.description}")
    results = {}
    for cache in (True, False):
        # The recipe's lr, not the default sweep: this times one probe, cached or not.
        cfg = LinearProbeConfig(
            args.protocol, epochs=args.epochs, batch_size=args.batch_size,
            lr=BASE_LR[args.protocol], cache=cache,
        )  # fmt: skip
        start = time.perf_counter()
        result, _ = linear_probe(backbone, splits, cfg, progress=False)
        seconds = time.perf_counter() - start
        name = "cached" if cache else "uncached"
        results[name] = {"wall_s": seconds, "top1": result["top1"], "top5": result["top5"]}
        print(f"{name:>9}: {seconds:7.2f} s for {args.epochs} epochs, "
              f"top-1 {result['top1']:.2f} top-5 {result['top5']:.2f}")  # fmt: skip
    speedup = results["uncached"]["wall_s"] / results["cached"]["wall_s"]
    print(f"cached is {speedup:.1f}x faster; same top-1: "
          f"{results['cached']['top1'] == results['uncached']['top1']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"protocol": args.protocol, "epochs": args.epochs, **results}, handle)


if __name__ == "__main__":
    main()
