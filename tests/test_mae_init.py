"""The MAE/DMAE student encoder (and decoder) as MAE builds them (facebookresearch/mae
models_mae.py): a fixed 2-D sin-cos position embedding, never trained nor weight-decayed;
xavier-uniform Linear and (flattened) patch-embedding weights, zero biases, LayerNorm (1, 0),
[CLS] and mask token normal with std 0.02."""

import math

import pytest
import torch
from torch import nn

from ssl_kd.engine.build import build_method
from ssl_kd.engine.trainer import Trainer
from ssl_kd.errors import UserError
from ssl_kd.methods.dmae import DMAE
from tests.helpers import mae_sincos_reference, tiny_config

MAE = {
    "method": "mae", "masking.keep_ratio": 0.25, "masking.strategy": "random",
    "dmae.decoder_dim": 64, "dmae.decoder_depth": 1, "dmae.decoder_heads": 2,
}  # fmt: skip


def mae_method(tmp_path, **extra):
    torch.manual_seed(0)
    return build_method(tiny_config(tmp_path, **{**MAE, **extra}))


def assert_xavier_uniform(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06)


def test_encoder_position_embedding_is_maes_fixed_sincos_table(tmp_path):
    method = mae_method(tmp_path)
    pos_embed = method.student.encoder.vit.pos_embed  # [1, 1 + 8·8, 64]
    expected = torch.from_numpy(mae_sincos_reference(64, 8)).float()
    assert torch.allclose(pos_embed[0, 1:], expected, rtol=0, atol=1e-7)
    assert torch.equal(pos_embed[0, 0], torch.zeros(64))  # the [CLS] row
    assert not pos_embed.requires_grad
    trained = [p for group in method.param_groups() for p in group["params"]]
    assert not any(p is pos_embed for p in trained)  # not trained, so never decayed
    # the decoder's table is MAE's too (lightly builds it in float32: 1e-6)
    decoder = method.student.decoder.decoder
    assert not decoder.pos_embed.requires_grad
    assert torch.allclose(decoder.pos_embed[0, 1:], expected, rtol=0, atol=1e-6)


def test_a_training_step_leaves_the_table_unchanged(tmp_path):
    steps = {"train.max_steps": 1, "optim.warmup_epochs": 0}  # lr > 0 in step 0
    trainer = Trainer(tiny_config(tmp_path, **MAE, **steps))
    vit = trainer.method.student.encoder.vit
    table, qkv = vit.pos_embed.detach().clone(), vit.blocks[0].attn.qkv.weight.detach().clone()
    trainer.train_step(next(trainer.stream.epoch(0)))
    assert torch.equal(vit.pos_embed, table)  # AdamW's decoupled decay would have moved it
    assert not torch.equal(vit.blocks[0].attn.qkv.weight, qkv)  # the step did train


def test_encoder_weights_start_as_maes(tmp_path):
    vit = mae_method(tmp_path).student.encoder.vit  # width 64, patch 4, MLP 256
    linears = [m for m in vit.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4  # qkv, proj, fc1, fc2 per block
    for linear in linears:
        assert_xavier_uniform(linear.weight, linear.in_features, linear.out_features)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    for norm in (m for m in vit.modules() if isinstance(m, nn.LayerNorm)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    # the patch embedding as the Linear [64, 3·4·4] it is (the 4-D fans would give 1/4 the std)
    assert_xavier_uniform(vit.patch_embed.proj.weight, 3 * 4 * 4, 64)
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.3)  # timm starts at 1e-6
    mask_token = mae_method(tmp_path, **{"dmae.decoder_dim": 512, "dmae.decoder_heads": 8})
    assert mask_token.student.decoder.decoder.mask_token.std().item() == pytest.approx(
        0.02, rel=0.1
    )


def test_dinos_backbone_keeps_timms_learned_position_embedding(tmp_path):
    method = build_method(tiny_config(tmp_path))
    pos_embed = method.student.backbone.vit.pos_embed
    assert pos_embed.requires_grad
    assert any(p is pos_embed for group in method.param_groups() for p in group["params"])


def test_resuming_a_run_saved_with_a_learned_table_names_the_optimizer_mismatch(
    tmp_path, monkeypatch, capsys
):
    """A MAE run saved before the table was frozen trained one tensor more: strict resume
    refuses with the reason, --strict false resumes the weights with a fresh optimizer."""
    cfg = tiny_config(tmp_path, **MAE, **{"train.max_steps": 1})
    with monkeypatch.context() as patch:
        patch.setattr(DMAE, "init_backbone", classmethod(lambda cls, backbone: None))
        old = Trainer(cfg)
        assert old.method.student.encoder.vit.pos_embed.requires_grad
        old.train_step(next(old.stream.epoch(0)))
        old.save()
    with pytest.raises(UserError, match=r"optimizer state does not fit.*--strict false"):
        Trainer(cfg).resume()
    resumed = Trainer(cfg, strict=False)
    assert resumed.resume() and resumed.step == 1
    assert "the optimizer starts afresh" in capsys.readouterr().err
