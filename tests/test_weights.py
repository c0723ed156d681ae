"""DINOv2 files load as timm's own DINOv2 conversion loads them: released backbones (with and
without registers, and their exports), training checkpoints (chunked blocks, `student.` /
`teacher.`, heads dropped and reported), the teacher files DINOv2 writes for evaluation. The
official layouts are written here by hand from a tiny timm DINOv2 ViT (the inverse of timm's
conversion)."""

import pytest
import timm
import torch

from ssl_kd.engine.build import build_backbone
from ssl_kd.evaluation.loading import load_backbone
from ssl_kd.models.export import export_backbone
from ssl_kd.models.weights import read_backbone_weights
from tests.helpers import tiny_config

REGISTERS, PLAIN = "vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"
TINY = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HEADS = {  # training-only tensors of a DINOv2 student or teacher
    "dino_head.mlp.0.weight": torch.zeros(8, 64),
    "dino_head.last_layer.weight": torch.zeros(16, 8),
    "ibot_head.mlp.0.weight": torch.zeros(8, 64),
}


def tiny_dinov2(name, seed):
    """A tiny timm DINOv2 ViT with every parameter random: the layer-scale gammas' 1e-5 start
    would hide a block loaded into the wrong place."""
    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=32, **TINY)
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.normal_(0.0, 0.2)
    return vit.eval()


def official_layout(vit, chunks=0):
    """The state dict facebookresearch/dinov2 saves for `vit`: `register_tokens`; the [CLS]
    position row inside pos_embed, where timm adds it into cls_token (with registers); a [1, D]
    mask_token; with `chunks`, block j of chunk c saved as `blocks.c.j.*`."""
    state = {key: value.clone() for key, value in vit.state_dict().items()}
    if "reg_token" in state:
        cls_position = torch.randn(1, 1, vit.embed_dim, generator=torch.Generator().manual_seed(1))
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_position
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, vit.embed_dim)
    if chunks:
        per_chunk = TINY["depth"] // chunks
        state = {
            _chunked(key, per_chunk) if key.startswith("blocks.") else key: value
            for key, value in state.items()
        }
    return state


def _chunked(key, per_chunk):
    _, block, rest = key.split(".", 2)
    return f"blocks.{int(block) // per_chunk}.{block}.{rest}"


def timm_features(name, path):
    """Features of `path` loaded by timm itself (its DINOv2 checkpoint filter)."""
    vit = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0,
        img_size=32, **TINY,
    )  # fmt: skip
    return vit.eval()(IMAGES)


@pytest.mark.parametrize("name", [REGISTERS, PLAIN])
def test_a_released_dinov2_backbone_loads_as_timm_loads_it(tmp_path, name):
    source = tiny_dinov2(name, seed=0)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official_layout(source), path)
    loaded, report = load_backbone(path, model=name, model_kwargs=TINY)
    features = loaded(IMAGES).cls
    assert torch.equal(features, timm_features(name, path))
    assert torch.allclose(features, source(IMAGES), atol=1e-5)
    assert report.layout == "official DINOv2 backbone (bare state dict)"
    assert report.ignored == ["mask_token"] and (report.missing, report.unexpected) == ([], [])
    export = tmp_path / "export"  # and exports to a folder timm rebuilds with no arguments
    export_backbone(path, export, model=name, model_kwargs=TINY)
    rebuilt = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    assert torch.equal(rebuilt(IMAGES), features)
    if name == REGISTERS:  # [CLS] and 4 registers stay with any kept patches
        kept = loaded(IMAGES, torch.arange(6).expand(2, -1))
        assert loaded.num_prefix_tokens == 5 and kept.tokens.shape == (2, 5 + 6, 64)


def training_checkpoint(teacher, student):
    """DINOv2's training checkpoint: its meta-architecture's state dict, blocks in 2 chunks."""
    model = {"dino_loss.center": torch.zeros(1, 16)}
    for part, vit in (("teacher", teacher), ("student", student)):
        backbone = official_layout(vit, chunks=2)
        model |= {f"{part}.backbone.{key}": value for key, value in backbone.items()}
        model |= {f"{part}.{key}": value for key, value in HEADS.items()}
    return {"model": model, "optimizer": {}, "iteration": 1249}


