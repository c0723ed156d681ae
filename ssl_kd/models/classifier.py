"""Any timm classification model, with the masked forward of a ViT where it is one.

A ViT runs through `ViTBackbone` (position embeddings added before the kept patches are
gathered, the last block's [CLS] attention on request) and then its own timm head, so a teacher
fed the student's top-k patches pays only for those (MaskedKD, arXiv:2302.10494). Any other
timm model (a ResNet, ...) runs as timm runs it, on all pixels.

Weights come from a local file only, checked key by key against the timm model: an ssl_kd run
checkpoint (its student), a DeiT release (`{"model": ...}`), `{"state_dict": ...}`, a bare timm
state dict or a `.safetensors` file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_kd.errors import UserError, key_list
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from ssl_kd.models.weights import read_state


@dataclass
class ClassifierOutput:
    """logits [B, K]; for a ViT, when asked: cls_attention [B, H, N_kept], the last block's
    [CLS]→patch attention; tokens [B, P + N_kept, D] after the final norm; block_outputs: raw
    outputs [B, P + N_kept, D] of the requested blocks (feature distillation). For a CNN:
    feature_map [B, C, h, w], its last feature map (ScaleKD's student features)."""

    logits: Tensor
    cls_attention: Tensor | None = None
    tokens: Tensor | None = None
    block_outputs: dict[int, Tensor] = field(default_factory=dict)
    feature_map: Tensor | None = None


class Classifier(nn.Module):
    """A timm model and its classification head.

    Args:
        backbone: a `ViTBackbone`, or any other timm model (built with `num_classes=0`).
        num_classes: the head's outputs; the head is new (timm's init for a ViT: truncated
            normal, std 0.02, zero bias).
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        model = self.timm_model
        model.reset_classifier(num_classes)
        if self.is_vit:
            head = self.vit_head
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.num_classes = num_classes

    @property
    def is_vit(self) -> bool:
        return isinstance(self.backbone, ViTBackbone)

    @property
    def vit(self) -> ViTBackbone:
        assert isinstance(self.backbone, ViTBackbone), "a ViT classifier's backbone"
        return self.backbone

    @property
    def vit_head(self) -> nn.Linear:
        head = self.vit.vit.head
        assert isinstance(head, nn.Linear)
        return head

    @property
    def timm_model(self) -> Any:
        """The timm model itself (its state dict has timm's names)."""
        return self.backbone.vit if isinstance(self.backbone, ViTBackbone) else self.backbone

    def forward(
        self, images: Tensor, keep_idx: Tensor | None = None, *, cls_attention: bool = False,
        return_blocks: Sequence[int] = (),
    ) -> ClassifierOutput:  # fmt: skip
        """images [B, C, H, W] → logits [B, K]; a ViT sees only the patches `keep_idx` [B, k]
        keeps (None: all) and returns its [CLS] attention, its tokens and the outputs of
        `return_blocks` if asked."""
        if isinstance(self.backbone, ViTBackbone):
            out = self.backbone(
                images, keep_idx, cls_attention=cls_attention, return_blocks=return_blocks
            )
            vit = self.backbone.vit
            logits = vit.head(vit.head_drop(out.cls))
            return ClassifierOutput(logits, out.cls_attention, out.tokens, out.block_outputs)
        if keep_idx is not None or cls_attention or return_blocks:
            raise ValueError(
                f"{type(self.backbone).__name__} is not a ViT: it has no patches to mask, no "
                "[CLS] attention and no blocks of tokens"
            )
        model: Any = self.backbone  # timm's forward, in its two halves
        features = model.forward_features(images)
        logits = model.forward_head(features)
        return ClassifierOutput(logits, feature_map=feature_map_of(model, features))


def feature_map_of(model: Any, features: Tensor) -> Tensor | None:
    """A timm model's `forward_features` output if it is a map [B, C, h, w] with the model's
    `num_features` channels first (a CNN's last stage); None otherwise: tokens [B, N, D] (an
    MLP-Mixer), channels last [B, h, w, C] (timm's Swin), pooled features."""
    if features.dim() == 4 and features.shape[1] == model.num_features:
        return features
    return None


def is_vit_model(name: str) -> bool:
    """Whether timm's `name` is a VisionTransformer (built bare on the meta device).

    Raises:
        UserError: timm knows no such model.
    """
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}")
    with torch.device("meta"):
        return isinstance(timm.create_model(name, pretrained=False), VisionTransformer)


def create_timm_model(name: str, *, drop_path_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    """A timm model that is not a ViT, without its classifier (`num_classes=0`), never
    downloading weights.

    Raises:
        UserError: timm refuses the name or a keyword argument.
    """
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs
        )
    except (RuntimeError, TypeError, AssertionError, ValueError) as err:
        with_kwargs = f" with {kwargs}" if kwargs else ""
        raise UserError(f"timm cannot build {name!r}{with_kwargs}: {err}") from None


def create_classifier(
    name: str,
    img_size: int,
    num_classes: int,
    *,
    drop_path_rate: float = 0.0,
    pos_embed_interpolation: str = "timm",
    **kwargs: Any,
) -> Classifier:
    """Any timm model by name as a `Classifier` of `num_classes` (a ViT at `img_size`)."""
    if is_vit_model(name):
        backbone: nn.Module = create_backbone(
            name, img_size, drop_path_rate=drop_path_rate,
            pos_embed_interpolation=pos_embed_interpolation, **kwargs,
        )  # fmt: skip
    else:
        backbone = create_timm_model(name, drop_path_rate=drop_path_rate, **kwargs)
    return Classifier(backbone, num_classes)


def read_classifier_state(path: str | Path, vit: bool) -> tuple[dict[str, Tensor], str]:
    """(timm state dict, layout) of the classifier a local file holds (see the module
    docstring); an ssl_kd run gives its student (`student.backbone.*`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder: an `ssl-kd export` folder holds a backbone without its "
            "classifier head; give the run's checkpoint.pth or a timm/DeiT weights file"
        )
    if not path.is_file():
        raise UserError(f"{path} does not exist (nothing is ever downloaded)")
    state = read_state(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    if "method" in state and "config" in state:
        prefix = "student.backbone.vit." if vit else "student.backbone."
        state = {k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)}
        layout = "ssl_kd run checkpoint (student)"
    elif isinstance(state.get("model"), dict):
        state, layout = state["model"], "{'model': ...} checkpoint (DeiT release)"
    elif isinstance(state.get("state_dict"), dict):
        state, layout = state["state_dict"], "{'state_dict': ...} checkpoint"
    else:
        layout = "safetensors state dict" if path.suffix == ".safetensors" else "bare state dict"
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    return tensors, layout


def load_classifier_weights(classifier: Classifier, path: str | Path) -> str:
    """Loads every tensor of the timm model from `path`, strictly; returns the file's layout.

    Raises:
        UserError: naming the file, its layout and the missing, unexpected and mis-shaped keys.
    """
    state, layout = read_classifier_state(path, classifier.is_vit)
    model = classifier.timm_model
    expected = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or mismatched:
        raise UserError(
            f"{path} ({layout}) does not fit {type(model).__name__} with "
            f"{classifier.num_classes} classes: missing keys {key_list(missing, 8, quoted=True)}, "
            f"unexpected keys {key_list(unexpected, 8, quoted=True)}, shape mismatches "
            f"{key_list(mismatched, 8, quoted=True)}"
        )
    model.load_state_dict(state, strict=True)
    return layout


@dataclass
class ClassifierFile:
    """What `load_classifier` read: the layout, the model built, and the run's config if any."""

    path: str
    layout: str
    model: str
    model_kwargs: dict[str, Any]
    img_size: int
    num_classes: int
    run_config: dict[str, Any] | None

    def __str__(self) -> str:
        return (
            f"loaded {self.model} {self.model_kwargs or ''} ({self.num_classes} classes) from "
            f"{self.path} ({self.layout})"
        )


def load_classifier(
    path: str | Path,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> tuple[Classifier, ClassifierFile]:
    """The classifier a file holds, every key loaded (see `load_classifier_weights`).

    An ssl_kd run's checkpoint says its model (its student); another file needs `model` (and
    `model_kwargs`); the number of classes is read from the file's head.

    Raises:
        UserError: no model named, no head in the file, or keys that do not fit.
    """
    run_config = None
    if Path(path).is_file():
        state = read_state(Path(path))
        if isinstance(state, dict) and "method" in state and "config" in state:
            run_config = state["config"]
    if run_config is not None and model is None:
        saved = run_config["model"]
        model, model_kwargs = saved["name"], dict(saved.get("kwargs") or {})
        img_size = img_size or int(saved["img_size"])
    if model is None:
        raise UserError(f"{path} does not say which timm model it holds: pass --model")
    model_kwargs = dict(model_kwargs or {})
    vit = is_vit_model(model)
    tensors, _ = read_classifier_state(path, vit)
    head = timm.models.get_pretrained_cfg(model)
    head_key = f"{head.classifier if head and head.classifier else 'head'}.weight"
    if head_key not in tensors:
        raise UserError(
            f"{path} holds no classifier head ({head_key}): a backbone without its head (a "
            "DINO/MAE run, an export) cannot classify; evaluate it with `ssl-kd eval knn` or "
            "`ssl-kd eval linear`"
        )
    num_classes = int(tensors[head_key].shape[0])
    size = img_size or 224
    classifier = create_classifier(model, size, num_classes, **model_kwargs)
    layout = load_classifier_weights(classifier, path)
    return classifier.eval(), ClassifierFile(
        str(path), layout, model, model_kwargs, size, num_classes, run_config
    )
