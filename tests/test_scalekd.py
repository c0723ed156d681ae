"""`method: scalekd` (ssl_kd/methods/scalekd.py): both views against their formulas, teacher
parameter perception's gradients (the student's, never the teacher's), a ResNet student."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kd.engine.build import build_method
from ssl_kd.engine.trainer import Trainer
from ssl_kd.losses import frequency_view_loss, spatial_view_loss, without_dc
from ssl_kd.methods.base import StepState
from ssl_kd.methods.scalekd import student_map_of
from ssl_kd.models.classifier import create_classifier
from tests.helpers import tiny_config

TEACHER_KWARGS = "{patch_size: 4, embed_dim: 96, depth: 3, num_heads: 3}"
TINY_RESNET = {"model.name": "resnet18", "model.kwargs": "{layers: [1, 1, 1, 1]}"}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    teacher = create_classifier(
        "vit_tiny_patch16_224", 32, 10, patch_size=4, embed_dim=96, depth=3, num_heads=3
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher.timm_model.state_dict(), path)
    return path


def scalekd_config(tmp_path, teacher_path, **extra):
    values = {
        "method": "scalekd", "scalekd.teacher_name": "vit_tiny_patch16_224",
        "scalekd.teacher_checkpoint": str(teacher_path), "scalekd.teacher_kwargs": TEACHER_KWARGS,
        "scalekd.tpp_depth": 1, "masking.keep_ratio": 1.0, "optim.lr": 1e-2,
        "data.hflip_prob": 0.0, "eval.classify_at_end": False,
    }  # fmt: skip
    values.update(extra)
    return tiny_config(tmp_path, **values)


def explicit_dct(size):
    """DCT-II, orthonormal, element by element: C[k, n] = c_k cos(π (2n + 1) k / 2N)."""
    return torch.tensor(
        [[(math.sqrt(1 / size) if k == 0 else math.sqrt(2 / size))
          * math.cos(math.pi * (2 * n + 1) * k / (2 * size)) for n in range(size)]
         for k in range(size)], dtype=torch.float64,
    )  # fmt: skip


def test_frequency_view_is_the_dct_with_its_dc_term_zeroed():
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    rows, cols = explicit_dct(4), explicit_dct(5)
    coefficients = torch.einsum("kh,bdhw,lw->bdkl", rows, features, cols)
    coefficients[:, :, 0, 0] = 0
    expected = torch.einsum("kh,bdkl,lw->bdhw", rows, coefficients, cols)
    assert torch.allclose(without_dc(features), expected, atol=1e-12)
    # the DC coefficient is the (scaled) mean: removing it leaves a zero-mean map per channel
    assert torch.allclose(
        without_dc(features).mean(dim=(2, 3)), torch.zeros(2, 3, dtype=torch.float64)
    )
    student = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    normed = F.normalize(without_dc(student), dim=1) - F.normalize(expected, dim=1)
    assert frequency_view_loss(student, features).item() == pytest.approx(
        normed.pow(2).sum().item() / 2, rel=1e-10
    )


def test_spatial_view_normalises_each_position_over_channels():
    student, teacher = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    norm_s = student / student.pow(2).sum(1, keepdim=True).sqrt()
    norm_t = teacher / teacher.pow(2).sum(1, keepdim=True).sqrt()
    expected = (norm_s - norm_t).pow(2).sum() / 2
    assert spatial_view_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    # scale-invariant per position: only directions are mimicked
    scale = torch.rand(2, 1, 3, 3) + 0.5
    assert spatial_view_loss(student * scale, teacher).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_tpp_reaches_the_student_and_never_the_teacher(tmp_path, teacher_file, keep_ratio):
    cfg = scalekd_config(tmp_path, teacher_file, **{"masking.keep_ratio": keep_ratio,
                                                     "masking.strategy": "random"})  # fmt: skip
    method = build_method(cfg)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = method([images, labels], StepState(2, 0, torch.Generator().manual_seed(3)))
    tpp = out.metrics["tpp_spatial_loss"] + out.metrics["tpp_frequency_loss"]
    assert math.isfinite(out.loss.item()) and tpp > 0
    # TPP alone: gradients in the student and its projector, none in the teacher
    method.zero_grad(set_to_none=True)
    student_out = method.student(images, return_blocks=())
    perception = method.heads.perception(student_map_of(method.student, student_out))
    with torch.no_grad():
        teacher_out = method.teacher(images, return_blocks=method.teacher_blocks)
    tokens = torch.cat([teacher_out.block_outputs[method.tpp_block][:, :1], perception], dim=1)
    for block in method.teacher.vit.vit.blocks[method.tpp_block + 1 :]:
        tokens = block(tokens)
    tokens.sum().backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert method.heads.perception.query.grad.abs().sum() > 0
    # and through the method's own loss
    method.zero_grad(set_to_none=True)
    out = method([images, labels], StepState(2, 0, torch.Generator().manual_seed(3)))
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_a_resnet_student_trains_with_scalekd(tmp_path, teacher_file):
    cfg = scalekd_config(tmp_path, teacher_file, **TINY_RESNET, **{"train.max_steps": 3})
    trainer = Trainer(cfg)
    assert not trainer.method.student.is_vit
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in trainer.method.heads.parameters())
    assert not any(id(p) in trained for p in trainer.method.teacher.parameters())
    student_before = {k: v.clone() for k, v in trainer.method.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 5])
    out = trainer.method([images, labels], StepState(2, 0, torch.Generator().manual_seed(0)))
    assert math.isfinite(out.loss.item())
    assert all(math.isfinite(out.metrics[k]) and out.metrics[k] > 0
               for k in ("spatial_loss", "frequency_loss", "tpp_spatial_loss"))  # fmt: skip
    trainer.fit()
    after = trainer.method.student.state_dict()
    assert any(
        not torch.equal(v, after[k]) for k, v in student_before.items() if v.is_floating_point()
    )
    assert all(torch.equal(v, trainer.method.teacher.state_dict()[k])
               for k, v in teacher_before.items())  # fmt: skip
