"""`method: kd` (ssl_kd/methods/kd.py): the losses against their formulas, the teacher fed
exactly the student's top-k patches (checked against a materialised attention matrix, as the
official MaskedKD code computes it), a frozen teacher loaded key by key, the teacher's cost,
and a resumed run bitwise equal to an uninterrupted one."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from ssl_kd.engine.build import build_method
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.flops import forward_macs
from ssl_kd.losses import hard_distillation_loss, soft_distillation_loss
from ssl_kd.masking import interpolate_scores, num_kept, select
from ssl_kd.methods.base import StepState
from ssl_kd.models.classifier import create_classifier, load_classifier_weights
from tests.helpers import TINY_VIT, kill_and_resume, tiny_config, tiny_overrides

TEACHER_VIT = {"patch_size": 4, "embed_dim": 96, "depth": 2, "num_heads": 3}


def teacher_classifier(**overrides):
    torch.manual_seed(1)
    return create_classifier("vit_tiny_patch16_224", 32, 10, **{**TEACHER_VIT, **overrides})


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A timm state dict (the layout of a timm or DeiT release, head included)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher_classifier().timm_model.state_dict(), path)
    return path


def kd_values(teacher_path, **extra):
    values = {
        "method": "kd", "kd.teacher_name": "vit_tiny_patch16_224",
        "kd.teacher_checkpoint": str(teacher_path),
        "kd.teacher_kwargs": "{patch_size: 4, embed_dim: 96, depth: 2, num_heads: 3}",
        "masking.keep_ratio": 0.5, "masking.strategy": "attention_topk",
        "optim.lr": 1e-2, "optim.weight_decay": 0.05, "optim.weight_decay_end": 0.05,
        "data.hflip_prob": 0.0, "eval.classify_at_end": False,
    }  # fmt: skip
    values.update(extra)
    return values


def kd_config(tmp_path, teacher_path, **extra):
    return tiny_config(tmp_path, **kd_values(teacher_path, **extra))


# --- losses -----------------------------------------------------------------------------------
def test_soft_and_hard_losses_equal_their_formulas():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]])
    tau = 2.0
    p_teacher = (teacher / tau).softmax(-1)
    log_p_student = (student / tau).log_softmax(-1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean()  # per image, mean
    assert soft_distillation_loss(student, teacher, tau).item() == pytest.approx(
        (tau**2 * kl).item(), rel=1e-6
    )
    # MaskedKD's own expression: KLDivLoss(batchmean)(log_softmax(s/τ), softmax(t/τ)) · τ²
    official = torch.nn.KLDivLoss(reduction="batchmean")(log_p_student, p_teacher) * tau**2
    assert soft_distillation_loss(student, teacher, tau).item() == pytest.approx(official.item())
    assert soft_distillation_loss(teacher, teacher, tau).item() == pytest.approx(0, abs=1e-7)
    hard = -(student.log_softmax(-1)[[0, 1], [0, 2]]).mean()  # the teacher's top classes: 0, 2
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(hard.item())


@pytest.mark.parametrize("distillation", ["soft", "hard"])
def test_method_loss_is_the_weighted_sum(tmp_path, teacher_file, distillation):
    """(1 − α) · CE with label smoothing + α · distillation, on the method's own logits."""
    cfg = kd_config(
        tmp_path, teacher_file, **{"kd.distillation": distillation, "kd.alpha": 0.3,
                                   "kd.tau": 3.0, "masking.keep_ratio": 1.0}
    )  # fmt: skip
    method = build_method(cfg).eval()  # no drop path: the logits are recomputed below
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    out = method([images, labels], StepState(0, 0, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        student = method.student(images).logits
        teacher = method.teacher(images).logits
    ce = F.cross_entropy(student, labels, label_smoothing=0.1)
    distill = (
        soft_distillation_loss(student, teacher, 3.0)
        if distillation == "soft"
        else hard_distillation_loss(student, teacher)
    )
    assert out.loss.item() == pytest.approx((0.7 * ce + 0.3 * distill).item(), rel=1e-5)
    assert out.metrics["distill_loss"] == pytest.approx(distill.item(), rel=1e-5)


# --- which patches the teacher sees -----------------------------------------------------------
def materialised_cls_scores(classifier, images):
    """MaskedKD's official score: the last block's full post-softmax attention matrix (unfused
    attention), mean over heads, [CLS] query row, patch keys. [B, N]."""
    vit = copy.deepcopy(classifier.timm_model).eval()
    attention = vit.blocks[-1].attn
    attention.fused_attn = False
    captured = []
    attention.attn_drop.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    with torch.no_grad():
        vit(images)
    return captured[0].mean(dim=1)[:, 0, vit.num_prefix_tokens :]


def record_teacher_inputs(method):
    received = []
    forward = method.teacher.forward

    def recording(images, keep_idx=None, **kwargs):
        received.append(keep_idx)
        return forward(images, keep_idx, **kwargs)

    method.teacher.forward = recording
    return received


@pytest.mark.parametrize(
    ("strategy", "teacher_patch"),
    [("attention_topk", 4), ("attention_bottomk", 4), ("random", 4), ("attention_topk", 8)],
)
def test_the_teacher_receives_exactly_the_chosen_patches(
    tmp_path, teacher_file, strategy, teacher_patch
):
    teacher_path = teacher_file
    if teacher_patch != 4:  # a teacher on a coarser grid (4 × 4): the scores are resampled
        teacher_path = tmp_path / "coarse.pth"
        coarse = teacher_classifier(patch_size=teacher_patch)
        torch.save(coarse.timm_model.state_dict(), teacher_path)
    kwargs = f"{{patch_size: {teacher_patch}, embed_dim: 96, depth: 2, num_heads: 3}}"
    cfg = kd_config(
        tmp_path, teacher_path, **{"masking.strategy": strategy, "kd.teacher_kwargs": kwargs}
    )
    method = build_method(cfg).eval()
    teacher_grid = (32 // teacher_patch,) * 2
    patches = teacher_grid[0] * teacher_grid[1]
    keep = num_kept(patches, 0.5)
    for kept in (keep, None):  # the cost is measured by a forward of its own, done beforehand
        method.teacher_macs(kept)
    received = record_teacher_inputs(method)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    out = method([images, labels], StepState(5, 0, torch.Generator().manual_seed(11)))

    if strategy == "random":
        expected = select(
            None, keep, "random", num_patches=patches, batch_size=3,
            generator=torch.Generator().manual_seed(11),
        )  # fmt: skip
    else:
        scores = interpolate_scores(
            materialised_cls_scores(method.student, images), (8, 8), teacher_grid
        )
        ranked = scores.topk(keep, dim=1, largest=strategy == "attention_topk").indices
        expected = ranked.sort(dim=1).values
    assert len(received) == 1 and received[0].shape == (3, keep)
    assert torch.equal(received[0], expected)
    assert out.metrics["teacher_tokens_kept"] == keep + 1
    # and its logits are those of the teacher on exactly these patches
    with torch.no_grad():
        teacher_logits = method.teacher(images, expected).logits
    student_logits = method.student(images).logits
    distill = soft_distillation_loss(student_logits, teacher_logits, 1.0)
    assert out.metrics["distill_loss"] == pytest.approx(distill.item(), rel=1e-5)


def test_teacher_cost_is_counted_per_kept_patch(tmp_path, teacher_file):
    method = build_method(kd_config(tmp_path, teacher_file, **{"masking.keep_ratio": 0.25}))
    out = method(
        [torch.randn(2, 3, 32, 32), torch.tensor([0, 1])], StepState(0, 0, torch.Generator())
    )
    teacher = method.teacher
    assert out.teacher_macs == 2 * forward_macs(teacher, 32, 16)
    assert out.teacher_macs_unmasked == 2 * forward_macs(teacher, 32)
    assert 0.2 < out.teacher_macs / out.teacher_macs_unmasked < 0.3


# --- the teacher's file and weights -------------------------------------------------------------
def test_teacher_is_frozen_unchanged_by_training_and_never_saved(tmp_path, teacher_file):
    from ssl_kd.engine.trainer import Trainer

    cfg = kd_config(tmp_path, teacher_file, **{"train.max_steps": 4, "eval.classify_at_end": True})
    trainer = Trainer(cfg)
    expected = torch.load(teacher_file)
    summary = trainer.fit()
    state = trainer.method.teacher.timm_model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not trainer.method.teacher.training
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in trainer.method.teacher.parameters())
    saved = load_checkpoint(tmp_path / "checkpoint.pth")["method"]
    assert not any(key.startswith("teacher") for key in saved)
    # the run reports what a distillation run reports
    assert summary["teacher_pflops"] < summary["teacher_pflops_unmasked"]
    assert 0 <= summary["val_top1"] <= summary["val_top5"] <= 100
    assert summary["keep_ratio"] == 0.5 and summary["masking_strategy"] == "attention_topk"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"method/distill_loss", "cost/teacher_gflops_per_image"} <= lines[0].keys()


def test_a_supervised_run_is_a_teacher_and_files_are_checked_key_by_key(tmp_path, teacher_file):
    run = tmp_path / "teacher_run"
    train(
        tiny_config(
            run, **{"method": "supervised", "masking.keep_ratio": 1.0, "train.max_steps": 2,
                    "model.kwargs": "{patch_size: 4, embed_dim: 96, depth: 2, num_heads: 3}"}
        )
    )  # fmt: skip
    teacher = teacher_classifier()
    assert load_classifier_weights(teacher, run / "checkpoint.pth").startswith("ssl_kd run")
    saved = load_checkpoint(run / "checkpoint.pth")["method"]
    assert torch.equal(teacher.timm_model.head.weight, saved["student.backbone.vit.head.weight"])
    method = build_method(kd_config(tmp_path / "kd", run / "checkpoint.pth"))
    assert torch.equal(method.teacher.timm_model.pos_embed, saved["student.backbone.vit.pos_embed"])

    deit_release = tmp_path / "deit.pth"  # DeiT's layout: {"model": ...}
    torch.save({"model": torch.load(teacher_file)}, deit_release)
    assert "DeiT" in load_classifier_weights(teacher_classifier(), deit_release)
    wrong = torch.load(teacher_file)
    wrong["head.weight"] = torch.zeros(5, 96)
    del wrong["blocks.1.mlp.fc2.bias"]
    wrong["head_dist.weight"] = torch.zeros(10, 96)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError) as err:
        load_classifier_weights(teacher_classifier(), tmp_path / "wrong.pth")
    message = str(err.value)
    assert "missing keys ['blocks.1.mlp.fc2.bias']" in message
    assert "unexpected keys ['head_dist.weight']" in message
    assert "head.weight: file (5, 96) vs model (10, 96)" in message
    with pytest.raises(UserError, match="does not fit"):  # a DINO run: no classifier head
        dino = tmp_path / "dino"
        train(tiny_config(dino, **{"train.max_steps": 1}))
        load_classifier_weights(create_classifier("vit_tiny_patch16_224", 32, 10, **TINY_VIT),
                                dino / "checkpoint.pth")  # fmt: skip


