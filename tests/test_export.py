import pytest
import timm
import torch

from ssl_kd.cli import main
from ssl_kd.engine.build import build_backbone
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.models.weights import load_backbone_weights
from tests.helpers import TINY_VIT, tiny_config


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_loads_strictly_in_timm_with_identical_features(tmp_path, suffix):
    train(tiny_config(tmp_path / "run", **{"train.max_steps": 1}))
    out = tmp_path / f"backbone{suffix}"
    assert main(["export", str(tmp_path / "run" / "checkpoint.pth"), "--out", str(out)]) == 0
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
        pretrained_cfg_overlay={"file": str(out)}, **TINY_VIT,
    ).eval()  # fmt: skip
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["method"]
    assert torch.equal(model.cls_token, saved["teacher.backbone.vit.cls_token"])  # DINO: teacher
    x = torch.randn(2, 3, 32, 32)
    ours = build_backbone(tiny_config(tmp_path / "run")).eval()
    load_backbone_weights(ours, tmp_path / "run" / "checkpoint.pth")
    assert torch.allclose(model(x), ours(x).cls, atol=1e-6)


def test_export_rejects_a_bad_target(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.bin")]) == 2
    assert "use a .safetensors or .pth" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
