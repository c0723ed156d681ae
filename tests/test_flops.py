import json

import pytest

from ssl_kd.cli import main
from ssl_kd.flops import cost_report, forward_macs
from tests.helpers import tiny_backbone

# MaskedKD (arXiv:2302.10494) Table 5: DINO ViT-S teacher PFLOPs at each keep ratio, 589 full.
TABLE_5 = {0.87: 507 / 589, 0.77: 446 / 589, 0.66: 384 / 589, 0.61: 354 / 589}


def test_vit_s_counts_fused_attention():
    report = cost_report("vit_small_patch16_224", 1.0)
    assert report["gmacs_full"] == pytest.approx(4.60, abs=0.01)  # 4.24 if attention is missed
    assert report["tokens_full"] == 197


@pytest.mark.parametrize(("keep", "paper_ratio"), TABLE_5.items())
def test_maskedkd_table_5_ratios(keep, paper_ratio, capsys):
    assert main(["flops", "vit_small_patch16_224", "--keep-ratio", str(keep), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ratio"] == pytest.approx(paper_ratio, rel=0.02)
    assert set(report) >= {
        "model",
        "img_size",
        "tokens_full",
        "tokens_kept",
        "gmacs_full",
        "gmacs_masked",
        "ratio",
    }


@pytest.mark.parametrize(
    ("model", "full", "masked"),
    [("vit_small_patch16_224", 4.5, 2.2), ("vit_base_patch16_224", 17.5, 8.6)],  # Table 9, DeiT
)
def test_maskedkd_table_9(model, full, masked):
    report = cost_report(model, 0.5)
    assert report["tokens_kept"] == 99  # 98 patches + [CLS]
    assert report["ratio"] == pytest.approx(masked / full, rel=0.02)
    assert report["gmacs_full"] == pytest.approx(full, rel=0.05)


def test_truncated_teacher_counts_only_the_blocks_run():
    full = cost_report("vit_small_patch16_224", 1.0)
    half = cost_report("vit_small_patch16_224", 1.0, stop_after_block=5)
    assert half["blocks_run"] == 6
    # 6 of 12 blocks, plus the patch embedding both share
    assert half["gmacs_truncated_full"] == pytest.approx(full["gmacs_full"] / 2, rel=0.02)
    assert half["gmacs_whole_teacher"] == full["gmacs_full"]


def vit_macs(tokens, blocks, dim=1024, patches=196, patch=16):
    """Multiply-adds of a ViT (MLP ratio 4) by hand: the patch embedding of every patch, then
    per block qkv 3·N·D², attention scores and their sum over values 2·N²·D, output projection
    N·D², MLP 8·N·D² (norms, softmax and GELU are not multiply-adds)."""
    embed = patches * 3 * patch * patch * dim
    return embed + blocks * (12 * tokens * dim * dim + 2 * tokens * tokens * dim)


def test_stop_after_block_reports_both_baselines_named_apart(capsys):
    """The DMAE ViT-L/16 teacher (arXiv:2208.12256) at 25% of the patches, blocks 0..17: 11.57
    GMACs, 0.188 of the whole teacher on all tokens (61.55), 0.250 of blocks 0..17 on all tokens
    (46.20). One bare `ratio` would hide which."""
    argv = ["flops", "vit_large_patch16_224", "--keep-ratio", "0.25", "--stop-after-block", "17"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "ratio" not in report and "gmacs_full" not in report
    whole, truncated, masked = vit_macs(197, 24), vit_macs(197, 18), vit_macs(49 + 1, 18)
    assert report["gmacs_whole_teacher"] * 1e9 == pytest.approx(whole, rel=1e-9)
    assert report["gmacs_truncated_full"] * 1e9 == pytest.approx(truncated, rel=1e-9)
    assert report["gmacs_masked"] * 1e9 == pytest.approx(masked, rel=1e-9)
    assert round(report["gmacs_whole_teacher"], 2) == 61.55
    assert round(report["gmacs_masked"], 2) == 11.57
    assert round(report["ratio_vs_whole_teacher"], 3) == 0.188
    assert round(report["ratio_vs_truncated_full"], 3) == 0.250
    assert (report["blocks"], report["blocks_run"], report["tokens_kept"]) == (24, 18, 50)
    assert main(argv) == 0  # the text form names both the same way
    printed = capsys.readouterr().out
    assert "ratio_vs_whole_teacher: 0.18798" in printed
    assert "ratio_vs_truncated_full: 0.25043" in printed


def test_forward_macs_restores_every_module_mode():
    backbone = tiny_backbone().train()
    backbone.vit.blocks[0].eval()
    before = [m.training for m in backbone.modules()]
    forward_macs(backbone, 32, 8)
    assert [m.training for m in backbone.modules()] == before
