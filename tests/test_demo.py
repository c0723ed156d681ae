"""The README's first command, end to end: the demo must learn, not only run (slow: minutes)."""

import json
from pathlib import Path

import pytest

from ssl_kd.engine.trainer import train
from ssl_kd.run_config import load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.mark.slow
def test_demo_beats_the_untrained_backbone(tmp_path: Path) -> None:
    cfg = load_config(str(DEMO), [f"output_dir={tmp_path}", "eval.knn_every_epochs=0"])
    summary = train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["knn_top1"] > summary["knn_top1_random_init"] + 3.0
    # keep 0.5 of 16 patches: the teacher runs 9 of 17 tokens (the [CLS] always stays), 0.555
    # of the unmasked cost as counted (README), not half
    assert summary["teacher_pflops"] < 0.56 * summary["teacher_pflops_unmasked"]
