import pytest
import torch
import torch.nn.functional as F

from ssl_kd.config import MaskingConfig
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import Trainer, train
from ssl_kd.losses import feature_alignment_loss, mae_pixel_loss
from ssl_kd.masking import complement
from ssl_kd.methods.base import StepState
from ssl_kd.methods.dmae import DMAE, DmaeConfig
from ssl_kd.models.weights import load_backbone_weights
from tests.helpers import official_mae_state, teacher_backbone, tiny_backbone, tiny_config

DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def make_dmae(teacher_keep_ratio=1.0, pairs=((1, 2),), keep_ratio=0.25):
    cfg = DmaeConfig(
        aligned_blocks=[list(p) for p in pairs], teacher_keep_ratio=teacher_keep_ratio, **DECODER
    )
    return DMAE(tiny_backbone(), teacher_backbone(), cfg, MaskingConfig(keep_ratio, "random"), 32)


def spy_on_teacher(dmae):
    calls, blocks_run = [], []
    teacher = dmae.teacher
    original = teacher.forward
    hooks = [
        b.register_forward_hook(lambda m, i, o, j=j: blocks_run.append(j))
        for j, b in enumerate(teacher.vit.blocks)
    ]

    def forward(x, keep_idx=None, **kwargs):
        start = len(blocks_run)
        out = original(x, keep_idx, **kwargs)
        calls.append((keep_idx, kwargs, blocks_run[start:]))
        return out

    teacher.forward = forward
    return calls, blocks_run, hooks


@pytest.mark.parametrize(("keep_ratio", "visible"), [(0.25, 16), (0.05, 3)])
def test_teacher_sees_the_visible_patches_and_runs_j_plus_one_blocks(keep_ratio, visible):
    dmae = make_dmae(keep_ratio=keep_ratio)
    encoder_calls = []
    dmae.student.encoder.register_forward_hook(lambda m, args, out: encoder_calls.append(args[1]))
    calls, _, _ = spy_on_teacher(dmae)
    out = dmae([torch.randn(4, 3, 32, 32)], StepState(0, 0, torch.Generator().manual_seed(0)))
    student_keep = encoder_calls[0]
    assert student_keep.shape == (4, visible)  # 25% (or 5%) of 64 patches
    assert torch.equal(calls[0][0], student_keep)
    assert calls[0][2] == [0, 1, 2]  # blocks 0..j for j = 2; block 3 never ran
    assert out.teacher_macs < out.teacher_macs_unmasked
    assert out.loss.item() == pytest.approx(
        float(out.metrics["recon_loss"] + out.metrics["distill_loss"]), rel=1e-5
    )


def test_alignment_loss_equals_the_formula():
    generator = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(3, 5, 8, generator=generator),
        torch.randn(3, 5, 8, generator=generator),
    )
    s = student / student.norm(dim=-1, keepdim=True)
    t = teacher / teacher.norm(dim=-1, keepdim=True)
    assert feature_alignment_loss(student, teacher).item() == pytest.approx(
        (s - t).abs().mean().item(), rel=1e-6
    )


