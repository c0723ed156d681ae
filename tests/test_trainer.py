import json

import pytest
import torch
import torch._inductor.config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_kd.engine.checkpoint import load_checkpoint, save_atomic
from ssl_kd.engine.trainer import Trainer, train
from tests.helpers import tiny_config


def test_resumed_run_continues_exactly(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "straight", **{"train.max_steps": 5}))
    losses = []
    epoch_iter = straight.stream.epoch(0)
    for _ in range(5):
        losses.append(straight.train_step(next(epoch_iter))["loss"])

    # interrupted run: 3 steps, checkpoint, a fresh process-like trainer resumes
    first = Trainer(tiny_config(tmp_path / "resumed", **{"train.max_steps": 3}))
    first.fit()
    assert load_checkpoint(first.checkpoint_path)["step"] == 3
    second = Trainer(tiny_config(tmp_path / "resumed", **{"train.max_steps": 5}))
    assert second.resume() and second.step == 3
    epoch_iter = second.stream.epoch(0, start_batch=3)
    resumed = [second.train_step(next(epoch_iter))["loss"] for _ in range(2)]
    assert resumed == pytest.approx(losses[3:], abs=1e-6)
    for a, b in zip(
        straight.method.state_dict().values(), second.method.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_fit_resumes_where_it_stopped(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 2})
    train(cfg)
    summary = train(tiny_config(tmp_path, **{"train.max_steps": 4}))
    assert summary["steps"] == 4
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 4]  # logged once per step, never restarted from 0


def test_tensorboard_events_hold_the_logged_tags(tmp_path):
    summary = train(tiny_config(tmp_path, **{"train.max_steps": 4, "eval.knn_at_end": True}))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss", "train/lr", "train/weight_decay", "train/images_per_s",
        "method/momentum", "method/teacher_temp", "method/keep_ratio", "method/grad_norm",
        "method/teacher_entropy", "method/teacher_batch_entropy",
        "cost/teacher_gflops_per_image", "cost/teacher_pflops_total", "eval/knn_top1",
    }  # fmt: skip
    assert expected <= tags
    loss = [e.value for e in events.Scalars("train/loss")]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    jsonl = [line["train/loss"] for line in lines if "train/loss" in line]
    assert lines[-1]["eval/knn_top1"] == summary["knn_top1"]
    assert loss == pytest.approx(jsonl)
    assert events.Scalars("method/keep_ratio")[-1].value == pytest.approx(0.5)
    # teacher at half the patches costs about half of the unmasked teacher
    assert 0.4 < summary["teacher_pflops"] / summary["teacher_pflops_unmasked"] < 0.6
    assert 0 <= summary["knn_top1"] <= 100


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 2}))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    trainer = Trainer(tiny_config(tmp_path, **{"train.max_steps": 4}))
    with torch.no_grad():
        trainer.method.student.backbone.vit.cls_token.fill_(float("nan"))
    trainer.resume = lambda: True  # keep the NaN weights
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0.*last good state"):
        trainer.fit()
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left


def test_corrupt_or_foreign_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        Trainer(tiny_config(tmp_path)).resume()
    torch.save({"weights": 1}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not an ssl_kd training checkpoint"):
        Trainer(tiny_config(tmp_path)).resume()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tiny_config(tmp_path, **{"train.max_steps": 1}))
    other = tiny_config(tmp_path, **{"model.name": "vit_small_patch16_224"})
    with pytest.raises(ValueError, match="written for model 'vit_tiny_patch16_224'"):
        Trainer(other).resume()
    wider = tiny_config(
        tmp_path, **{"model.kwargs": "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"}
    )
    with pytest.raises(ValueError, match="does not fit this configuration"):
        Trainer(wider).resume()


def test_a_log_step_logs_the_values_that_step_would_read_at_once(tmp_path):
    """Metrics stay on the device between log steps; metrics.jsonl holds, at each log step,
    the values a per-step read of that step gives."""
    overrides = {"train.max_steps": 4, "train.log_every_steps": 2}
    train(tiny_config(tmp_path / "logged", **overrides))
    twin = Trainer(tiny_config(tmp_path / "twin", **overrides))
    twin.method.train()
    batches = twin.stream.epoch(0)
    read = {}
    for _ in range(4):
        metrics = twin.train_step(next(batches))
        read[twin.step] = {key: float(value) for key, value in metrics.items()}
    jsonl = (tmp_path / "logged" / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in jsonl.splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        expected = read[line["step"]]
        assert line["train/loss"] == pytest.approx(expected["loss"], abs=1e-6)
        for key in ("dino_loss", "teacher_entropy", "teacher_batch_entropy", "grad_norm"):
            assert line[f"method/{key}"] == pytest.approx(expected[key], rel=1e-6, abs=1e-6)


def test_a_step_waits_for_the_device_once(tmp_path, monkeypatch):
    """Between log steps, the host reads one value per step: the loss, for the non-finite
    guard. Counted at the Python reads of a tensor (item, float, int, bool, tolist), except
    the reads of the precomputed schedules (host arrays, read as views of them)."""
    trainer = Trainer(tiny_config(tmp_path))
    trainer.method.train()
    batches = trainer.stream.epoch(0)
    trainer.train_step(next(batches))
    batch = next(batches)  # the crops' parameters are drawn on the host, outside the step
    reads = []
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            if self._base is None:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    metrics = trainer.train_step(batch)
    monkeypatch.undo()
    assert reads == ["__float__"]
    assert isinstance(metrics["dino_loss"], torch.Tensor)


@pytest.mark.slow  # compiling the forward and backward takes ~1-2 min on one core
@torch._inductor.config.patch(fallback_random=True)  # drop path from eager's generator
def test_the_compiled_step_gives_the_eager_loss(tmp_path):
    """train.compile=true: the same losses and weights as eager, step after step, on the same
    views (keep 0.5: the student's global views yield the [CLS] attention, the teacher runs
    masked), with inductor drawing drop path from eager's generator."""
    eager = Trainer(tiny_config(tmp_path / "eager"))
    compiled = Trainer(tiny_config(tmp_path / "compiled", **{"train.compile": True}))
    assert compiled.method.student.backbone.compiled and compiled.method.teacher.backbone.compiled
    batches = eager.stream.epoch(0)
    for trainer in (eager, compiled):
        trainer.method.train()
    for _ in range(3):
        views = next(batches)
        expected = eager.train_step(views)
        got = compiled.train_step(views)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-5)
        assert float(got["grad_norm"]) == pytest.approx(float(expected["grad_norm"]), rel=1e-3)
    for a, b in zip(eager.method.parameters(), compiled.method.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
