"""The benchmark scripts compare what they claim to compare (eval/bench/*.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_kd.data.splits import eval_splits
from ssl_kd.evaluation.knn import evaluate_knn
from ssl_kd.flops import forward_macs
from ssl_kd.masking import num_kept
from ssl_kd.models.backbone import create_backbone
from ssl_kd.run_config import load_config
from tests.helpers import bench

REPO = Path(__file__).resolve().parents[1]


TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
# The DINO step's model made tiny, for ssl_kd (overrides) and the reference (its arguments).
TINY_DINO = (
    "model.name=vit_tiny_patch16_224", "model.img_size=32", "model.drop_path_rate=0.0",
    "model.kwargs.patch_size=8", "model.kwargs.embed_dim=48", "model.kwargs.depth=2",
    "model.kwargs.num_heads=2", "data.global_crop_size=32", "data.local_crop_size=16",
    "data.num_local_views=2", "dino.out_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32",
)  # fmt: skip
TINY_REFERENCE = {
    "model": "vit_tiny_patch16_224", "head_dims": (64, 32, 256), "drop_path_rate": 0.0, **TINY
}  # fmt: skip


def test_reference_and_ssl_kd_steps_compute_the_same_dino_loss(tmp_path: Path) -> None:
    """Same weights and views → the lightly-example step and the trainer's step at keep 1.0
    compute the same DINO loss, so the benchmark times the same work written two ways."""
    dino_step = bench("dino_step")
    ours = dino_step.SslKdStep(1.0, 4, str(tmp_path / "run"), TINY_DINO)
    reference = dino_step.ReferenceStep(**TINY_REFERENCE)
    method = ours.trainer.method
    model = reference.model
    model.student_backbone.load_state_dict(method.student.backbone.vit.state_dict())
    model.teacher_backbone.load_state_dict(method.teacher.backbone.vit.state_dict())
    model.student_head.load_state_dict(method.student.head.state_dict())
    model.teacher_head.load_state_dict(method.teacher.head.state_dict())
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
    views += [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]

    ours(views)
    reference(views)

    assert ours.last_loss == pytest.approx(reference.last_loss, abs=1e-5)
    assert ours.teacher_macs == ours.teacher_macs_unmasked > 0
    assert ours.teacher_s > 0 and reference.teacher_s > 0


def test_variant_names_give_their_keep_ratio_and_compile_flag() -> None:
    parse = bench("dino_step").parse_variant
    assert parse("ssl_kd keep 0.66") == (0.66, False)
    assert parse("ssl_kd keep 0.5 compiled") == (0.5, True)


def test_peak_memory_is_the_fresh_process_own() -> None:
    """A worker started by a process that holds 2 GiB reports its own peak, not the parent's
    (ru_maxrss survives exec on Linux: every variant once showed the parent's 9.4 GB)."""
    held = torch.ones(2**29)  # 2 GiB, touched
    child = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'eval/bench'); "
         "import dino_step; print(dino_step.peak_rss_mib())"],
        check=True, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bench("dino_step").peak_rss_mib() > 2048
    assert 50 < float(child.stdout.strip().splitlines()[-1]) < 1536
    del held


def test_every_study_recipe_is_a_valid_config(tmp_path: Path) -> None:
    learning = bench("learning")
    for teacher, seed in ((learning.KD_TEACHER, 3), (learning.MAE_TEACHER, 0)):
        path = learning.run_dir(tmp_path, teacher, seed) / "checkpoint.pth"
        path.parent.mkdir(parents=True)
        path.touch()  # the config checks that it exists; nothing loads it here
    dirs = set()
    rows = [*learning.ROWS, learning.KD_TEACHER, learning.MAE_TEACHER]
    for row in rows:
        for mode in ("quick", "full"):
            overrides = learning.overrides_of(row, 3, mode, tmp_path)
            cfg = load_config(REPO / "configs" / row.config, overrides)
            assert cfg.train.seed == 3
            dirs.add(cfg.output_dir)
            if row.group in ("dino", "kd") and row.train:
                assert cfg.method == row.group and cfg.data.name == "cluttered_digits"
                assert cfg.masking.keep_ratio == (row.keep or 1.0)
                assert cfg.masking.adaptive == (row.keep is None and row.train)
                assert cfg.masking.strategy == (row.strategy or "attention_topk")
            if row.group == "kd":  # this seed's own teacher, trained at the student's size
                teacher = learning.run_dir(tmp_path, learning.KD_TEACHER, 3) / "checkpoint.pth"
                assert cfg.section("kd").teacher_checkpoint == str(teacher)
                assert cfg.model.img_size == 48
            if row.name.startswith("DMAE"):
                teacher = learning.run_dir(tmp_path, learning.MAE_TEACHER, 0) / "checkpoint.pth"
                assert cfg.section("dmae").teacher_checkpoint == str(teacher)
            if row.adaptive:  # the defaults: no per-run tuning
                assert cfg.masking.tolerance == learning_default_tolerance(cfg.method)
    assert len(dirs) == len(rows)  # one run dir per row, shared by both modes
    for group in ("dino", "kd"):  # keep 1.0, 3 strategies at 0.5 and at 0.25, adaptive
        keeps = [(r.keep, r.strategy) for r in learning.ROWS if r.group == group and r.train]
        assert len(keeps) == len(set(keeps)) == 8


