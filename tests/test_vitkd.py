"""`method: vitkd` (ssl_kd/methods/vitkd.py): both ViTKD terms against the official code's
computation, written out here, with a whole teacher and with a MaskedKD teacher (terms on the
kept tokens only); the heads train, the teacher does not; exact resume."""

import pytest
import torch
from torch import nn

from ssl_kd.engine.build import build_method
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import Trainer, train
from ssl_kd.errors import ConfigError
from ssl_kd.losses import vitkd_generation_loss, vitkd_mimic_loss
from ssl_kd.masking import complement, select
from ssl_kd.methods.base import StepState
from ssl_kd.models.classifier import create_classifier
from tests.helpers import tiny_config

TEACHER_KWARGS = "{patch_size: 4, embed_dim: 96, depth: 3, num_heads: 3}"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    teacher = create_classifier(
        "vit_tiny_patch16_224", 32, 10, patch_size=4, embed_dim=96, depth=3, num_heads=3
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher.timm_model.state_dict(), path)
    return path


def vitkd_config(tmp_path, teacher_path, **extra):
    values = {
        "method": "vitkd", "vitkd.teacher_name": "vit_tiny_patch16_224",
        "vitkd.teacher_checkpoint": str(teacher_path), "vitkd.teacher_kwargs": TEACHER_KWARGS,
        "masking.keep_ratio": 1.0, "optim.lr": 1e-2, "data.hflip_prob": 0.0,
        "eval.classify_at_end": False,
        # weights large enough for the terms to move the heads in a few steps
        "vitkd.mimic_weight": 1e-2, "vitkd.generation_weight": 1e-2,
    }  # fmt: skip
    values.update(extra)
    return tiny_config(tmp_path, **values)


def official_vitkd(heads, low_s, low_t, high_s, high_t, masked, alpha, beta, lam):
    """yzd-v/cls_KD's ViTKDLoss.forward, with its random mask given: low_* [B, 2, N, D],
    high_* [B, N, D] patch tokens, masked [B, N] (1 = replaced by the mask token)."""
    batch = low_s.shape[0]
    mse = nn.MSELoss(reduction="sum")
    aligned = torch.stack([heads.mimic[i](low_s[:, i]) for i in range(2)], dim=1)
    mimic = mse(aligned, low_t) / batch * alpha
    x = heads.align(high_s)
    mask = masked.unsqueeze(-1).float()
    x = x * (1 - mask) + heads.mask_token * mask
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(batch, side, side, -1).permute(0, 3, 1, 2)
    x = heads.generation(x).flatten(2).transpose(1, 2)
    generation = mse(x * mask, high_t * mask) / batch * beta / lam
    return mimic, generation


def test_losses_equal_their_formulas():
    student, teacher = torch.randn(2, 2, 5, 3), torch.randn(2, 2, 5, 3)
    assert vitkd_mimic_loss(student, teacher).item() == pytest.approx(
        ((student - teacher) ** 2).sum().item() / 2, rel=1e-6
    )
    generated, target = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    compared = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    expected = ((generated - target) ** 2).sum(-1)[compared.bool()].sum() / 2 / 0.5
    assert vitkd_generation_loss(generated, target, compared, 0.5).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def step(method, images, labels, seed):
    return method([images, labels], StepState(2, 0, torch.Generator().manual_seed(seed)))


def features(classifier, images, keep_idx=None):
    with torch.no_grad():
        return classifier(images, keep_idx, return_blocks=(0, 1))


def test_the_terms_are_the_official_ones_with_a_whole_teacher(tmp_path, teacher_file):
    method = build_method(vitkd_config(tmp_path, teacher_file)).eval()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    out = step(method, images, labels, seed=4)
    # the generation mask: the step generator's first draw (keep 1.0 and no Mixup draw nothing)
    visible = select(None, 32, "random", num_patches=64, batch_size=3,
                     generator=torch.Generator().manual_seed(4))  # fmt: skip
    masked = torch.zeros(3, 64, dtype=torch.bool).scatter_(1, complement(visible, 64), True)
    s, t = features(method.student, images), features(method.teacher, images)
    with torch.no_grad():
        mimic, generation = official_vitkd(
            method.heads,
            torch.stack([s.block_outputs[0][:, 1:], s.block_outputs[1][:, 1:]], dim=1),
            torch.stack([t.block_outputs[0][:, 1:], t.block_outputs[1][:, 1:]], dim=1),
            s.tokens[:, 1:], t.tokens[:, 1:], masked, 1.0, 1.0, 0.5,
        )  # fmt: skip
    assert out.metrics["mimic_loss"] == pytest.approx(mimic.item(), rel=1e-5)
    assert out.metrics["generation_loss"] == pytest.approx(generation.item(), rel=1e-5)
    logit_terms = float(0.5 * out.metrics["ce_loss"] + 0.5 * out.metrics["distill_loss"])
    assert out.loss.item() == pytest.approx(
        logit_terms + 1e-2 * (mimic.item() + generation.item()), rel=1e-5
    )


