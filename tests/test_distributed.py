"""torch.distributed training: 2 gloo processes (real torchrun) vs 1 process, same global batch.

What makes the two runs equal, and so what these tests check:
- each rank's batch is its every-2nd row of the 1-process batch (`EpochPermutation`), and the
  augmentation and random masks are drawn for the global batch and sliced per rank;
- DINO's loss and the MAE/DMAE losses are means over the batch and DDP averages gradients, so
  the averaged gradient is the 1-process gradient;
- lightly's DINO center all-reduces the batch center (`center_mean`), so the center matches;
- drop path is off (its draws cannot match across different batch splits) and the DINO head has
  no BatchNorm.
DINO runs with student-guided masking (attention_topk, deterministic given the weights) and with
random masking; DMAE with random masking (its only strategy).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.distributed import DistContext
from ssl_kd.engine.trainer import train
from tests.helpers import official_mae_state, run_cli, teacher_backbone, tiny_overrides

pytestmark = pytest.mark.distributed

STEPS = 4
PER_RANK_BATCH = 16
# Float sums run in another order with half batches; 4 AdamW steps keep the drift near 1e-6.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


def torchrun(overrides: list[str], nproc: int = 2, timeout: float = 180) -> None:
    """`torchrun --standalone --nproc-per-node N -m ssl_kd.cli train` (the documented command)."""
    config = Path(overrides[0].split("=", 1)[1]).with_suffix(".yaml")  # beside output_dir
    config.write_text("method: dino\n")  # everything else is in the overrides
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = run_cli(
        "train", str(config), *overrides,
        env={"OMP_NUM_THREADS": "1"}, timeout=timeout, launcher=launcher,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {record["step"]: record["train/loss"] for record in records if "train/loss" in record}


def assert_same_run(single: Path, pair: Path) -> None:
    single_losses, pair_losses = losses(single), losses(pair)
    assert sorted(pair_losses) == list(range(1, STEPS + 1))
    for step, loss in single_losses.items():
        assert pair_losses[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step
    # the losses move by more than the tolerance, so matching them is not trivial
    values = [single_losses[step] for step in sorted(single_losses)]
    assert len(values) == STEPS
    assert all(abs(a - b) > LOSS_TOLERANCE for a, b in itertools.pairwise(values))
    single_state = load_checkpoint(single / "checkpoint.pth")
    pair_state = load_checkpoint(pair / "checkpoint.pth")
    assert pair_state["step"] == single_state["step"] == STEPS
    assert pair_state["method"].keys() == single_state["method"].keys()
    for key, value in single_state["method"].items():
        other = pair_state["method"][key]
        assert torch.allclose(other.float(), value.float(), atol=WEIGHT_TOLERANCE), key
    # the teacher cost of both ranks' images is summed, as in the 1-process run
    single_summary = json.loads((single / "summary.json").read_text())
    pair_summary = json.loads((pair / "summary.json").read_text())
    assert pair_summary["teacher_pflops"] == pytest.approx(single_summary["teacher_pflops"])


def run_both(tmp_path: Path, **values: object) -> tuple[Path, Path]:
    common = {
        "model.drop_path_rate": 0.0, "train.max_steps": STEPS, "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 2, "optim.warmup_epochs": 0, "optim.lr": 2e-3, **values,
    }  # fmt: skip
    single, pair = tmp_path / "single", tmp_path / "pair"
    train_single = tiny_overrides(single, **common, **{"train.batch_size": 2 * PER_RANK_BATCH})
    from ssl_kd.run_config import load_config

    train(load_config(None, train_single))
    torchrun(tiny_overrides(pair, **common, **{"train.batch_size": PER_RANK_BATCH}))
    return single, pair


@pytest.mark.parametrize(
    "strategy", ["attention_topk", pytest.param("random", marks=pytest.mark.slow)]
)
def test_dino_two_processes_match_one_process(tmp_path, strategy):
    single, pair = run_both(tmp_path, **{"masking.strategy": strategy})
    assert_same_run(single, pair)
    # the center is all-reduced: without it the two ranks' centers (and the run) would differ
    center = load_checkpoint(pair / "checkpoint.pth")["method"]["loss_fn.center"]
    assert center.abs().sum() > 0
    for rank in (0, 1):
        log = (pair / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}/2" in log and "in all" in log
    assert not (single / "logs" / "rank1.log").exists()


def test_dmae_two_processes_match_one_process(tmp_path):
    teacher = tmp_path / "mae.pth"
    torch.save(official_mae_state(teacher_backbone()), teacher)
    single, pair = run_both(
        tmp_path,
        **{
            "method": "dmae", "masking.keep_ratio": 0.25, "masking.strategy": "random",
            "dmae.teacher_name": "vit_tiny_patch16_224", "dmae.teacher_checkpoint": str(teacher),
            "dmae.teacher_kwargs": "{patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}",
            "dmae.aligned_blocks": "[[1, 2]]", "dmae.decoder_dim": 32, "dmae.decoder_depth": 1,
            "dmae.decoder_heads": 2,
        },
    )  # fmt: skip
    assert_same_run(single, pair)


def test_ddp_wraps_the_student_only_and_keeps_the_state_dict(tmp_path):
    """A real (1-rank gloo) DDP: the teacher stays outside it, checkpoints keep their keys."""
    import torch.distributed as dist

    from ssl_kd.engine import distributed
    from ssl_kd.engine.build import build_method
    from tests.helpers import tiny_config

    method = build_method(tiny_config(tmp_path))
    keys = list(method.state_dict())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        method.wrap_trainable(lambda module: distributed.wrap_ddp(module, DistContext()))
        wrapper = method.student_call
        assert isinstance(wrapper, torch.nn.parallel.DistributedDataParallel)
        assert wrapper.module is method.student
        wrapped = {id(p) for p in wrapper.parameters()}
        assert wrapped == {id(p) for p in method.student.parameters()}
        assert not wrapped & {id(p) for p in method.teacher.parameters()}
        assert list(method.state_dict()) == keys  # no `module.` copy, no wrapper copy
    finally:
        dist.destroy_process_group()


def test_batch_norm_head_becomes_sync_batch_norm_on_cuda_ddp_only(tmp_path):
    """Official DINO converts BatchNorm to SyncBatchNorm in student and teacher under DDP.
    torch's SyncBatchNorm refuses CPU inputs, so CPU (gloo) runs keep per-process BatchNorm;
    the conversion itself needs no GPU, so the CUDA decision is checked here on CPU."""
    from torch.nn import BatchNorm1d, SyncBatchNorm

    from ssl_kd.engine import distributed
    from ssl_kd.engine.build import build_method
    from tests.helpers import tiny_config

    method = build_method(tiny_config(tmp_path, **{"dino.batch_norm": True}))
    state = {key: value.clone() for key, value in method.state_dict().items()}

    def norms(kind):
        return [
            [m for m in network.head.modules() if isinstance(m, kind)]
            for network in (method.student, method.teacher)
        ]

    assert [len(found) for found in norms(BatchNorm1d)] == [2, 2]
    for ctx in (DistContext(), DistContext(0, 2, 0, torch.device("cpu"))):
        distributed.sync_batch_norms(method, ctx)
        assert norms(SyncBatchNorm) == [[], []]
    distributed.sync_batch_norms(method, DistContext(0, 2, 0, torch.device("cuda", 0)))
    assert [len(found) for found in norms(SyncBatchNorm)] == [2, 2]
    method.train()  # the teacher's head normalises with batch statistics, now synchronised
    assert all(m.training for m in norms(SyncBatchNorm)[1]) and not method.teacher.backbone.training
    after = method.state_dict()
    assert list(after) == list(state)  # checkpoints load either way
    assert all(torch.equal(after[key], value) for key, value in state.items())


def test_torchs_sync_batch_norm_refuses_cpu_inputs(tmp_path):
    """Why CPU (gloo) runs keep per-process BatchNorm: if torch ever syncs CPU tensors, this
    fails and `sync_batch_norms` may convert on CPU too."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            torch.nn.SyncBatchNorm(4).train()(torch.randn(3, 4))
    finally:
        dist.destroy_process_group()


