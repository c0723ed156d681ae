"""A checkpoint file or export folder → the backbone to evaluate, built with the right
architecture (`ssl_kd.models.architecture` says which: the caller's, an export's config.json,
the run's saved config or the official `args`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_kd.errors import UserError, key_list
from ssl_kd.models.architecture import resolve_architecture
from ssl_kd.models.backbone import ViTBackbone, create_backbone
from ssl_kd.models.weights import check_fit, fit_problems, read_backbone_weights


@dataclass
class LoadReport:
    """What was loaded, for the console and the result files."""

    path: str
    layout: str
    part: str | None
    model: str
    model_kwargs: dict[str, Any]
    img_size: int
    loaded: int
    ignored: list[str]
    run_config: dict[str, Any] | None = None  # the ssl_kd run config saved in the file
    # Only with strict=False: keys that did not load (missing keep their initial values).
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ignored = key_list(self.ignored)
        not_loaded = ""
        if self.missing or self.unexpected:
            not_loaded = (
                f" (--strict false: missing {key_list(self.missing)}; not loaded "
                f"{key_list(self.unexpected)})"
            )
        return (
            f"loaded {self.loaded} tensors into {self.model} {self.model_kwargs or ''} from "
            f"{self.path} ({self.layout}); missing {len(self.missing)}, unexpected "
            f"{len(self.unexpected)}{not_loaded}, ignored {len(self.ignored)}"
            + (f" ({ignored})" if self.ignored else "")
        )


def load_backbone(
    path: str | Path,
    *,
    part: str | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
) -> tuple[ViTBackbone, LoadReport]:
    """Builds the backbone a checkpoint holds and loads it strictly (heads etc. ignored).

    Args:
        path: any file or export folder `read_backbone_weights` accepts.
        part: "teacher" / "student" for files holding both; None: what the run evaluates.
        model, model_kwargs: timm name and overrides; default: what the file says
            (`resolve_architecture`).
        strict: False loads the tensors that fit and reports the others instead of raising.

    Raises:
        ValueError: the architecture is unknown, or the weights do not fit it (keys named).
    """
    weights = read_backbone_weights(path, part)
    arch = resolve_architecture(weights, model, model_kwargs)
    model, kwargs, img_size = arch.name, arch.kwargs, arch.img_size
    try:
        backbone = create_backbone(
            model, img_size, pos_embed_interpolation=arch.pos_embed_interpolation, **kwargs
        )
    except TypeError as err:
        raise UserError(f"--model-kwargs {kwargs} do not fit {model}: {err}") from None
    missing, unexpected, mismatched = fit_problems(backbone, weights)
    if strict:
        check_fit(backbone, weights)
    mismatched_keys = {entry.split(":")[0] for entry in mismatched}
    fitting = {k: v for k, v in weights.state.items() if k not in set(unexpected) | mismatched_keys}
    backbone.vit.load_state_dict(fitting, strict=strict)
    report = LoadReport(
        str(path),
        weights.layout,
        weights.part,
        model,
        kwargs,
        img_size,
        len(fitting),
        weights.ignored,
        weights.config,
        missing + sorted(mismatched_keys),
        unexpected + mismatched,
    )
    return backbone.eval(), report
