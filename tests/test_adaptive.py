"""The adaptive keep ratio (ssl_kd/adaptive.py): the controller on synthetic gap signals, its
state across a checkpoint, the config's checks, and runs through the trainer (cost counted,
logged, resumed). Each method's own gap is checked against its formula in test_dino.py,
test_kd.py and test_dmae.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ssl_kd.adaptive import KeepRatioController
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.errors import ConfigError
from ssl_kd.flops import forward_macs
from ssl_kd.masking import num_kept
from ssl_kd.methods.dino import DINO
from tests.helpers import (
    kill_and_resume,
    run_cli,
    tiny_backbone,
    tiny_config,
    tiny_overrides,
    train_stream,
)


def controller(**overrides):
    values = {"start": 1.0, "tolerance": 0.1, "minimum": 0.3, "step_size": 0.1,
              "hysteresis": 0.2, "probe_every": 1}  # fmt: skip
    values.update(overrides)
    return KeepRatioController(values.pop("start"), values.pop("tolerance"), **values)


def feed(ratio_control, gaps):
    """The ratio after each gap (None: a step without a probe)."""
    return [ratio_control.update(gap, epoch=0) for gap in gaps]


# --- the controller on synthetic gap signals ------------------------------------------------------
def test_falls_while_under_tolerance_rises_when_over_and_holds_in_the_dead_band():
    control = controller()  # tolerance 0.1, lowered below 0.08, raised above 0.1
    assert feed(control, [0.0] * 4) == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert feed(control, [0.2, 0.15]) == pytest.approx([0.7, 0.8])  # over: rises
    assert feed(control, [0.09, 0.1, 0.081]) == pytest.approx([0.8] * 3)  # the dead band holds
    assert feed(control, [0.079, None, 0.05]) == pytest.approx([0.7, 0.7, 0.6])
    assert feed(control, [float("nan")]) == pytest.approx([0.6])  # a poisoned step moves nothing
    assert (control.lowered, control.raised, control.probes) == (6, 2, 11)
    summary = control.summary()
    assert summary["final"] == pytest.approx(0.6) and summary["lowest"] == pytest.approx(0.6)
    # the mean is over the ratio each step used (the one before its own update)
    used = [1.0, 0.9, 0.8, 0.7, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.6]
    assert summary["mean"] == pytest.approx(sum(used) / len(used))
    assert summary["gap_last"] == 0.05


def test_stays_within_its_bounds():
    control = controller(minimum=0.12, step_size=0.05)
    ratios = feed(control, [0.0] * 30)
    assert ratios[-1] == 0.12 and min(ratios) == 0.12  # clamped onto the bound, not past it
    assert ratios[16] == pytest.approx(0.15) and ratios[17] == 0.12
    assert feed(control, [1.0] * 30)[-1] == 1.0
    rng = random.Random(0)
    gaps = [rng.choice([0.0, 0.05, 0.09, 0.5, None]) for _ in range(2000)]
    ratios = feed(controller(minimum=0.12, step_size=0.07), gaps)
    assert min(ratios) == 0.12 and max(ratios) == 1.0  # it went both ways, never past
    assert all(0.12 <= ratio <= 1.0 for ratio in ratios)


def test_tolerance_zero_keeps_the_ratio_at_its_start():
    control = controller(tolerance=0.0, hysteresis=0.0)
    assert feed(control, [0.0, 0.0, 1e-6, 0.3, 0.0]) == [1.0] * 5
    assert control.lowered == control.raised == 0
    lower = controller(start=0.5, tolerance=0.0)
    assert feed(lower, [0.0] * 5) == [0.5] * 5  # a zero gap is not under a zero tolerance
    assert feed(lower, [1e-6]) == [pytest.approx(0.6)]  # any gap at all is over it


def test_probes_on_every_nth_step_on_a_share_of_the_batch_at_least_one_image():
    control = controller(probe_every=4, probe_fraction=0.125)
    assert [step for step in range(13) if control.probe_due(step)] == [0, 4, 8, 12]
    assert control.probe_size(32) == 4 and control.probe_size(3) == 1
    assert controller(probe_fraction=1.0).probe_size(7) == 7


def test_state_through_a_checkpoint_resumes_the_same_ratio(tmp_path):
    rng = random.Random(1)
    gaps = [rng.choice([0.0, 0.02, 0.09, 0.3, None]) for _ in range(40)]
    uninterrupted = controller()
    for step, gap in enumerate(gaps):
        uninterrupted.update(gap, epoch=step // 10)
    killed = controller()
    for step, gap in enumerate(gaps[:17]):
        killed.update(gap, epoch=step // 10)
    torch.save({"adaptive": killed.state_dict()}, tmp_path / "checkpoint.pth")
    resumed = controller()  # a new process: the start ratio until the state loads
    resumed.load_state_dict(load_checkpoint_dict(tmp_path / "checkpoint.pth")["adaptive"])
    assert resumed.ratio == killed.ratio != resumed.start
    for step, gap in enumerate(gaps[17:], 17):
        resumed.update(gap, epoch=step // 10)
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.summary() == uninterrupted.summary()
    assert len(resumed.summary()["per_epoch"]) == 4


def load_checkpoint_dict(path):
    """As the trainer reads a checkpoint: weights only, so the state must be plain numbers."""
    return torch.load(path, weights_only=True)


# --- the config -----------------------------------------------------------------------------------
ADAPTIVE = {"masking.adaptive": True}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"method": "supervised", "masking.keep_ratio": 1.0},
         r"masking\.adaptive=true: supervised masks no teacher"),
        ({"method": "mae", "masking.keep_ratio": 0.25, "masking.strategy": "random"},
         r"masking\.adaptive=true: mae masks no teacher"),
        ({"masking.keep_ratio_warmup_epochs": 1, "masking.keep_ratio_start": 1.0},
         r"masking\.keep_ratio_warmup_epochs=1: the controller alone sets the keep ratio"),
        ({"masking.keep_ratio": 0.05},
         r"masking\.keep_ratio=0\.05 is where masking\.adaptive starts, below masking\."
         r"adaptive_min=0\.1"),
    ],
)  # fmt: skip
def test_config_mistakes_are_named(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, **ADAPTIVE, **extra)


def test_a_config_mistake_is_one_line_and_exit_status_2(tmp_path):
    args = tiny_overrides(tmp_path / "run", **ADAPTIVE, **{"masking.keep_ratio_warmup_epochs": 1})
    (tmp_path / "run.yaml").write_text("{}\n")
    result = run_cli("train", tmp_path / "run.yaml", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_start_is_the_methods_own_keep_ratio(tmp_path):
    from ssl_kd.engine.build import build_method

    dino = build_method(tiny_config(tmp_path, **ADAPTIVE, **{"masking.keep_ratio": 0.7}))
    assert dino.adaptive is not None and dino.adaptive.ratio == 0.7
    assert dino.keep_ratio(123) == 0.7  # the controller, not the schedule, answers
    dino.adaptive.ratio = 0.4
    assert dino.keep_ratio(0) == 0.4
    assert build_method(tiny_config(tmp_path)).adaptive is None  # off by default


def test_unset_tolerance_and_probe_interval_take_the_methods_default_and_the_runs_length(
    tmp_path,
):
    from ssl_kd.methods.base import probe_interval
    from ssl_kd.methods.dmae import DMAE
    from ssl_kd.methods.kd import KD

    cfg = tiny_config(tmp_path, **ADAPTIVE)
    assert cfg.masking.tolerance == DINO.default_tolerance  # resolved when loading
    assert tiny_config(tmp_path, **ADAPTIVE, **{"masking.tolerance": 0.3}).masking.tolerance == 0.3
    # each method's gap has its own units (KL of DINO's sharpened targets, of KD's soft labels,
    # DMAE's alignment loss), so each has its own default
    assert len({DINO.default_tolerance, KD.default_tolerance, DMAE.default_tolerance}) == 3
    assert [probe_interval(n) for n in (1, 99, 100, 250, 125_000)] == [1, 1, 1, 2, 1250]

    # with the interval unset, a run probes every hundredth of its length (schedules span all
    # epochs even when train.max_steps stops it early)
    run = {key: value for key, value in RUN.items() if key != "masking.probe_every_steps"}
    run |= {"train.max_steps": 7, "train.epochs": 2}
    cfg = tiny_config(tmp_path / "run", **run)
    every = probe_interval(2 * train_stream(cfg).steps_per_epoch)
    assert every > 1
    summary = train(cfg)
    assert summary["keep_ratio_adaptive"]["probes"] == len(range(0, 7, every))


# --- through the trainer ------------------------------------------------------------------------
RUN = {**ADAPTIVE, "masking.keep_ratio": 1.0, "masking.tolerance": 0.2,
       "masking.adaptive_step": 0.25, "masking.probe_every_steps": 2,
       "masking.probe_fraction": 0.25, "train.log_every_steps": 1, "train.max_steps": 4,
       "train.batch_size": 8}  # fmt: skip


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_counts_the_probes_cost_in_the_teachers_and_logs_the_ratio(tmp_path):
    summary = train(tiny_config(tmp_path, **RUN))
    lines = records(tmp_path)
    ratios = [line["method/keep_ratio"] for line in lines]
    assert ratios[:3] == [1.0, 0.75, 0.75]  # step 0's probe at 1.0 sees no gap: lowered
    assert min(ratios) < 1.0
    adaptive = summary["keep_ratio_adaptive"]
    assert adaptive["mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert adaptive["probes"] == 2

    # The teacher's cost, step by step: 2 global views × 8 images at the step's keep, plus on
    # probe steps with a masked teacher the full teacher on 2 views × 2 images.
    teacher = DINO.build(tiny_config(tmp_path / "cost", **RUN), tiny_backbone()).teacher
    masked = probes = 0
    for step, line in enumerate(lines):
        keep = num_kept(64, line["method/keep_ratio"])
        assert line["method/teacher_tokens_kept"] == keep + 1
        masked += 16 * forward_macs(teacher, 32, keep)
        if step % 2 == 0 and keep < 64:
            probes += 4 * forward_macs(teacher, 32)
    assert probes > 0  # a probe ran on a masked teacher
    assert adaptive["probe_pflops"] == pytest.approx(2 * probes / 1e15)
    assert summary["teacher_pflops"] == pytest.approx(2 * (masked + probes) / 1e15)
    assert adaptive["probe_share"] == pytest.approx(probes / (masked + probes))
    assert lines[-1]["masking/probe_share"] == pytest.approx(adaptive["probe_share"])
    assert lines[-1]["cost/probe_pflops_total"] == pytest.approx(adaptive["probe_pflops"])
    gaps = [line.get("masking/gap") for line in lines]
    assert gaps[0] == 0.0 and all(gap is not None and gap >= 0 for gap in gaps)
    assert adaptive["gap_last"] == gaps[-1]


def test_tolerance_zero_trains_exactly_as_the_unmasked_teacher(tmp_path):
    """From 1.0 with a zero tolerance the ratio never moves and no probe needs to run: the same
    weights and cost as a run without masking.adaptive."""
    common = {"masking.keep_ratio": 1.0, "train.max_steps": 3, "train.batch_size": 8}
    zero = RUN | common | {"masking.tolerance": 0.0, "masking.probe_every_steps": 1}
    adaptive = train(tiny_config(tmp_path / "adaptive", **zero))
    plain = train(tiny_config(tmp_path / "plain", **common))
    assert [line["method/keep_ratio"] for line in records(tmp_path / "adaptive")] == [1.0] * 3
    assert adaptive["keep_ratio_adaptive"]["final"] == 1.0
    assert adaptive["keep_ratio_adaptive"]["probe_pflops"] == 0.0
    assert adaptive["teacher_pflops"] == plain["teacher_pflops"] == plain["teacher_pflops_unmasked"]
    a = load_checkpoint(tmp_path / "adaptive" / "checkpoint.pth")["method"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoint.pth")["method"]
    assert all(torch.equal(a[key], b[key]) for key in b)


def test_the_ratio_and_its_tags_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path, **RUN | {"train.max_steps": 3}))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"method/keep_ratio", "masking/gap", "masking/probe_share",
            "cost/probe_pflops_total"} <= tags  # fmt: skip
    assert [event.value for event in events.Scalars("method/keep_ratio")] == [1.0, 0.75, 0.75]


def test_a_resumed_run_goes_on_from_the_ratio_it_got_to(tmp_path):
    train(tiny_config(tmp_path / "reference", **RUN))
    train(tiny_config(tmp_path / "run", **RUN | {"train.max_steps": 2}))
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["adaptive"]
    assert saved["ratio"] == 0.75 and saved["steps"] == 2  # not the start: it must be restored
    train(tiny_config(tmp_path / "run", **RUN))
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert final["adaptive"] == expected["adaptive"]
    assert final["totals"] == expected["totals"]  # the probes' cost too
    assert all(torch.equal(final["method"][k], v) for k, v in expected["method"].items())


@pytest.mark.slow
def test_sigkill_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path):
    extra = RUN | {"train.max_steps": 9, "train.checkpoint_every_steps": 3,
                   "masking.probe_every_steps": 1}  # fmt: skip
    train(tiny_config(tmp_path / "reference", **extra))
    run = tmp_path / "killed"
    (tmp_path / "run.yaml").write_text("{}\n")
    args = ["train", str(tmp_path / "run.yaml"), *tiny_overrides(run, **extra)]
    assert kill_and_resume(args, run, 4, env={"OMP_NUM_THREADS": "2"}) == 3
    final = load_checkpoint(run / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert final["adaptive"] == expected["adaptive"] and final["totals"] == expected["totals"]
    assert all(torch.equal(final["method"][k], v) for k, v in expected["method"].items())
    ratios = [line["method/keep_ratio"] for line in records(run)]
    assert ratios == [line["method/keep_ratio"] for line in records(tmp_path / "reference")]
    assert len(set(ratios)) > 1  # the ratio moved, across the kill too
    assert (
        json.loads((run / "summary.json").read_text())["keep_ratio_adaptive"]
        == json.loads((tmp_path / "reference" / "summary.json").read_text())["keep_ratio_adaptive"]
    )