def test_a_dinov2_training_checkpoint_gives_the_teacher_or_the_student(tmp_path):
    teacher, student = tiny_dinov2(REGISTERS, seed=0), tiny_dinov2(REGISTERS, seed=1)
    path = tmp_path / "model_0001249.pth"
    torch.save(training_checkpoint(teacher, student), path)
    released = tmp_path / "teacher_release.pth"  # the same teacher, unchunked, headless
    torch.save(official_layout(teacher), released)
    loaded, report = load_backbone(path, model=REGISTERS, model_kwargs=TINY)
    assert torch.equal(loaded(IMAGES).cls, timm_features(REGISTERS, released))
    assert report.layout == "official DINOv2 training checkpoint (teacher)"
    assert report.ignored == [
        "dino_head.last_layer.weight", "dino_head.mlp.0.weight", "ibot_head.mlp.0.weight",
        "mask_token",
    ]  # fmt: skip
    assert "ignored 4 (dino_head.last_layer.weight" in str(report)  # reported, not silent
    loaded_student, report = load_backbone(path, part="student", model=REGISTERS, model_kwargs=TINY)
    assert torch.allclose(loaded_student(IMAGES).cls, student(IMAGES), atol=1e-5)
    assert report.layout == "official DINOv2 training checkpoint (student)"


def test_the_teacher_file_dinov2_writes_for_evaluation(tmp_path):
    """eval/<iteration>/teacher_checkpoint.pth: `{"teacher": ...}`, `backbone.` prefixes."""
    teacher = tiny_dinov2(REGISTERS, seed=0)
    state = {f"backbone.{key}": value for key, value in official_layout(teacher, 2).items()}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": state | HEADS}, path)
    released = tmp_path / "teacher_release.pth"
    torch.save(official_layout(teacher), released)
    loaded, report = load_backbone(path, model=REGISTERS, model_kwargs=TINY)
    assert torch.equal(loaded(IMAGES).cls, timm_features(REGISTERS, released))
    assert report.layout == "official DINOv2 checkpoint (teacher)"
    assert len(report.ignored) == 4


def test_model_checkpoint_reads_dinov2_files(tmp_path):
    """`model.checkpoint` (and `dmae.teacher_checkpoint`, the same reader) take DINOv2 files."""
    source = tiny_dinov2(REGISTERS, seed=0)
    path = tmp_path / "dinov2.pth"
    torch.save(training_checkpoint(source, source), path)
    kwargs = "{patch_size: 4, embed_dim: 64, depth: 4, num_heads: 2}"
    cfg = tiny_config(tmp_path / "run", **{"model.name": REGISTERS, "model.kwargs": kwargs,
                                          "model.checkpoint": str(path)})  # fmt: skip
    backbone = build_backbone(cfg).eval()
    assert torch.allclose(backbone(IMAGES).cls, source(IMAGES), atol=1e-5)


def test_broken_dinov2_files_are_named(tmp_path):
    state = official_layout(tiny_dinov2(PLAIN, seed=0), chunks=2)
    state["blocks.0.3.norm1.weight"] = state["blocks.1.3.norm1.weight"]  # block 3 in two chunks
    path = tmp_path / "twice.pth"
    torch.save(state, path)
    match = r"'blocks.3.norm1.weight' twice \('blocks.1.3.norm1.weight' and 'blocks.0.3.norm1"
    with pytest.raises(ValueError, match=match):
        read_backbone_weights(path)
    sharded = tmp_path / "model_0001249.rank_0.pth"
    shards = {
        f"{part}.backbone.blocks.0._flat_param": torch.zeros(8) for part in ("student", "teacher")
    }
    torch.save({"model": shards}, sharded)
    with pytest.raises(ValueError, match=r"flattened FSDP shards .*/teacher_checkpoint\.pth"):
        read_backbone_weights(sharded)
