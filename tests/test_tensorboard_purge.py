"""TensorBoard holds each step once per tag: after a SIGKILL and resume (the killed run's
unsaved steps are purged, as metrics.jsonl is trimmed), and after a linear probe rerun into
the same folder (the earlier run's curves are replaced). Read back from the real event files
the way TensorBoard's Python loader reads them (EventAccumulator, which applies the purge)."""

import itertools
import json
import subprocess

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import train
from tests.helpers import kill_after_step, start_cli, tiny_config, tiny_overrides

KEEP_ALL = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}


def steps_per_tag(tb_dir) -> dict[str, list[int]]:
    """Every scalar and image tag → the steps TensorBoard shows for it, in file order."""
    events = EventAccumulator(str(tb_dir), size_guidance=KEEP_ALL)
    events.Reload()
    tags = events.Tags()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    steps.update({tag: [e.step for e in events.Images(tag)] for tag in tags["images"]})
    return steps


def values(tb_dir, tag: str) -> list[float]:
    events = EventAccumulator(str(tb_dir), size_guidance=KEEP_ALL)
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def not_increasing(steps: dict[str, list[int]]) -> dict[str, list[int]]:
    return {
        tag: logged
        for tag, logged in steps.items()
        if any(b <= a for a, b in itertools.pairwise(logged))
    }


def start_train(args: list[str]) -> subprocess.Popen:
    return start_cli("train", *args, env={"OMP_NUM_THREADS": "2"})


@pytest.mark.slow
def test_sigkill_then_resume_logs_every_step_once_per_tag(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    extra = {
        "train.max_steps": 10,
        "train.checkpoint_every_steps": 4,
        "train.log_every_steps": 1,
        "eval.pictures_every_steps": 2,
        "eval.knn_at_end": True,
    }
    args = [str(config), *tiny_overrides(run, **extra)]
    process = start_train(args)
    kill_after_step(process, run, 6)  # between the checkpoints at 4 and 8
    saved = load_checkpoint(run / "checkpoint.pth")["step"]
    assert saved == 4
    before = steps_per_tag(run / "tb")
    # The killed run's TensorBoard holds steps the checkpoint does not: they come again below.
    assert max(before["train/loss"]) >= 6 and max(before["dino/attention"]) >= 6

    resumed = start_train(args)  # the same command
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"at step {saved}" in out
    steps = steps_per_tag(run / "tb")
    assert not not_increasing(steps), f"steps logged twice: {not_increasing(steps)}"
    assert steps["train/loss"] == list(range(1, 11))
    assert steps["method/dino_loss"] == list(range(1, 11))
    assert steps["dino/attention"] == [2, 4, 6, 8, 10]
    assert steps["eval/knn_top1"] == [10]
    # The values shown are the resumed run's (images/s differs between the two processes).
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speed = [line["train/images_per_s"] for line in lines if "train/images_per_s" in line]
    assert values(run / "tb", "train/images_per_s") == pytest.approx(speed, rel=1e-6)


def test_linear_probe_rerun_replaces_the_earlier_curves(tmp_path):
    train(tiny_config(tmp_path / "run", **{"train.max_steps": 1}))
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    out = tmp_path / "eval"
    for epochs in ("2", "3"):
        argv = ["eval", "linear", str(checkpoint), "--epochs", epochs, "--batch-size", "512",
                "--protocol", "mae", "--output-dir", str(out)]  # fmt: skip
        assert main(argv) == 0
    result = json.loads((out / "linear_mae" / "linear_eval.json").read_text())
    steps = steps_per_tag(out / "linear_mae" / "tb")
    assert {"linear/val_top1", "linear/val_top5", "linear/train_loss"} <= steps.keys()
    assert all(logged == [1, 2, 3] for logged in steps.values()), steps
    top1 = values(out / "linear_mae" / "tb", "linear/val_top1")
    assert top1 == pytest.approx([e["top1"] for e in result["per_epoch"]])


def test_a_restart_within_the_same_second_still_hides_the_killed_runs_steps(tmp_path):
    """A killed run's event file made in this very second, by a process whose host and pid
    sort after ours (as a killed subprocess's may): the restarted run's file must still sort
    last, or TensorBoard reads its purge marker first and shows the killed steps again."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from ssl_kd.engine.logging import RunLogger

    tb = tmp_path / "tb"
    killed = SummaryWriter(str(tb), filename_suffix="")
    for step in range(1, 9):
        killed.add_scalar("train/loss", float(step), step)
    killed.close()
    (old,) = tb.glob("events.out.tfevents.*")
    stamp = int(time.time())
    # the same second (or the next: the killed run may also have started just now), a host
    # name that sorts after any other
    clashing = tb / f"events.out.tfevents.{stamp}.zzzz.999999.0"
    old.rename(clashing)

    logger = RunLogger(tmp_path, purge_step=0)
    logger.scalars(1, {"train/loss": 100.0})
    logger.close()
    names = sorted(path.name for path in tb.glob("events.out.tfevents.*"))
    assert names[0] == clashing.name
    assert steps_per_tag(tb)["train/loss"] == [1]