def test_config_errors_name_the_key(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match=r"kd\.teacher_checkpoint is not set"):
        tiny_config(tmp_path, **kd_values(teacher_file, **{"kd.teacher_checkpoint": "null"}))
    with pytest.raises(ConfigError, match=r"kd\.teacher_checkpoint=.*does not exist"):
        kd_config(tmp_path, tmp_path / "missing.pth")
    resnet_teacher = {"kd.teacher_name": "resnet18", "kd.teacher_kwargs": "{}"}
    with pytest.raises(ConfigError, match=r"is not a ViT; use 1\.0"):
        kd_config(tmp_path, teacher_file, **resnet_teacher)
    resnet_student = {"model.name": "resnet18", "model.kwargs": "{}"}
    with pytest.raises(ConfigError, match=r"model\.name=resnet18 is not a ViT; use random"):
        kd_config(tmp_path, teacher_file, **resnet_student)
    kd_config(tmp_path, teacher_file, **resnet_student, **{"masking.strategy": "random"})
    with pytest.raises(ConfigError, match=r"kd\.alpha=1\.5 must lie in \[0, 1\]"):
        kd_config(tmp_path, teacher_file, **{"kd.alpha": 1.5})
    with pytest.raises(ConfigError, match=r"kd\.mixup=-1\.0 must be >= 0"):
        kd_config(tmp_path, teacher_file, **{"kd.mixup": -1})