def learning_default_tolerance(method: str) -> float:
    from ssl_kd.methods import registry

    return registry.method_class(method).default_tolerance


def test_study_table_is_mean_and_sample_std_over_seeds() -> None:
    learning = bench("learning")
    row = next(r for r in learning.ROWS if r.name == "DINO, keep 0.5, random")
    records = [
        {"row": row.name, "seed": s, "knn_top1": k, "linear_top1": 2 * k, "teacher_pflops": 1.0,
         "teacher_pflops_unmasked": 2.0, "wall_s": 10.0 + s, "steps": 5, "keep_mean": 0.5}
        for s, k in enumerate([50.0, 53.0, 59.0])
    ]  # fmt: skip
    line = learning.lines_of(records, [row])[row.name]
    assert line["knn_top1"] == (
        pytest.approx(statistics.mean([50, 53, 59])),
        pytest.approx(statistics.stdev([50, 53, 59])),
    )
    assert line["linear_top1"][1] == pytest.approx(2 * statistics.stdev([50, 53, 59]))
    assert line["seeds"] == [0, 1, 2]
    assert bench("report").mean_std([4.0]) == (4.0, 0.0)


def test_verdicts_say_apart_only_beyond_one_std_and_the_adaptive_target() -> None:
    learning = bench("learning")

    def line(mean: float, std: float, pflops: float = 1.0) -> dict:
        return {"top1": (mean, std), "teacher_pflops": (pflops, 0.0), "keep_mean": (0.5, 0.0),
                "keep_final": (0.4, 0.0)}  # fmt: skip

    lines = {
        "KD, keep 1.0": line(50.0, 2.0, 10.0),
        "KD, keep 0.25, attention_topk": line(50.0, 1.0),
        "KD, keep 0.25, random": line(47.5, 2.5),  # 2.5 below: not beyond the larger std 2.5
        "KD, keep 0.25, attention_bottomk": line(40.0, 3.0),
        "KD, adaptive from 1.0": line(48.5, 1.0, 6.0),  # within 2.0 of keep 1.0, at 0.60×
    }
    ordering, adaptive = learning.verdicts(lines, "KD", "top1")
    assert "does not hold" in ordering and "top-k > random: no" in ordering
    assert "random > bottom-k: yes" in ordering
    assert "0.60×" in adaptive and "(target ≤ 0.60: met)" in adaptive
    lines["KD, adaptive from 1.0"] = line(47.9, 1.0, 6.0)  # 2.1 below: not within one std
    assert "missed" in learning.verdicts(lines, "KD", "top1")[1]
    lines["KD, keep 0.25, random"] = line(46.9, 1.0)
    assert "holds beyond" in learning.verdicts(lines, "KD", "top1")[0]