def test_with_a_masked_teacher_the_terms_use_the_kept_tokens_only(tmp_path, teacher_file):
    cfg = vitkd_config(tmp_path, teacher_file, **{"masking.keep_ratio": 0.5})
    method = build_method(cfg).eval()
    received = []
    forward = method.teacher.forward
    method.teacher.forward = lambda images, keep_idx=None, **kw: (
        received.append(keep_idx) or forward(images, keep_idx, **kw)
    )
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    out = step(method, images, labels, seed=9)
    keep_idx = received[0]  # the student's top 32 of 64 patches
    assert keep_idx.shape == (2, 32)
    s, t = features(method.student, images), features(method.teacher, images, keep_idx)
    index = keep_idx.unsqueeze(-1).expand(-1, -1, 64)
    kept_student = [s.block_outputs[b][:, 1:].gather(1, index) for b in (0, 1)]
    with torch.no_grad():
        aligned = torch.stack([method.heads.mimic[b](kept_student[b]) for b in (0, 1)], dim=1)
    teacher_shallow = torch.stack([t.block_outputs[b][:, 1:] for b in (0, 1)], dim=1)
    expected = ((aligned - teacher_shallow) ** 2).sum() / 2
    assert out.metrics["mimic_loss"] == pytest.approx(expected.item(), rel=1e-5)
    # generation: compared only where the token was masked and the teacher saw the patch
    visible = select(None, 32, "random", num_patches=64, batch_size=2,
                     generator=torch.Generator().manual_seed(9))  # fmt: skip
    masked = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, complement(visible, 64), True)
    seen = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, keep_idx, True)
    with torch.no_grad():
        _, generated = method.heads([kept_student[0], kept_student[1]], s.tokens[:, 1:], masked)
    target = torch.zeros(2, 64, 96).scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, 96),
                                             t.tokens[:, 1:])  # fmt: skip
    compared = (masked & seen).unsqueeze(-1)
    expected = (((generated - target) ** 2) * compared).sum() / 2 / 0.5
    assert out.metrics["generation_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_heads_train_and_the_teacher_does_not(tmp_path, teacher_file):
    trainer = Trainer(vitkd_config(tmp_path, teacher_file, **{"train.max_steps": 3}))
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in trainer.method.heads.parameters())
    assert not any(id(p) in trained for p in trainer.method.teacher.parameters())
    before = {k: v.clone() for k, v in trainer.method.heads.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    trainer.fit()
    after = trainer.method.heads.state_dict()
    assert not torch.equal(before["generation.0.weight"], after["generation.0.weight"])
    assert not torch.equal(before["mask_token"], after["mask_token"])
    assert all(torch.equal(v, trainer.method.teacher.state_dict()[k])
               for k, v in teacher_before.items())  # fmt: skip
    saved = load_checkpoint(tmp_path / "checkpoint.pth")["method"]
    assert "heads.mask_token" in saved and not any(k.startswith("teacher") for k in saved)


def test_resume_reaches_the_same_weights(tmp_path, teacher_file):
    extra = {"masking.keep_ratio": 0.5, "train.checkpoint_every_steps": 2}
    train(vitkd_config(tmp_path / "reference", teacher_file, **extra, **{"train.max_steps": 4}))
    train(vitkd_config(tmp_path / "run", teacher_file, **extra, **{"train.max_steps": 2}))
    train(vitkd_config(tmp_path / "run", teacher_file, **extra, **{"train.max_steps": 4}))
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["method"]
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")["method"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_config_errors(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match=r"the student's patch grid \(8, 8\) differs"):
        vitkd_config(
            tmp_path,
            teacher_file,
            **{"vitkd.teacher_kwargs": "{patch_size: 8, embed_dim: 96, depth: 3, num_heads: 3}"},
        )
    with pytest.raises(ConfigError, match=r"vitkd\.mimic_blocks=\[0, 2\]: the student has 2"):
        vitkd_config(tmp_path, teacher_file, **{"vitkd.mimic_blocks": "[0, 2]"})
    with pytest.raises(ConfigError, match=r"model\.name=resnet18 is not a ViT"):
        vitkd_config(
            tmp_path,
            teacher_file,
            **{"model.name": "resnet18", "model.kwargs": "{}", "masking.strategy": "random"},
        )
    with pytest.raises(ConfigError, match=r"vitkd\.alpha=2\.0 must lie in \[0, 1\]"):
        vitkd_config(tmp_path, teacher_file, **{"vitkd.alpha": 2.0})