def test_the_trainer_converts_before_wrapping_in_ddp(tmp_path, monkeypatch):
    from ssl_kd.engine import distributed
    from ssl_kd.engine.trainer import Trainer
    from tests.helpers import tiny_config

    calls = []
    monkeypatch.setattr(
        distributed, "sync_batch_norms", lambda module, ctx: calls.append(("sync", ctx))
    )
    monkeypatch.setattr(
        distributed, "wrap_ddp", lambda module, ctx: calls.append(("ddp", ctx)) or module
    )
    ctx = DistContext(0, 2, 0, torch.device("cpu"))  # no process group: both steps faked
    Trainer(tiny_config(tmp_path, **{"dino.batch_norm": True}), ctx)
    assert calls == [("sync", ctx), ("ddp", ctx)]


def test_batch_larger_than_the_share_per_process_is_named(tmp_path):
    from ssl_kd.errors import ConfigError
    from tests.helpers import tiny_config, train_stream

    cfg = tiny_config(tmp_path, **{"train.batch_size": 1000})
    train_stream(cfg, rank=0, world_size=1)  # 1437 digits: fits one process
    with pytest.raises(ConfigError, match=r"1000 \(per process\).*1437 images / 2 processes"):
        train_stream(cfg, rank=1, world_size=2)