def test_distillation_term_matches_the_formula_inside_the_method():
    dmae = make_dmae().eval()
    images = torch.randn(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(1)
    out = dmae([images], StepState(0, 0, generator))
    keep_idx = __import__("ssl_kd.masking", fromlist=["select"]).select(
        None, 16, "random", num_patches=64, batch_size=2, generator=torch.Generator().manual_seed(1)
    )
    student = dmae.student.encoder(images, keep_idx, return_blocks=[1]).block_outputs[1]
    teacher = dmae.teacher(images, keep_idx, stop_after_block=2).tokens
    expected = F.l1_loss(
        F.normalize(dmae.student.projections[0](student), dim=-1), F.normalize(teacher, dim=-1)
    )
    assert out.metrics["distill_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_several_aligned_pairs_add_up_as_in_the_official_code():
    """Official DMAE adds each pair's loss to the total with weight 1: a sum, not a mean."""
    dmae = make_dmae(pairs=((0, 1), (1, 3))).eval()
    images = torch.randn(2, 3, 32, 32)
    out = dmae([images], StepState(0, 0, torch.Generator().manual_seed(3)))
    keep_idx = __import__("ssl_kd.masking", fromlist=["select"]).select(
        None, 16, "random", num_patches=64, batch_size=2, generator=torch.Generator().manual_seed(3)
    )
    student = dmae.student.encoder(images, keep_idx, return_blocks=[0, 1]).block_outputs
    teacher = dmae.teacher(images, keep_idx, return_blocks=[1, 3]).block_outputs
    terms = [
        F.l1_loss(
            F.normalize(dmae.student.projections[i](student[s]), dim=-1),
            F.normalize(teacher[t], dim=-1),
        )
        for i, (s, t) in enumerate(((0, 1), (1, 3)))
    ]
    assert out.metrics["distill_loss"] == pytest.approx((terms[0] + terms[1]).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(
        float(out.metrics["recon_loss"]) + (terms[0] + terms[1]).item(), rel=1e-5
    )


def test_teacher_keep_ratio_restricts_teacher_and_loss_to_top_tokens():
    dmae = make_dmae(teacher_keep_ratio=0.5).eval()
    calls, _, _ = spy_on_teacher(dmae)
    images = torch.randn(2, 3, 32, 32)
    out = dmae([images], StepState(0, 0, torch.Generator().manual_seed(2)))
    teacher_idx = calls[0][0]
    assert teacher_idx.shape == (2, 8) and out.metrics["teacher_tokens_kept"] == 9
    # those 8 are the visible patches with the highest student [CLS] attention
    keep_idx = __import__("ssl_kd.masking", fromlist=["select"]).select(
        None, 16, "random", num_patches=64, batch_size=2, generator=torch.Generator().manual_seed(2)
    )
    enc = dmae.student.encoder(images, keep_idx, cls_attention=True, return_blocks=[1])
    top = enc.cls_attention.mean(1).topk(8, dim=1).indices.sort(dim=1).values
    assert torch.equal(teacher_idx, keep_idx.gather(1, top))
    student = torch.cat(
        [
            enc.block_outputs[1][:, :1],
            enc.block_outputs[1][:, 1:].gather(1, top[..., None].expand(-1, -1, 64)),
        ],
        1,
    )
    teacher = dmae.teacher(images, teacher_idx, stop_after_block=2).tokens
    expected = feature_alignment_loss(dmae.student.projections[0](student), teacher)
    assert out.metrics["distill_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_mae_pixel_loss_formula():
    pred, target = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    assert mae_pixel_loss(pred, target, False).item() == pytest.approx(
        ((pred - target) ** 2).mean().item(), rel=1e-6
    )
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae_pixel_loss(pred, target, True).item() == pytest.approx(
        ((pred - normed) ** 2).mean().item(), rel=1e-6
    )


def test_complement_is_the_sorted_rest():
    keep = torch.tensor([[0, 3], [1, 2]])
    assert complement(keep, 5).tolist() == [[1, 2, 4], [0, 3, 4]]


def test_teacher_is_not_trained_or_saved():
    dmae = make_dmae()
    assert not any(k.startswith("teacher") for k in dmae.state_dict())
    trainable = {id(p) for group in dmae.param_groups() for p in group["params"]}
    assert not any(id(p) in trainable for p in dmae.teacher.parameters())
    dmae.train()
    assert not dmae.teacher.training


def test_loads_the_official_mae_layout_and_names_mismatches(tmp_path):
    source = teacher_backbone()
    path = tmp_path / "mae_pretrain.pth"
    torch.save(official_mae_state(source), path)
    target = tiny_backbone(embed_dim=96, depth=4, num_heads=3, drop_path_rate=0.0)
    torch.nn.init.zeros_(target.vit.pos_embed)
    ignored = load_backbone_weights(target, path)
    assert ignored == ["decoder_embed.weight", "decoder_pred.bias", "mask_token"]
    assert torch.equal(target.vit.pos_embed, source.vit.pos_embed)
    with pytest.raises(
        ValueError,
        match=r"unexpected keys \['blocks.2.*shape mismatches "
        r"\['cls_token: file \(1, 1, 96\) vs model \(1, 1, 64\)",
    ):
        load_backbone_weights(tiny_backbone(), path)


def dmae_overrides(tmp_path, teacher_path, **extra):
    values = {
        "method": "dmae", "masking.keep_ratio": 0.25, "masking.strategy": "random",
        "dmae.teacher_name": "vit_tiny_patch16_224", "dmae.teacher_checkpoint": str(teacher_path),
        "dmae.teacher_kwargs": "{patch_size: 4, embed_dim: 96, depth: 4, num_heads: 3}",
        "dmae.aligned_blocks": "[[1, 2]]", "dmae.decoder_dim": 32, "dmae.decoder_depth": 1,
        "dmae.decoder_heads": 2, "dmae.norm_pix_loss": False,
        "optim.lr": 1.5e-3, "optim.weight_decay": 0.05, "optim.weight_decay_end": 0.05,
        "optim.betas": "[0.9, 0.95]", "optim.warmup_epochs": 0,
    }  # fmt: skip
    values.update(extra)
    return tiny_config(tmp_path, **values)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "mae.pth"
    torch.save(official_mae_state(teacher_backbone()), path)
    return path


def test_short_dmae_run_lowers_both_losses(tmp_path, teacher_file):
    overrides = {"train.max_steps": 30, "train.epochs": 1, "train.batch_size": 32, "optim.lr": 8e-3}
    trainer = Trainer(dmae_overrides(tmp_path, teacher_file, **overrides))
    batches = trainer.stream.epoch(0)
    history = [trainer.train_step(next(batches)) for _ in range(30)]

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    for key in ("recon_loss", "distill_loss"):
        assert mean(key, history[-5:]) < 0.9 * mean(key, history[:5]), key


def test_dmae_resume_and_run_checkpoint_as_teacher(tmp_path, teacher_file):
    train(dmae_overrides(tmp_path / "run", teacher_file, **{"train.max_steps": 2}))
    summary = train(dmae_overrides(tmp_path / "run", teacher_file, **{"train.max_steps": 3}))
    assert (
        summary["steps"] == 3 and load_checkpoint(tmp_path / "run" / "checkpoint.pth")["step"] == 3
    )
    assert summary["teacher_pflops"] < summary["teacher_pflops_unmasked"]
    # an ssl_kd run's checkpoint serves as a teacher file: its exported encoder is loaded
    student = tiny_backbone()
    load_backbone_weights(student, tmp_path / "run" / "checkpoint.pth")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["method"]
    assert torch.equal(student.vit.cls_token, saved["student.encoder.vit.cls_token"])


def test_unpatchify_inverts_lightly_patchify():
    from lightly.models.utils import patchify

    from ssl_kd.methods.dmae import unpatchify

    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(images, 4), 4, (8, 8)), images)


def test_reconstruction_pictures_reach_tensorboard(tmp_path, teacher_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dmae_overrides(
        tmp_path, teacher_file, **{"train.max_steps": 2, "dmae.recon_images_every_steps": 2}
    )
    train(cfg)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "dmae/reconstruction" in events.Tags()["images"]
    picture = events.Images("dmae/reconstruction")[0]
    # 3 columns (original, masked, reconstruction) × 4 rows of 32 px, 2 px padding
    assert (picture.step, picture.width, picture.height) == (2, 3 * 34 + 2, 4 * 34 + 2)
    assert {"method/recon_loss", "method/distill_loss"} <= set(events.Tags()["scalars"])


def test_the_adaptive_probe_aligns_the_teachers_kept_and_visible_features_and_its_cost():
    """masking.adaptive adapts dmae.teacher_keep_ratio (its start): on a probe step the teacher
    also sees every visible patch of the probe's images; the gap is the alignment loss between
    its features on the tokens it kept and its features on all visible patches at those
    tokens, summed over the pairs."""
    from ssl_kd.flops import forward_macs
    from ssl_kd.masking import select

    masking = MaskingConfig(0.25, "random", adaptive=True, probe_every_steps=2, probe_fraction=0.5,
                            tolerance=DMAE.default_tolerance)  # fmt: skip
    cfg = DmaeConfig(aligned_blocks=[[1, 2], [0, 1]], teacher_keep_ratio=0.5, **DECODER)
    dmae = DMAE(tiny_backbone(), teacher_backbone(), cfg, masking, 32).eval()
    assert dmae.adaptive is not None and dmae.adaptive.ratio == 0.5
    for tokens, blocks in ((8, 2), (16, 2), (16, None)):  # costs are measured by forwards
        dmae.teacher_macs(tokens, blocks)  # of their own, done before the spy starts
    calls, _, _ = spy_on_teacher(dmae)
    images = torch.randn(4, 3, 32, 32)
    out = dmae([images], StepState(0, 0, torch.Generator().manual_seed(2)))
    (teacher_idx, _, _), (probe_idx, _, probe_blocks) = calls
    keep_idx = select(
        None, 16, "random", num_patches=64, batch_size=4, generator=torch.Generator().manual_seed(2)
    )
    assert teacher_idx.shape == (4, 8) and torch.equal(probe_idx, keep_idx[:2])
    assert probe_blocks == [0, 1, 2]  # the probe stops where the teacher stops

    # where each kept token sits among the visible ones
    position = (keep_idx[:2, None, :] == teacher_idx[:2, :, None]).float().argmax(-1)  # [2, 8]
    expected = 0.0
    for t_block in (2, 1):
        kept = dmae.teacher(images[:2], teacher_idx[:2], return_blocks=[t_block])
        full = dmae.teacher(images[:2], keep_idx[:2], return_blocks=[t_block])
        full_tokens = full.block_outputs[t_block]
        index = position[..., None].expand(-1, -1, 96)
        at_kept = torch.cat([full_tokens[:, :1], full_tokens[:, 1:].gather(1, index)], dim=1)
        expected += feature_alignment_loss(kept.block_outputs[t_block], at_kept).item()
    assert out.keep_ratio_gap == pytest.approx(expected, rel=1e-4)
    assert out.keep_ratio_gap > 0
    truncated = forward_macs(dmae.teacher, 32, 16, stop_after_block=2)
    assert out.probe_macs == 2 * truncated
    assert out.teacher_macs == 4 * forward_macs(dmae.teacher, 32, 8, stop_after_block=2) + (
        2 * truncated
    )
    assert out.metrics["teacher_keep_ratio"] == 0.5

    # At the full ratio the teacher already saw every visible patch: no probe runs.
    full_cfg = DmaeConfig(aligned_blocks=[[1, 2]], teacher_keep_ratio=1.0, **DECODER)
    whole = DMAE(tiny_backbone(), teacher_backbone(), full_cfg, masking, 32).eval()
    whole.teacher_macs(16, 2), whole.teacher_macs(16, None)
    calls, _, _ = spy_on_teacher(whole)
    out = whole([images], StepState(0, 0, torch.Generator().manual_seed(2)))
    assert len(calls) == 1 and out.keep_ratio_gap == 0.0 and out.probe_macs == 0
