"""The recipe configs against the official runs they reproduce.

Two checks per recipe: every `official → key: value` line of its header holds, in the YAML and
in the loaded config; and, written here independently from the official sources, the values
the official run used are the config's (`OFFICIAL`), with its global batch and peak lr.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ssl_kd.config import to_dict
from ssl_kd.config.merge import flatten, free_dicts
from ssl_kd.methods import registry
from ssl_kd.run_config import load_config
from tests.helpers import REPO

# facebookresearch/dino, README "Vanilla DINO training": `--nproc_per_node=8 main_dino.py
# --arch vit_small`, every other argument at main_dino.py's default (DINOHead and DINOLoss
# defaults for the head's widths, the student temperature and the center momentum).
DINO_VANILLA: dict[str, Any] = {
    "model.name": "vit_small_patch16_224", "model.img_size": 224, "model.drop_path_rate": 0.1,
    "model.pos_embed_interpolation": "dino",
    "data.global_crop_size": 224, "data.local_crop_size": 96, "data.num_local_views": 8,
    "data.global_crop_scale": [0.4, 1.0], "data.local_crop_scale": [0.05, 0.4],
    "data.num_workers": 10,
    "masking.keep_ratio": 1.0,
    "dino.out_dim": 65536, "dino.hidden_dim": 2048, "dino.bottleneck_dim": 256,
    "dino.norm_last_layer": True, "dino.batch_norm": False, "dino.student_temp": 0.1,
    "dino.warmup_teacher_temp": 0.04, "dino.teacher_temp": 0.04,
    "dino.warmup_teacher_temp_epochs": 0, "dino.center_momentum": 0.9,
    "dino.momentum_teacher": 0.996, "dino.freeze_last_layer_epochs": 1, "dino.clip_grad": 3.0,
    "dino.koleo_weight": 0.0,
    "optim.name": "adamw", "optim.betas": [0.9, 0.999], "optim.lr": 5e-4, "optim.min_lr": 1e-6,
    "optim.warmup_epochs": 10, "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4,
    "train.epochs": 100, "train.seed": 0,
}  # fmt: skip

# MaskedKD (arXiv:2302.10494), Table 5 and its appendix: the vanilla run, the teacher fed the
# top 66% of patches by the student's last-block [CLS] attention, 4 GPUs × 128 images.
DINO_MASKEDKD = {**DINO_VANILLA, "masking.keep_ratio": 0.66, "masking.strategy": "attention_topk"}

# UCSC-VLAA/DMAE pretrain.sh, every other argument at main_distill.py's default.
DMAE_B_FROM_L: dict[str, Any] = {
    "method": "dmae", "model.name": "vit_base_patch16_224", "model.img_size": 224,
    "model.drop_path_rate": 0.0, "data.global_crop_size": 224, "data.num_workers": 10,
    "masking.keep_ratio": 0.25, "masking.strategy": "random",
    "dmae.norm_pix_loss": False, "dmae.decoder_dim": 512, "dmae.decoder_depth": 8,
    "dmae.decoder_heads": 16, "dmae.teacher_name": "vit_large_patch16_224",
    "dmae.aligned_blocks": [[8, 17]], "dmae.projection": "linear", "dmae.distill_weight": 1.0,
    "dmae.teacher_keep_ratio": 1.0,
    "optim.name": "adamw", "optim.betas": [0.9, 0.95], "optim.lr": 1.5e-4, "optim.min_lr": 0.0,
    "optim.warmup_epochs": 20, "optim.weight_decay": 0.05, "optim.weight_decay_end": 0.05,
    "train.epochs": 100, "train.seed": 0,
}  # fmt: skip


# facebookresearch/deit README_deit.md "Training" for DeiT-S: `--nproc_per_node=4 main.py
# --model deit_small_patch16_224 --batch-size 256`, every other argument at main.py's default
# (datasets.build_transform for the crop and flip: timm's create_transform defaults).
DEIT_S: dict[str, Any] = {
    "method": "supervised", "model.name": "deit_small_patch16_224", "model.img_size": 224,
    "model.drop_path_rate": 0.1, "data.global_crop_size": 224,
    "data.global_crop_scale": [0.08, 1.0], "data.hflip_prob": 0.5,
    "data.repeated_augmentation": 3, "data.num_workers": 10,
    "supervised.num_classes": 1000, "supervised.smoothing": 0.1, "supervised.mixup": 0.8,
    "supervised.cutmix": 1.0, "supervised.mixup_prob": 1.0, "supervised.mixup_switch_prob": 0.5,
    "supervised.mixup_mode": "batch", "supervised.auto_augment": "rand-m9-mstd0.5-inc1",
    "supervised.color_jitter": 0.3, "supervised.interpolation": "bicubic",
    "supervised.random_erasing": 0.25, "supervised.random_erasing_mode": "pixel",
    "supervised.random_erasing_count": 1, "supervised.clip_grad": 0.0,
    "optim.name": "adamw", "optim.betas": [0.9, 0.999], "optim.min_lr": 1e-5,
    "optim.warmup_epochs": 5, "optim.weight_decay": 0.05, "optim.weight_decay_end": 0.05,
    "train.epochs": 300, "train.seed": 0, "masking.keep_ratio": 1.0,
}  # fmt: skip


# effl-lab/MaskedKD README "Training on ImageNet-1K": DeiT-S from the DeiT-B release,
# `--nproc_per_node=8 --batch-size 128 --distillation-type soft --distillation-alpha 0.5
# --distillation-tau 1 --maskedkd --len_num_keep 98`, every other argument at its main.py's
# default (DeiT's).
MASKEDKD_S_FROM_B: dict[str, Any] = {
    **{key.replace("supervised.", "kd."): value for key, value in DEIT_S.items()},
    "method": "kd", "kd.teacher_name": "deit_base_patch16_224", "kd.distillation": "soft",
    "kd.alpha": 0.5, "kd.tau": 1.0, "masking.keep_ratio": 0.5,
    "masking.strategy": "attention_topk",
}  # fmt: skip


# MaskedKD (arXiv:2302.10494) Table 2's DeiT-S → DeiT-Ti: the README command with
# `--model deit_tiny_patch16_224 --teacher_model deit_small` (8 × 128, as the first README trained
# DeiT-Ti), and appendix A's augmentation for the tiny student: random resized crops and flips,
# nothing else (no RandAugment, colour jitter, random erasing, Mixup or CutMix).
MASKEDKD_TI_FROM_S: dict[str, Any] = {
    **MASKEDKD_S_FROM_B, "model.name": "deit_tiny_patch16_224",
    "kd.teacher_name": "deit_small_patch16_224", "kd.auto_augment": None,
    "kd.color_jitter": 0.0, "kd.random_erasing": 0.0, "kd.mixup": 0.0, "kd.cutmix": 0.0,
}  # fmt: skip


# yzd-v/cls_KD, branch master: configs/distillers/imagenet/deit-s_distill_deit-t_img.py on
# configs/deit/deit-tiny_pt-4xb256_in1k.py (deit-small_pt-4xb256_in1k.py's bases:
# imagenet_bs64_swin_224.py, imagenet_bs1024_adamw_swin.py) run by `tools/dist_train.sh CONFIG 4`.
# Its logit term is NKD; ssl_kd's is the file's switched-off KDLoss entry (temp 1, alpha 0.5).
VITKD_TI_FROM_S: dict[str, Any] = {
    "method": "vitkd", "model.name": "deit_tiny_patch16_224", "model.img_size": 224,
    "model.drop_path_rate": 0.0, "data.global_crop_size": 224,
    "data.global_crop_scale": [0.08, 1.0], "data.hflip_prob": 0.5,
    "data.repeated_augmentation": 1, "data.num_workers": 5, "masking.keep_ratio": 1.0,
    "vitkd.teacher_name": "deit_small_patch16_224", "vitkd.mimic_blocks": [0, 1],
    "vitkd.mimic_weight": 3e-5, "vitkd.generation_weight": 3e-6,
    "vitkd.generation_mask_ratio": 0.5, "vitkd.distillation": "soft", "vitkd.alpha": 0.5,
    "vitkd.tau": 1.0, "vitkd.num_classes": 1000, "vitkd.smoothing": 0.1, "vitkd.mixup": 0.8,
    "vitkd.cutmix": 1.0, "vitkd.mixup_prob": 1.0, "vitkd.mixup_switch_prob": 0.5,
    "vitkd.mixup_mode": "batch", "vitkd.auto_augment": "rand-m9-mstd0.5-inc1",
    "vitkd.color_jitter": 0.0, "vitkd.interpolation": "bicubic", "vitkd.random_erasing": 0.25,
    "vitkd.random_erasing_mode": "pixel", "vitkd.random_erasing_count": 1,
    "vitkd.clip_grad": 5.0,
    "optim.name": "adamw", "optim.betas": [0.9, 0.999], "optim.min_lr": 1e-5,
    "optim.warmup_epochs": 20, "optim.weight_decay": 0.05, "optim.weight_decay_end": 0.05,
    "train.epochs": 300, "train.amp": False, "eval.classify_every_epochs": 10,
}  # fmt: skip


# deep-optimization/ScaleKD, configs/distillers/traditional_traning_strategy/
# swin-l_distill_res50_img_s3_s4.py on configs/resnet/resnet50_8xb32_in1k.py (its _base_:
# models/resnet50.py, datasets/imagenet_bs32.py, schedules/imagenet_bs256.py) run by
# `tools/dist_train.sh CONFIG 8`. The teacher is not here: the recipe's ViT-B/16 stands in for
# its Swin-L (a deliberate difference the header names).
SCALEKD_RES50: dict[str, Any] = {
    "method": "scalekd", "model.name": "resnet50", "model.drop_path_rate": 0.0,
    "data.global_crop_size": 224, "data.global_crop_scale": [0.08, 1.0],
    "data.hflip_prob": 0.5, "data.repeated_augmentation": 1, "data.num_workers": 8,
    "masking.keep_ratio": 1.0,
    "scalekd.num_classes": 1000, "scalekd.smoothing": 0.0, "scalekd.mixup": 0.0,
    "scalekd.cutmix": 0.0, "scalekd.auto_augment": None, "scalekd.color_jitter": 0.0,
    "scalekd.random_erasing": 0.0, "scalekd.interpolation": "bilinear",
    "scalekd.clip_grad": 0.0, "scalekd.distillation": "soft", "scalekd.alpha": 0.5,
    "scalekd.tau": 1.0, "scalekd.spatial_weight": 0.08, "scalekd.frequency_weight": 0.06,
    "scalekd.softmax_scale": 5.0, "scalekd.num_heads": 16, "scalekd.tpp_depth": 2,
    "optim.name": "sgd", "optim.warmup_epochs": 0, "optim.weight_decay": 1e-4,
    "optim.weight_decay_end": 1e-4, "train.epochs": 100, "train.amp": False,
}  # fmt: skip


@dataclass
class Recipe:
    official: dict[str, Any]
    processes: int  # what the header tells the user to run it on
    global_batch: int  # the official run's
    peak_lr: float  # the official run's: base lr × global batch / 256
    teacher_file: str | None = None  # the name of the official run's teacher file
    teacher_key: str = "dmae.teacher_checkpoint"  # the key that names it


RECIPES = {
    "dino_vit_s16.yaml": Recipe(DINO_VANILLA, processes=8, global_batch=512, peak_lr=1e-3),
    "dino_maskedkd_vit_s16.yaml": Recipe(
        DINO_MASKEDKD, processes=4, global_batch=512, peak_lr=1e-3
    ),
    "dmae_vit_b16_from_l16.yaml": Recipe(
        DMAE_B_FROM_L,
        processes=64,
        global_batch=4096,
        peak_lr=2.4e-3,
        teacher_file="mae_visualize_vit_large.pth",
    ),
    # DeiT scales its lr per 512 images: 5e-4 × 1024 / 512.
    "deit_s16_supervised.yaml": Recipe(DEIT_S, processes=4, global_batch=1024, peak_lr=1e-3),
    "maskedkd_deit_s16_from_b16.yaml": Recipe(
        MASKEDKD_S_FROM_B,
        processes=8,
        global_batch=1024,
        peak_lr=1e-3,
        teacher_file="deit_base_patch16_224-b5f2ef4d.pth",
        teacher_key="kd.teacher_checkpoint",
    ),
    "maskedkd_deit_ti16_from_s16.yaml": Recipe(
        MASKEDKD_TI_FROM_S,
        processes=8,
        global_batch=1024,
        peak_lr=1e-3,
        teacher_file="deit_small_patch16_224-cd65a155.pth",
        teacher_key="kd.teacher_checkpoint",
    ),
    # AdamW lr 1e-3 for 1024 images. The teacher file is DeiT's release in place of mmcls's
    # own DeiT-S (deit-small_pt-4xb256_in1k_20220218-9425b9bb.pth).
    "vitkd_deit_ti16_from_s16.yaml": Recipe(
        VITKD_TI_FROM_S,
        processes=4,
        global_batch=1024,
        peak_lr=1e-3,
        teacher_file="deit_small_patch16_224-cd65a155.pth",
        teacher_key="vitkd.teacher_checkpoint",
    ),
    # SGD lr 0.1 for 256 images. The teacher file is the recipe's stand-in, the DeiT-B release.
    "scalekd_resnet50_from_vit_b16.yaml": Recipe(
        SCALEKD_RES50,
        processes=8,
        global_batch=256,
        peak_lr=0.1,
        teacher_file="deit_base_patch16_224-b5f2ef4d.pth",
        teacher_key="scalekd.teacher_checkpoint",
    ),
}
CLAIM = re.compile(r"→ ([a-z_]+(?:\.[a-z_]+)+): (.+?)(?: \(|$)", re.MULTILINE)
# Keys the test points at local files (the recipes name placeholders): compared in the YAML only.
LOCAL_FILES = (
    "data.path",
    "dmae.teacher_checkpoint",
    "kd.teacher_checkpoint",
    "scalekd.teacher_checkpoint",
    "vitkd.teacher_checkpoint",
    "eval.val_path",
)


def header(path: Path) -> str:
    """The comment lines the file opens with."""
    return "\n".join(
        itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines())
    )


def claims(text: str) -> dict[str, Any]:
    """`key: value` after each `→` of the header, the value read as YAML."""
    return {key: yaml.safe_load(value) for key, value in CLAIM.findall(text)}


def loaded(path: Path, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the YAML file's keys, the loaded config's), flattened to dotted keys."""
    free = free_dicts(registry.sections())
    raw = flatten(yaml.safe_load(path.read_text()), free)
    teacher = tmp_path / "teacher.pth"
    teacher.touch()
    overrides = [
        f"data.path={tmp_path}",
        f"dmae.teacher_checkpoint={teacher}",
        f"kd.teacher_checkpoint={teacher}",
        f"scalekd.teacher_checkpoint={teacher}",
        f"vitkd.teacher_checkpoint={teacher}",
        f"eval.val_path={tmp_path}",
    ]
    return raw, flatten(to_dict(load_config(path, overrides)), free)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12)
    return bool(a == b)


