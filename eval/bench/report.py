"""What the studies share: mean ± std over seeds, the machine line, and one section per study in
eval/bench/RESULTS.md (each study rewrites its own section and leaves the others as they are)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

import torch


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the std is 0 for a single value."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(
    records: list[dict[str, Any]], names: list[str], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """One line per row name, in `names` order: mean ± std of each of `keys` over its seeds."""
    lines = []
    for name in names:
        mine = [r for r in records if r["row"] == name]
        line: dict[str, Any] = {"row": name, "seeds": [r["seed"] for r in mine]}
        for key in keys:
            line[key] = mean_std([float(r[key]) for r in mine])
        lines.append(line)
    return lines


def beyond_one_std(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Line a's mean of `key` lies above line b's by more than one standard deviation (the larger
    of the two lines' sample stds)."""
    (mean_a, std_a), (mean_b, std_b) = a[key], b[key]
    return mean_a - mean_b > max(std_a, std_b)


def train_run(cfg: Any, quiet: bool, reuse: bool = False) -> dict[str, Any]:
    """Trains `cfg` (an ssl_kd Config) in this process and returns the run's summary.json;
    `quiet`: its output goes to OUTPUT_DIR/study.log. `reuse`: a finished run of the same config
    (its config.yaml equal, its summary.json written) is read, not trained again."""
    import json

    from ssl_kd.config import to_yaml
    from ssl_kd.engine.trainer import train

    out = Path(cfg.output_dir)
    saved, summary = out / "config.yaml", out / "summary.json"
    if reuse and summary.is_file() and saved.is_file() and saved.read_text() == to_yaml(cfg):
        return dict(json.loads(summary.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        return train(cfg, overwrite=True)
    with (out / "study.log").open("w") as log, contextlib.redirect_stdout(log):
        return train(cfg, overwrite=True)


def fmt(value: tuple[float, float], digits: int = 1) -> str:
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()}"
    )


def write_section(path: Path, name: str, text: str) -> None:
    """Replaces study `name`'s section of the Markdown file `path` by `text` (appends it when the
    file has none), through a temporary file renamed over `path`: a killed study leaves the old
    file whole."""
    begin, end = f"<!-- study: {name} -->", f"<!-- end of study: {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(new)
    partial.replace(path)