@pytest.mark.slow
def test_resume_gives_every_rank_the_saved_config(tmp_path):
    """`--resume` continues the saved run with its own values, on every rank. The resumed
    command asks for another student temperature; every rank must keep the saved one, so steps
    3-4 log the losses (averaged over ranks) of the run that was never interrupted. A rank left
    with the command line's temperature would change the averaged loss at once."""
    common = {
        "model.drop_path_rate": 0.0, "train.batch_size": PER_RANK_BATCH,
        "train.log_every_steps": 1,
    }  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    torchrun(tiny_overrides(straight, **common, **{"train.max_steps": 4}), timeout=120)
    torchrun(tiny_overrides(interrupted, **common, **{"train.max_steps": 2}), timeout=120)
    changed = {"train.max_steps": 4, "dino.student_temp": 0.2}
    torchrun([*tiny_overrides(interrupted, **common, **changed), "--resume"], timeout=120)
    resumed = load_checkpoint(interrupted / "checkpoint.pth")
    assert resumed["step"] == 4  # max_steps may change on resume (how long, not what)
    assert resumed["config"]["dino"]["student_temp"] == 0.1
    expected, got = losses(straight), losses(interrupted)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=LOSS_TOLERANCE)


def test_a_held_output_dir_stops_every_rank_with_the_holders_name(tmp_path):
    """Rank 0 alone takes the output dir's lock (a successful 2-rank run above shows that rank
    1 never tries: it would find rank 0's lock); when another run holds it, rank 0 hands the
    one-line error to every rank, and none waits for a config that never comes."""
    import os

    from ssl_kd.engine.lock import RunLock

    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("method: dino\n")
    holder = RunLock(run)
    holder.acquire()
    try:
        result = run_cli(
            "train", str(config), *tiny_overrides(run, **{"train.batch_size": PER_RANK_BATCH}),
            env={"OMP_NUM_THREADS": "1"}, timeout=180,
            launcher=["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
        )  # fmt: skip
    finally:
        holder.release()
    assert result.returncode != 0
    message = f"ssl-kd: error: output_dir {run} is in use by another run: pid {os.getpid()}"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # rank 0 and rank 1
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_adaptive_keep_ratio_moves_identically_on_both_ranks(tmp_path):
    """The probe's gap is averaged over the ranks before the controller sees it, so both ranks
    move their ratio together and their masked teachers keep as many patches. Each rank probes
    the first quarter of its shard: together the same 8 images the 1-process run probes."""
    from ssl_kd.masking import num_kept

    single, pair = run_both(
        tmp_path,
        **{
            "masking.adaptive": True, "masking.keep_ratio": 1.0, "masking.tolerance": 0.2,
            "masking.adaptive_step": 0.25, "masking.probe_every_steps": 1,
            "masking.probe_fraction": 0.25,
        },
    )  # fmt: skip
    assert_same_run(single, pair)
    records = {
        run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (single, pair)
    }
    ratios = [line["method/keep_ratio"] for line in records[pair]]
    assert ratios == [line["method/keep_ratio"] for line in records[single]]
    assert len(set(ratios)) > 1  # the ratio moved
    # a rank mean of the tokens each rank's teacher kept: whole only if both kept as many
    for line in records[pair]:
        assert line["method/teacher_tokens_kept"] == num_kept(64, line["method/keep_ratio"]) + 1
    for single_line, pair_line in zip(records[single], records[pair], strict=True):
        assert pair_line["masking/gap"] == pytest.approx(single_line["masking/gap"], rel=1e-4)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (single, pair)]
    assert (
        summaries[0]["keep_ratio_adaptive"]["final"] == summaries[1]["keep_ratio_adaptive"]["final"]
    )
