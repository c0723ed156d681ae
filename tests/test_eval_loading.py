import argparse
import json

import pytest
import torch

from ssl_kd.cli import main
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.evaluation.loading import load_backbone
from ssl_kd.models.architecture import architecture_from_args
from ssl_kd.models.export import export_backbone
from tests.helpers import TINY_VIT, tiny_backbone, tiny_config

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", str(TINY_VIT)]
IMAGES = torch.randn(2, 3, 32, 32)


def features(backbone):
    return backbone.eval()(IMAGES).cls


def official_dino_checkpoint(teacher, student):
    """facebookresearch/dino's checkpoint.pth layout: the student is DDP-wrapped."""

    def with_head(backbone, prefix):
        state = {f"{prefix}backbone.{k}": v.clone() for k, v in backbone.vit.state_dict().items()}
        state[f"{prefix}head.mlp.0.weight"] = torch.zeros(8, 64)
        state[f"{prefix}head.last_layer.weight_g"] = torch.ones(16, 1)
        return state

    return {
        "teacher": with_head(teacher, ""),
        "student": with_head(student, "module."),
        "optimizer": {},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }


def test_official_dino_layout_loads_teacher_or_student_with_identical_features(tmp_path):
    teacher, student = tiny_backbone(), tiny_backbone()
    torch.nn.init.normal_(student.vit.cls_token)  # make the two distinguishable
    path = tmp_path / "dino_checkpoint.pth"
    torch.save(official_dino_checkpoint(teacher, student), path)
    kwargs = dict(model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    loaded, report = load_backbone(path, **kwargs)
    assert torch.equal(features(loaded), features(teacher))
    assert (report.layout, report.part) == ("official DINO checkpoint (teacher)", "teacher")
    assert report.ignored == ["head.last_layer.weight_g", "head.mlp.0.weight"]
    assert report.img_size == 32  # read from pos_embed, not assumed
    loaded_student, report = load_backbone(path, part="student", **kwargs)
    assert torch.equal(features(loaded_student), features(student))
    assert not torch.equal(features(loaded_student), features(teacher))
    assert report.layout == "official DINO checkpoint (student)"


def test_mae_layout_with_decoder_keys_loads_with_identical_features(tmp_path):
    source = tiny_backbone()
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    state |= {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
              "decoder_blocks.0.attn.qkv.weight": torch.zeros(96, 32)}  # fmt: skip
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 799}, path)
    loaded, report = load_backbone(path, model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    assert torch.equal(features(loaded), features(source))
    assert report.ignored == ["decoder_blocks.0.attn.qkv.weight", "decoder_embed.weight",
                              "mask_token"]  # fmt: skip
    assert "missing 0, unexpected 0, ignored 3" in str(report)


def test_model_name_from_official_args():
    assert architecture_from_args(argparse.Namespace(arch="vit_small", patch_size=8)) == (
        "vit_small_patch8_224"
    )
    assert architecture_from_args(argparse.Namespace(model="mae_vit_large_patch16")) == (
        "vit_large_patch16_224"
    )
    assert architecture_from_args(argparse.Namespace(arch="resnet50")) is None
    assert architecture_from_args(None) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(path, **{"train.max_steps": 2}))
    return path


def test_run_checkpoint_builds_its_model_from_the_saved_config(run):
    saved = load_checkpoint(run / "checkpoint.pth")["method"]
    teacher, report = load_backbone(run / "checkpoint.pth")
    assert report.model == "vit_tiny_patch16_224" and report.model_kwargs == TINY_VIT
    assert torch.equal(teacher.vit.cls_token, saved["teacher.backbone.vit.cls_token"])
    student, report = load_backbone(run / "checkpoint.pth", part="student")
    assert torch.equal(student.vit.pos_embed, saved["student.backbone.vit.pos_embed"])
    assert not torch.equal(student.vit.pos_embed, teacher.vit.pos_embed)  # EMA lags behind


