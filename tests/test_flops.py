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
    assert half["gmacs_full"] == pytest.approx(full["gmacs_full"] / 2, rel=0.02)


def test_forward_macs_restores_every_module_mode():
    backbone = tiny_backbone().train()
    backbone.vit.blocks[0].eval()
    before = [m.training for m in backbone.modules()]
    forward_macs(backbone, 32, 8)
    assert [m.training for m in backbone.modules()] == before