def test_every_config_that_claims_an_official_run_is_checked_here():
    claiming = {
        path.name
        for path in (REPO / "configs").glob("*.yaml")
        if header(path).startswith("# Reproduces: ")
    }
    assert claiming == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_header_names_the_run_and_every_claim_holds(name, tmp_path):
    path = REPO / "configs" / name
    text = header(path)
    assert text.startswith("# Reproduces: ")
    assert "Key by key" in text and "Deliberate differences" in text
    assert f"{RECIPES[name].processes} processes" in text
    found = claims(text)
    assert len(found) >= 20, found  # the comparison is there, key by key
    raw, config = loaded(path, tmp_path)
    for key, value in found.items():
        assert key in raw, f"{name}: the header claims {key}, which the YAML does not set"
        assert same(raw[key], value), f"{name}: header {key}={value!r}, YAML {raw[key]!r}"
        if key not in LOCAL_FILES:
            assert same(config[key], value), (
                f"{name}: header {key}={value!r}, loaded {config[key]!r}"
            )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_carries_the_official_values(name, tmp_path):
    path, recipe = REPO / "configs" / name, RECIPES[name]
    raw, config = loaded(path, tmp_path)
    wrong = {
        key: (config[key], value)
        for key, value in recipe.official.items()
        if not same(config[key], value)
    }
    assert not wrong, f"{name}: (ssl_kd, official) {wrong}"
    global_batch = config["train.batch_size"] * recipe.processes
    assert global_batch == recipe.global_batch
    assert config["optim.lr"] * global_batch / 256 == pytest.approx(recipe.peak_lr)
    if recipe.teacher_file:
        assert Path(raw[recipe.teacher_key]).name == recipe.teacher_file