def test_safetensors_export_loads_with_identical_features(run, tmp_path):
    out = tmp_path / "backbone.safetensors"
    export_backbone(run / "checkpoint.pth", out)
    exported, report = load_backbone(out, model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    assert report.layout == "safetensors state dict"
    assert torch.equal(features(exported), features(load_backbone(run / "checkpoint.pth")[0]))
    with pytest.raises(ValueError, match=r"backbone.safetensors .*pass --model NAME"):
        load_backbone(out)
    with pytest.raises(ValueError, match="holding one backbone, so --student does not apply"):
        load_backbone(out, part="student", model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)


def test_wrong_files_fail_with_the_file_and_the_keys_named(run, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.txt is not a readable PyTorch checkpoint"):
        load_backbone(text, model="vit_tiny_patch16_224")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((run / "checkpoint.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated.pth is not a readable .*truncated"):
        load_backbone(truncated)
    other = tmp_path / "vit_depth4.pth"
    torch.save(tiny_backbone(embed_dim=96, depth=4, num_heads=3).vit.state_dict(), other)
    with pytest.raises(ValueError) as error:
        load_backbone(other, model="vit_tiny_patch16_224", model_kwargs=TINY_VIT)
    message = str(error.value)
    assert (
        "vit_depth4.pth (bare state dict) does not fit VisionTransformer (depth 2, width 64)"
        in (message)
    )
    assert "unexpected keys ['blocks.2.attn.proj.bias'," in message
    assert "cls_token: file (1, 1, 96) vs model (1, 1, 64)" in message
    assert "and 16 more]" in message  # long key lists are cut, with the count
    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    with pytest.raises(ValueError, match=r"list\.pth holds a list, not a state dict"):
        load_backbone(listing)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ValueError, match=r"empty.pth \(bare state dict\) holds no backbone"):
        load_backbone(empty, model="vit_tiny_patch16_224")


def test_cli_reports_a_wrong_file_in_one_line_with_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    assert main(["eval", "knn", str(junk), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-kd: error: ") and str(junk) in err and "\n" not in err
    assert main(["eval", "knn", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_knn_on_the_run_scores_every_k(run, tmp_path, capsys):
    assert main(["eval", "knn", str(run / "checkpoint.pth"), "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "ssl_kd dino run checkpoint (teacher)" in printed
    for k in (10, 20, 100, 200):
        assert f"k={k:<4} top-1" in printed
    import json

    result = json.loads((tmp_path / "knn_eval.json").read_text())
    assert set(result["scores"]) == {"10", "20", "100", "200"}
    assert result["data"].startswith("digits (held-out 20%")


def test_an_export_folder_needs_no_model_in_eval(run, tmp_path, capsys):
    """config.json says which model: knn and attention take the folder alone, and k-NN scores
    the run's own held-out digits (the run config travels in config.json) as the checkpoint."""
    out = tmp_path / "export"
    export_backbone(run / "checkpoint.pth", out)
    exported, report = load_backbone(out)
    assert report.layout == "export folder (vit_tiny_patch16_224)" and report.img_size == 32
    assert {key: report.model_kwargs[key] for key in TINY_VIT} == TINY_VIT
    assert torch.equal(features(exported), features(load_backbone(run / "checkpoint.pth")[0]))
    scores = {}
    for name, source in (("export", out), ("checkpoint", run / "checkpoint.pth")):
        args = ["eval", "knn", str(source), "--ks", "5", "--output-dir", str(tmp_path / name)]
        assert main(args) == 0
        scores[name] = json.loads((tmp_path / name / "knn_eval.json").read_text())
    assert scores["export"]["scores"] == scores["checkpoint"]["scores"]
    assert scores["export"]["data"] == scores["checkpoint"]["data"]
    pictures = ["eval", "attention", "--checkpoint", str(out), "sklearn:china.jpg"]
    assert main([*pictures, "--img-size", "32", "--out", str(tmp_path / "pictures")]) == 0
    assert (tmp_path / "pictures" / "china_attention.png").is_file()
    capsys.readouterr()
    assert main(["eval", "knn", str(out), "--student"]) == 2  # one backbone in an export
    assert "holding one backbone, so --student does not apply" in capsys.readouterr().err