@pytest.mark.slow
def test_quick_study_reports_costs_that_match_the_flop_counter(tmp_path: Path) -> None:
    """`learning.py --quick` end to end: the teacher's cost ratio of each masked DINO row is the
    counted cost of its kept tokens; the random-init row's k-NN is that of a fresh backbone."""
    results = tmp_path / "RESULTS.md"
    subprocess.run(
        [sys.executable, str(REPO / "eval/bench/learning.py"), "--quick",
         "--workdir", str(tmp_path / "work"), "--results", str(results)],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    records = json.loads((tmp_path / "learning.json").read_text())
    by_row = {r["row"]: r for r in records}
    text = results.read_text()
    assert "DINO, keep 0.25, attention_bottomk" in text and "KD, adaptive from 1.0" in text

    backbone = create_backbone(
        "vit_tiny_patch16_224", 32, patch_size=8, embed_dim=96, depth=4, num_heads=3
    )
    macs = {k: forward_macs(backbone, 32, num_kept(16, k)) for k in (1.0, 0.5, 0.25)}
    for name, keep in [("DINO, keep 0.5, attention_topk", 0.5),
                       ("DINO, keep 0.25, random", 0.25)]:  # fmt: skip
        row = by_row[name]
        head_share = row["teacher_pflops"] / row["teacher_pflops_unmasked"]
        backbone_ratio = macs[keep] / macs[1.0]
        # the DINO head's cost does not shrink with the keep ratio, so the whole teacher's
        # ratio lies a little above the backbone's
        assert backbone_ratio <= head_share < backbone_ratio + 0.1
    adaptive = by_row["KD, adaptive from 1.0"]
    assert adaptive["probe_share"] > 0 and 0.1 <= adaptive["keep_mean"] <= 1.0
    assert by_row["MAE alone"]["teacher_pflops"] == 0
    assert by_row["DMAE ← MAE teacher"]["teacher_pflops"] > 0

    torch.manual_seed(0)
    fresh = create_backbone(
        "vit_tiny_patch16_224", 32, patch_size=8, embed_dim=96, depth=4, num_heads=3
    )
    splits = eval_splits("cluttered_digits", 32, seed=0)
    knn = evaluate_knn(fresh, splits, ks=(20,), progress=False)
    assert by_row["DINO, random init"]["knn_top1"] == pytest.approx(knn[20]["top1"])


def test_gpu_section_rows_hold_together_on_a_tiny_model_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dino_step_gpu.py's whole section, on CPU with a tiny model: a table per batch, img/s is
    batch / step time, the reference is given keep 1.0's model FLOPs and keep 0.5 counts fewer
    (in proportion to the batch), MFU is the achieved rate over the peak given."""
    gpu = bench("dino_step_gpu")
    monkeypatch.setattr(gpu, "WARMUP_STEPS", 1)
    workload = gpu.Workload(TINY_DINO, TINY_REFERENCE, 32, 16, 2, "tiny ViT")
    result = gpu.gpu_section(
        (2, 4), 2, compile=False, peak_tflops=1e-3, device="cpu", amp=False, workload=workload
    )
    assert result["device"] == "cpu" and result["peak_bf16_tflops"] == 1e-3
    assert list(result["batches"]) == ["2", "4"]
    for batch, rows in result["batches"].items():
        assert list(rows) == ["reference", "ssl_kd keep 1.0", "ssl_kd keep 0.5"]
        for row in rows.values():
            assert row["oom"] is None and row["peak_memory_gib"] is None  # no CUDA: no memory
            assert row["images_per_s"] == pytest.approx(int(batch) / row["step_s"])
            assert row["achieved_tflops"] == pytest.approx(
                row["model_tflops_per_step"] / row["step_s"]
            )
            assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1e-3)
            assert row["first_step_s"] > 0 and row["speed_vs_reference"] > 0
        full, half = rows["ssl_kd keep 1.0"], rows["ssl_kd keep 0.5"]
        assert rows["reference"]["model_tflops_per_step"] == full["model_tflops_per_step"]
        assert 0 < half["model_tflops_per_step"] < full["model_tflops_per_step"]
        assert rows["reference"]["speed_vs_reference"] == 1.0
    by_batch = [result["batches"][b]["ssl_kd keep 0.5"]["model_tflops_per_step"] for b in "24"]
    assert by_batch[1] == pytest.approx(2 * by_batch[0])


def test_gpu_section_reports_oom_in_its_row_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant that runs out of memory (here: the reference at build, keep 0.5 in its first
    timed round) gets an OOM row saying where; the others are measured, with no reference to
    compare with."""
    gpu = bench("dino_step_gpu")
    monkeypatch.setattr(gpu, "WARMUP_STEPS", 1)
    build = gpu.build

    class FailsWhenTimed:  # its warm-up step passes, its first timed one runs out of memory
        def __init__(self, step) -> None:  # type: ignore[no-untyped-def]
            self.step, self.trainer, self.calls = step, step.trainer, 0

        def __call__(self, views: list[torch.Tensor]) -> None:
            self.calls += 1
            if self.calls > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            self.step(views)

    def failing_build(name: str, *args: object):  # type: ignore[no-untyped-def]
        if name == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        step = build(name, *args)
        return FailsWhenTimed(step) if name == "ssl_kd keep 0.5" else step

    monkeypatch.setattr(gpu, "build", failing_build)
    workload = gpu.Workload(TINY_DINO, TINY_REFERENCE, 32, 16, 2, "tiny ViT")
    result = gpu.gpu_section((2,), 2, compile=False, device="cpu", amp=False, workload=workload)
    rows = result["batches"]["2"]
    assert rows["reference"] == {"oom": "build"}
    assert rows["ssl_kd keep 0.5"] == {"oom": "round 1"}
    full = rows["ssl_kd keep 1.0"]
    assert full["oom"] is None and full["speed_vs_reference"] is None
    assert full["images_per_s"] == pytest.approx(2 / full["step_s"])
    assert full["mfu"] is None  # no peak known for "cpu"


def test_dmae_step_runs_any_student_and_teacher_and_times_each_step_alone() -> None:
    """dmae_step.py's measurement with tiny models (the naive teacher's decoder fits any
    teacher): img/s is batch / step time, and a step's teacher time lies within that step
    (the teacher's timer restarts every step)."""
    dmae_step = bench("dmae_step")
    models = dmae_step.Models(
        "vit_tiny_patch16_224", "vit_tiny_patch16_224",
        {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2},
        {"patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2},
        img_size=32, aligned_blocks=((1, 1),), decoder=(32, 1, 2),
    )  # fmt: skip
    rows = dmae_step.measure(2, 3, models)
    assert list(rows) == list(dmae_step.VARIANTS)
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"])
        assert 0 < row["teacher_s"] < row["step_s"]
        assert row["peak_memory_gib"] is None  # no CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU section)")
def test_gpu_section_reports_a_utilisation_below_the_peak(tmp_path: Path) -> None:
    """`dino_step.py --gpu` on the CUDA device, compiled variants included: model FLOPs shrink
    with the keep ratio and the achieved rate lies below the device's bf16 peak (an MFU above 1
    would be a counting bug); peak memory is measured."""
    out = tmp_path / "gpu.json"
    subprocess.run(
        [sys.executable, str(REPO / "eval/bench/dino_step.py"), "--gpu", "--batch", "8",
         "--rounds", "2", "--peak-tflops", "989", "--json", str(out)],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["batches"]["8"]
    assert result["device"] and list(rows) == [
        "reference", "ssl_kd keep 1.0", "ssl_kd keep 0.5", "ssl_kd keep 1.0 compiled",
        "ssl_kd keep 0.5 compiled",
    ]  # fmt: skip
    full, half = rows["ssl_kd keep 1.0"], rows["ssl_kd keep 0.5"]
    assert half["model_tflops_per_step"] < full["model_tflops_per_step"]
    assert rows["reference"]["model_tflops_per_step"] == full["model_tflops_per_step"]
    for row in rows.values():
        assert row["oom"] is None
        assert row["images_per_s"] == pytest.approx(8 / row["step_s"])
        assert 0 < row["mfu"] < 1 and row["peak_memory_gib"] > 0


def test_data_pipeline_bench_reads_photo_like_jpegs_into_the_same_views(tmp_path: Path) -> None:
    """eval/bench/data_pipeline.py: its folder holds distinct 500 × 375 (or 375 × 500) JPEGs
    in class folders, and the official and fast pipelines it times make the same views (2 ×
    224 + 8 × 96 for DINO, one 224 view for MAE) once the fast one's batched part has run."""
    from PIL import Image

    from ssl_kd.data.photometric import BatchedPhotometric

    data_pipeline = bench("data_pipeline")
    root = data_pipeline.make_folder(tmp_path / "data", 8)
    paths = sorted(root.glob("class_*/*.jpg"))
    assert len(paths) == 8 and len({path.parent for path in paths}) == 8
    pictures = [Image.open(path) for path in paths]
    assert {picture.format for picture in pictures} == {"JPEG"}
    assert {picture.size for picture in pictures} <= {(500, 375), (375, 500)}
    assert len({picture.tobytes() for picture in pictures}) == 8
    datasets = data_pipeline.pipelines(root)
    for task, shapes in [("DINO", [(224, 224)] * 2 + [(96, 96)] * 8), ("MAE", [(224, 224)])]:
        official, _ = next(iter(data_pipeline.loader(datasets[(task, "official")], 2, 0)))
        fast, _ = next(iter(data_pipeline.loader(datasets[(task, "ssl_kd fast")], 2, 0)))
        assert fast[0][0].dtype == torch.uint8  # the workers' part stops before the colours
        coloured = BatchedPhotometric()(*fast)
        for views in (official, coloured):
            assert [tuple(view.shape[-2:]) for view in views] == shapes
            assert all(view.dtype == torch.float32 and view.shape[:2] == (2, 3) for view in views)
