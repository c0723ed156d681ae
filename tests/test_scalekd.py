"""`method: scalekd` (ssl_kd/methods/scalekd.py): both views against their formulas, teacher
parameter perception's gradients (the student's, never the teacher's), a ResNet student, the
teacher's cost with TPP's second pass, a killed run resumed bitwise, and config mistakes as one
line with exit status 2."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kd.cli import main
from ssl_kd.engine.build import build_method
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import Trainer, train
from ssl_kd.flops import forward_macs
from ssl_kd.losses import frequency_view_loss, spatial_view_loss, without_dc
from ssl_kd.methods.base import StepState
from ssl_kd.methods.scalekd import student_map_of
from ssl_kd.models.classifier import create_classifier
from tests.helpers import kill_and_resume, run_cli, tiny_config, tiny_overrides

TEACHER_KWARGS = "{patch_size: 4, embed_dim: 96, depth: 3, num_heads: 3}"
TINY_RESNET = {
    "model.name": "resnet18",
    "model.kwargs": "{layers: [1, 1, 1, 1], channels: [16, 32, 64, 128], stem_width: 16}",
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    teacher = create_classifier(
        "vit_tiny_patch16_224", 32, 10, patch_size=4, embed_dim=96, depth=3, num_heads=3
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(teacher.timm_model.state_dict(), path)
    return path


def scalekd_values(teacher_path, **extra):
    values = {
        "method": "scalekd", "scalekd.teacher_name": "vit_tiny_patch16_224",
        "scalekd.teacher_checkpoint": str(teacher_path), "scalekd.teacher_kwargs": TEACHER_KWARGS,
        "scalekd.tpp_depth": 1, "masking.keep_ratio": 1.0, "optim.lr": 1e-2,
        "data.hflip_prob": 0.0, "eval.classify_at_end": False,
    }  # fmt: skip
    values.update(extra)
    return values


def scalekd_config(tmp_path, teacher_path, **extra):
    return tiny_config(tmp_path, **scalekd_values(teacher_path, **extra))


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
    # the DC coefficient is the (scaled) mean: removing it subtracts each channel's mean over
    # the map, whatever the DCT's normalisation (the official code's is unnormalised)
    assert torch.allclose(
        without_dc(features), features - features.mean(dim=(2, 3), keepdim=True), atol=1e-12
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


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_teacher_cost_counts_tpp_through_the_last_blocks(tmp_path, teacher_file, keep_ratio):
    """TPP runs the teacher's last tpp_depth blocks a second time, on the projected student:
    per block 12·N·D² + 2·N²·D multiply-adds (qkv, scores, weighted sum, projection, MLP ×4)
    on N = [CLS] + the patches the teacher kept."""
    cfg = scalekd_config(tmp_path, teacher_file, **{"scalekd.tpp_depth": 2,
                                                     "masking.keep_ratio": keep_ratio})  # fmt: skip
    method = build_method(cfg)
    out = method(
        [torch.randn(2, 3, 32, 32), torch.tensor([0, 1])], StepState(0, 0, torch.Generator())
    )
    kept = 64 if keep_ratio == 1.0 else 32
    tokens, dim = 1 + kept, 96
    tpp = 2 * (12 * tokens * dim * dim + 2 * tokens * tokens * dim)
    keep = None if keep_ratio == 1.0 else kept
    assert out.teacher_macs == 2 * (forward_macs(method.teacher, 32, keep) + tpp)
    full = 65
    tpp_full = 2 * (12 * full * dim * dim + 2 * full * full * dim)
    assert out.teacher_macs_unmasked == 2 * (forward_macs(method.teacher, 32) + tpp_full)


# --- resume ---------------------------------------------------------------------------------
TINY_RESNET_RUN = {
    **TINY_RESNET, "masking.keep_ratio": 0.5, "masking.strategy": "random",
    "scalekd.mixup": 0.8, "scalekd.cutmix": 1.0,
}  # fmt: skip


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, teacher_file, capsys):
    """In-process and with the tiny ViT student (the ResNet one is the slow test below)."""
    extra = {"masking.keep_ratio": 0.5, "masking.strategy": "random", "scalekd.mixup": 0.8,
             "train.checkpoint_every_steps": 2}  # fmt: skip
    train(scalekd_config(tmp_path / "reference", teacher_file, **extra, **{"train.max_steps": 3}))
    train(scalekd_config(tmp_path / "run", teacher_file, **extra, **{"train.max_steps": 2}))
    capsys.readouterr()
    train(scalekd_config(tmp_path / "run", teacher_file, **extra, **{"train.max_steps": 3}))
    assert "at step 2" in capsys.readouterr().out  # resumed, not trained again from step 0
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert final["step"] == expected["step"] == 3
    assert_same_state(final["method"], expected["method"])
    assert final["totals"] == expected["totals"]


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_reaches_the_same_weights(tmp_path, teacher_file):
    """A ResNet student (BatchNorm buffers), a masked teacher and Mixup/CutMix: a real process
    killed between checkpoints, then the same command, against an uninterrupted run. The frozen
    teacher is never saved; the projectors are."""
    extra = scalekd_values(
        teacher_file, **TINY_RESNET_RUN, **{"train.max_steps": 7,
                                            "train.checkpoint_every_steps": 3,
                                            "train.log_every_steps": 1}
    )  # fmt: skip
    train(tiny_config(tmp_path / "reference", **extra))
    run = tmp_path / "killed"
    (tmp_path / "run.yaml").write_text("{}\n")
    args = ["train", str(tmp_path / "run.yaml"), *tiny_overrides(run, **extra)]
    assert kill_and_resume(args, run, 4, env={"OMP_NUM_THREADS": "2"}) == 3
    final = load_checkpoint(run / "checkpoint.pth")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert_same_state(final["method"], expected["method"])
    assert final["totals"] == expected["totals"]  # the teacher's cost, TPP included
    assert any(key.startswith("heads.perception.") for key in final["method"])
    assert any(key.endswith("running_mean") for key in final["method"])
    assert not any(key.startswith("teacher") for key in final["method"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


# --- config mistakes ------------------------------------------------------------------------
CONFIG_MISTAKES = {
    "tpp deeper than the teacher": (
        {"scalekd.tpp_depth": 3},
        "scalekd.tpp_depth=3: the teacher vit_tiny_patch16_224 has 3 blocks and perception "
        "enters before its last tpp_depth; use 1 to 2",
    ),
    "tpp depth 0": ({"scalekd.tpp_depth": 0}, "scalekd.tpp_depth=0 must be > 0"),
    "unknown key": ({"scalekd.tpp_dept": 1}, "Did you mean 'scalekd.tpp_depth'?"),
    "heads vs teacher width": (
        {"scalekd.num_heads": 5},
        "scalekd.num_heads=5 does not divide the teacher's width 96: the projectors attend in "
        "the teacher's width; use a divisor such as 16",
    ),
    "teacher not a ViT": (
        {"scalekd.teacher_name": "resnet18", "scalekd.teacher_kwargs": "{}"},
        "scalekd.teacher_name=resnet18 is not a ViT",
    ),
    "student without a feature map": (
        {"model.name": "mixer_s16_224", "model.kwargs": "{img_size: 32}"},
        "model.name=mixer_s16_224 gives [1, 4, 512] from its last stage, not a feature map "
        "[B, 512, h, w]: ScaleKD's projectors read a CNN's last feature map or a ViT's patch "
        "tokens; use a CNN (e.g. resnet50) or a ViT",
    ),
    "student that cannot take the crops": (
        {"model.name": "mixer_s16_224", "model.kwargs": "{}"},
        "model.name=mixer_s16_224 cannot run on data.global_crop_size=32 crops: Input height "
        "(32) doesn't match model (224)",
    ),
}


@pytest.mark.parametrize("case", CONFIG_MISTAKES)
def test_a_config_mistake_is_one_line_exit_2_before_any_work(tmp_path, teacher_file, capsys,
                                                             case):  # fmt: skip
    extra, expected = CONFIG_MISTAKES[case]
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(tmp_path / "out", **scalekd_values(teacher_file, **extra))
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-kd: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_config_mistake_stops_a_real_process_with_exit_2(tmp_path, teacher_file):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(
        tmp_path / "out", **scalekd_values(teacher_file, **{"scalekd.tpp_depth": 3})
    )
    result = run_cli("train", str(config), *overrides, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ssl-kd: error: scalekd.tpp_depth=3: the teacher")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
