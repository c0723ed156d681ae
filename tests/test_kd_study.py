"""The supervised-distillation study (eval/bench/kd_study.py) and the RESULTS.md sections."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_kd.flops import forward_macs
from ssl_kd.masking import num_kept
from ssl_kd.models.backbone import create_backbone
from ssl_kd.run_config import config_from_dict
from tests.helpers import bench

REPO = Path(__file__).resolve().parents[1]


def test_every_row_is_a_valid_config_of_its_method_and_seed(tmp_path: Path) -> None:
    study = bench("kd_study")
    dirs = set()
    for quick in (False, True):
        teacher = config_from_dict(study.teacher_values(4, tmp_path, quick))
        Path(teacher.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(teacher.output_dir) / "checkpoint.pth").touch()
        assert teacher.method == "supervised" and teacher.train.seed == 4
        for row in study.ROWS:
            cfg = config_from_dict(study.student_values(row, 4, tmp_path, quick))
            assert (cfg.method, cfg.masking.keep_ratio, cfg.masking.strategy) == (
                row.method, row.keep, row.strategy,
            )  # fmt: skip
            assert cfg.train.seed == 4
            if row.method != "supervised":  # distils from the teacher of its own seed's split
                assert cfg.section(row.method).teacher_checkpoint == str(
                    Path(teacher.output_dir) / "checkpoint.pth"
                )
            dirs.add(cfg.output_dir)
            assert (cfg.train.epochs == 1) == quick
    assert len(dirs) == len(study.ROWS)  # one run dir per row and seed, in both modes
    assert set(study.DEMO_ROWS) <= {row.slug for row in study.ROWS}


def lines_with(study, means: dict[str, list[float]]) -> list[dict]:  # type: ignore[no-untyped-def]
    slugs = {row.slug: row.name for row in study.ROWS}
    records = [
        {"row": slugs[slug], "seed": seed, "val_top1": value, "val_top5": 100.0,
         "teacher_pflops": 1.0, "teacher_pflops_unmasked": 2.0, "wall_s": 1.0, "steps": 3}
        for slug, values in means.items()
        for seed, value in enumerate(values)
    ]  # fmt: skip
    return study.aggregate(records, [slugs[slug] for slug in means])


def test_the_ordering_verdict_needs_more_than_one_std_between_means() -> None:
    study = bench("kd_study")
    apart = lines_with(study, {"maskedkd_topk_0.5": [80, 81, 82],
                               "maskedkd_random_0.5": [70, 71, 72],
                               "maskedkd_bottomk_0.5": [60, 61, 62]})  # fmt: skip
    assert apart[0]["val_top1"] == (81.0, pytest.approx(statistics.stdev([80, 81, 82])))
    assert study.ordering_verdict(apart).startswith("The ordering top-k > random > bottom-k holds")
    # random's std (5) is larger than the gap to top-k (81 − 77 = 4): not beyond one std
    close = lines_with(study, {"maskedkd_topk_0.5": [80, 81, 82],
                               "maskedkd_random_0.5": [72, 77, 82],
                               "maskedkd_bottomk_0.5": [60, 61, 62]})  # fmt: skip
    verdict = study.ordering_verdict(close)
    assert "does not hold" in verdict
    assert "top-k > random: no; random > bottom-k: yes" in verdict


def test_a_study_rewrites_its_own_section_and_keeps_the_others(tmp_path: Path) -> None:
    report = bench("report")
    path = tmp_path / "RESULTS.md"
    report.write_section(path, "a", "# A\nfirst")
    report.write_section(path, "b", "# B\nsecond")
    report.write_section(path, "a", "# A\nagain")
    text = path.read_text()
    assert text.count("<!-- study: a -->") == 1 and text.count("<!-- study: b -->") == 1
    assert "again" in text and "first" not in text and "second" in text
    assert text.index("# A") < text.index("# B")  # rewritten in place, not moved to the end
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_quick_study_costs_match_the_flop_counter(tmp_path: Path) -> None:
    """`kd_study.py --quick` end to end: each masked row's teacher cost is the counted cost of
    its kept patches, the no-KD row's teacher costs nothing, every row has a top-1."""
    results = tmp_path / "RESULTS.md"
    subprocess.run(
        [sys.executable, str(REPO / "eval/bench/kd_study.py"), "--quick",
         "--workdir", str(tmp_path / "work"), "--results", str(results)],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    records = {r["row"]: r for r in json.loads((tmp_path / "kd_study.json").read_text())}
    assert "MaskedKD keep 0.5, attention_bottomk" in results.read_text()
    assert records["no KD (supervised)"]["teacher_pflops"] == 0
    study = bench("kd_study")
    kwargs = study.teacher_values(0, tmp_path, True)["model"]["kwargs"]
    size = study.teacher_values(0, tmp_path, True)["model"]["img_size"]
    teacher = create_backbone("vit_tiny_patch16_224", size, **kwargs)
    patches = (size // kwargs["patch_size"]) ** 2
    whole = forward_macs(teacher, size)
    for name, keep in [("MaskedKD keep 0.5, random", 0.5),
                       ("MaskedKD keep 0.25, attention_topk", 0.25)]:  # fmt: skip
        record = records[name]
        ratio = record["teacher_pflops"] / record["teacher_pflops_unmasked"]
        # the head's few MACs do not shrink with the keep ratio
        assert ratio == pytest.approx(forward_macs(teacher, size, num_kept(patches, keep)) / whole,
                                      abs=0.01)  # fmt: skip
    for record in records.values():
        assert 0 <= record["val_top1"] <= 100


def test_reuse_reads_a_finished_run_of_the_same_config_only(tmp_path: Path, monkeypatch) -> None:
    """`--reuse` (a study killed and started again) takes a run's summary.json only when its
    config.yaml is the config the study would train now; any other run is trained again."""
    import ssl_kd.engine.trainer as trainer
    from ssl_kd.config import to_yaml

    study = bench("kd_study")
    values = study.teacher_values(0, tmp_path, quick=True)
    out = Path(values["output_dir"])
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(to_yaml(config_from_dict(values)))
    (out / "summary.json").write_text(json.dumps({"val_top1": 12.5}))
    trained = []
    monkeypatch.setattr(trainer, "train", lambda cfg, **_: trained.append(cfg) or {"val_top1": 1})
    assert study.run(values, "test", quiet=True, reuse=True) == {"val_top1": 12.5}
    assert not trained
    values["train"]["epochs"] += 1  # another config in the same run dir
    assert study.run(values, "test", quiet=True, reuse=True) == {"val_top1": 1}
    assert len(trained) == 1