# What each DeiT-Ti recipe's per-image transform must hold and must not: MaskedKD's appendix A
# trains the tiny student on random resized crops and flips alone; ViTKD's mmcls pipeline adds
# RandAugment and random erasing, never colour jitter.
CROP = "RandomResizedCropAndInterpolation(size=(224, 224), scale=(0.08, 1.0)"
TINY_TRANSFORMS = {
    "maskedkd_deit_ti16_from_s16.yaml": (
        [CROP, "interpolation=bicubic", "RandomHorizontalFlip(p=0.5)"],
        ["RandAugment", "RandomErasing", "brightness=("],
    ),
    "vitkd_deit_ti16_from_s16.yaml": (
        [CROP, "interpolation=bicubic", "RandomHorizontalFlip(p=0.5)", "RandAugment(n=2",
         "m=9, mstd=0.5", "RandomErasing(p=0.25, mode=pixel, count=(1, 1))"],
        ["brightness=("],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TINY_TRANSFORMS))
def test_tiny_recipe_builds_the_official_augmentation(name, tmp_path):
    from ssl_kd.methods import method_class

    path = REPO / "configs" / name
    teacher = tmp_path / "teacher.pth"
    teacher.touch()
    section = yaml.safe_load(path.read_text())["method"]
    cfg = load_config(
        path,
        [
            f"data.path={tmp_path}",
            f"eval.val_path={tmp_path}",
            f"{section}.teacher_checkpoint={teacher}",
        ],
    )
    transform = repr(method_class(cfg.method).train_transform(cfg))
    present, absent = TINY_TRANSFORMS[name]
    assert all(part in transform for part in present), transform
    assert not any(part in transform for part in absent), transform