def test_a_resnet_student_learns_from_a_masked_teacher_at_random(tmp_path, teacher_file):
    cfg = kd_config(
        tmp_path, teacher_file, **{"model.name": "resnet18", "masking.strategy": "random",
        "model.kwargs": "{layers: [1, 1, 1, 1], channels: [16, 32, 64, 128], stem_width: 16}",
        "train.max_steps": 3}
    )  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["teacher_pflops"] < summary["teacher_pflops_unmasked"]


# --- resume -------------------------------------------------------------------------------------
def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("strategy", ["attention_topk", "random"])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, teacher_file, strategy):
    extra = {"masking.strategy": strategy, "kd.mixup": 0.8, "kd.cutmix": 1.0,
             "train.checkpoint_every_steps": 2}  # fmt: skip
    train(kd_config(tmp_path / "reference", teacher_file, **extra, **{"train.max_steps": 5}))
    train(kd_config(tmp_path / "run", teacher_file, **extra, **{"train.max_steps": 3}))
    train(kd_config(tmp_path / "run", teacher_file, **extra, **{"train.max_steps": 5}))
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert_same_state(final["method"], expected["method"])
    assert final["totals"] == expected["totals"]  # the teacher's cost too


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_reaches_the_same_weights(tmp_path, teacher_file):
    """As DINO's and MAE's (tests/test_faults.py): a real process killed between checkpoints,
    then the same command, against an uninterrupted run."""
    extra = kd_values(
        teacher_file, **{"kd.mixup": 0.8, "kd.cutmix": 1.0, "train.max_steps": 9,
                         "train.checkpoint_every_steps": 3, "train.log_every_steps": 1}
    )  # fmt: skip
    train(tiny_config(tmp_path / "reference", **extra))
    run = tmp_path / "killed"
    (tmp_path / "run.yaml").write_text("{}\n")
    args = ["train", str(tmp_path / "run.yaml"), *tiny_overrides(run, **extra)]
    assert kill_and_resume(args, run, 4, env={"OMP_NUM_THREADS": "2"}) == 3
    final = load_checkpoint(run / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert_same_state(final["method"], expected["method"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))


# --- the adaptive keep ratio ------------------------------------------------------------------
def test_the_adaptive_probe_measures_kl_of_the_soft_labels_at_tau_and_its_cost(
    tmp_path, teacher_file
):
    adaptive = {"masking.adaptive": True, "masking.probe_every_steps": 2,
                "masking.probe_fraction": 0.5, "kd.tau": 2.0}  # fmt: skip
    method = build_method(kd_config(tmp_path, teacher_file, **adaptive)).eval()
    assert method.adaptive is not None and method.adaptive.ratio == 0.5  # masking.keep_ratio
    for kept in (32, None):  # the cost is measured by a forward of its own, done beforehand
        method.teacher_macs(kept)
    received = record_teacher_inputs(method)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = method([images, labels], StepState(0, 0, torch.Generator().manual_seed(3)))
    keep_idx, probe_idx = received
    assert keep_idx.shape == (4, 32) and probe_idx is None  # the probe: every patch
    with torch.no_grad():
        masked = method.teacher(images[:2], keep_idx[:2]).logits
        full = method.teacher(images[:2]).logits
    p_full = F.softmax(full / 2.0, dim=-1)
    expected = (p_full * (p_full.log() - F.log_softmax(masked / 2.0, dim=-1))).sum(-1).mean()
    assert out.keep_ratio_gap == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert out.keep_ratio_gap > 0
    full_macs = forward_macs(method.teacher, 32)
    assert out.probe_macs == 2 * full_macs
    assert out.teacher_macs == 4 * forward_macs(method.teacher, 32, 32) + 2 * full_macs
    received.clear()
    later = method([images, labels], StepState(1, 0, torch.Generator().manual_seed(3)))
    assert len(received) == 1 and later.keep_ratio_gap is None and later.probe_macs == 0


def test_adaptive_needs_a_vit_teacher(tmp_path, teacher_file):
    resnet_teacher = {"kd.teacher_name": "resnet18", "kd.teacher_kwargs": "{}",
                      "masking.keep_ratio": 1.0, "masking.adaptive": True}  # fmt: skip
    with pytest.raises(ConfigError, match=r"masking\.adaptive=true masks the teacher's patches, "
                       r"but kd\.teacher_name=resnet18 is not a ViT; set it to false"):  # fmt: skip
        kd_config(tmp_path, teacher_file, **resnet_teacher)
