"""The method registry: a method declared in one file (here, in this test module) trains through
the same `train(cfg)` with no edit anywhere else, and nothing outside ssl_kd/methods/ names one."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ssl_kd.config import Config
from ssl_kd.data import Views
from ssl_kd.engine.checkpoint import load_checkpoint
from ssl_kd.engine.trainer import train
from ssl_kd.errors import ConfigError
from ssl_kd.methods import method_names, registry
from ssl_kd.methods.base import Method, StepOutput, StepState
from ssl_kd.models.backbone import ViTBackbone
from ssl_kd.models.weights import read_backbone_weights
from tests.helpers import tiny_config

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_kd"


@dataclass
class ToyConfig:
    """The toy method's own section: how far to pull the features towards zero."""

    scale: float = 1.0

    def check(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"toy.scale={self.scale} must be > 0")


class Toy(Method):
    """Shrinks the [CLS] features of one crop: the smallest method the contract allows."""

    names = ("toy",)
    section = "toy"
    config_class = ToyConfig
    views = Views.SINGLE_CROP
    default_keep_ratio = 1.0
    default_strategy = "random"
    backbones = {"student": "student"}  # noqa: RUF012

    def __init__(self, backbone: ViTBackbone, cfg: ToyConfig) -> None:
        super().__init__()
        self.student = backbone
        self.cfg = cfg
        self.steps_seen: list[int] = []

    @classmethod
    def build(cls, cfg: Config, backbone: ViTBackbone) -> "Toy":
        return cls(backbone, cfg.section(cls.section))

    def forward(self, views: list[torch.Tensor], state: StepState) -> StepOutput:
        self.steps_seen.append(state.step)
        features = self.student_call(views[0]).cls  # [B, D]
        loss = self.cfg.scale * features.pow(2).mean()
        return StepOutput(loss, {"toy_loss": loss.item()}, images=len(features))


@pytest.fixture
def toy():
    registry.register(Toy)
    yield Toy
    registry.unregister(Toy)


def test_a_method_registered_in_a_test_module_trains_through_train(toy, tmp_path):
    assert "toy" in method_names()
    cfg = tiny_config(tmp_path, method="toy", **{"toy.scale": 2.0, "train.max_steps": 4})
    assert cfg.section("toy") == ToyConfig(scale=2.0)
    summary = train(cfg)
    assert summary["steps"] == 4 and summary["method"] == "toy"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [line["method/toy_loss"] for line in lines]
    assert losses[-1] < losses[0]  # the toy loss is what the optimizer minimised
    assert "toy:\n  scale: 2.0" in (tmp_path / "config.yaml").read_text()

    # Evaluation finds the backbone from what the method declared, with no method code.
    state = load_checkpoint(tmp_path / "checkpoint.pth")
    assert state["backbones"] == {"student": "student.vit."}
    weights = read_backbone_weights(tmp_path / "checkpoint.pth")
    saved = {k.removeprefix("student.vit."): v for k, v in state["method"].items()}
    assert weights.state.keys() == saved.keys()
    assert all(torch.equal(weights.state[k], saved[k]) for k in saved)


def test_a_method_checks_its_own_section(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"toy.scale=-1.0 must be > 0"):
        tiny_config(tmp_path, method="toy", **{"toy.scale": -1})
    with pytest.raises(ConfigError, match=r"unknown config key 'toy.scal'"):
        tiny_config(tmp_path, method="toy", **{"toy.scal": 1})


def test_unknown_method_lists_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"method='nope' is not valid; choose one of: dino"):
        tiny_config(tmp_path, method="nope")


def test_a_taken_name_or_section_is_refused(toy):
    clash = type("Clash", (Toy,), {"names": ("dino",), "section": "clash"})
    with pytest.raises(ValueError, match="method name 'dino' is taken"):
        registry.register(clash)
    clash = type("Clash", (Toy,), {"names": ("other",), "section": "dino"})
    with pytest.raises(ValueError, match="config section 'dino' is taken"):
        registry.register(clash)


def test_no_method_name_is_a_literal_outside_the_methods_package():
    """The engine, config, data, models, evaluation and the CLI ask the registry instead."""
    names = "|".join(re.escape(name) for name in method_names())
    literal = re.compile(rf"""["']({names})["']""")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "methods":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # The linear probe's protocols and the position-embedding interpolations are named
            # after the papers (and code) that define them.
            lowered = line.lower()
            if literal.search(line) and not ("protocol" in lowered or "interpolation" in lowered):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_step_state_carries_no_schedule_values():
    """Methods compute their schedules from the step; the trainer passes only where it is."""
    assert set(StepState.__dataclass_fields__) == {"step", "epoch", "generator", "shard"}
