"""Every bad config or argument stops a real `ssl-kd` process before any work: one line on
stderr, exit status 2, no traceback; `--debug` shows the traceback. The many config cases run
in-process (`ssl_kd.cli.main`, the same code), a few of them also as real processes."""

import os
import signal
import time

import pytest
import torch

from ssl_kd.cli import main
from tests.helpers import run_cli, run_python, start_cli, tiny_overrides

CASES = {
    "unknown key": (["train.epochz=3"], {}, "Did you mean 'train.epochs'?"),
    "wrong type": (["train.epochs=ten"], {}, "bad value for 'train.epochs'"),
    "keep ratio 0": (["masking.keep_ratio=0"], {}, "must lie in (0, 1]"),
    "keep ratio > 1": (["masking.keep_ratio=1.5"], {}, "must lie in (0, 1]"),
    "global crop": (["data.global_crop_size=30"], {}, "not divisible by the patch size 4"),
    "local crop": (["data.local_crop_size=18"], {}, "data.local_crop_size=18 is not divisible"),
    "local > global": (
        ["data.local_crop_size=48"],
        {},
        "data.local_crop_size=48 is larger than data.global_crop_size=32",
    ),
    "batch vs world size": (
        [],
        {"WORLD_SIZE": "64"},
        "larger than the data's share per process (22 digits images with WORLD_SIZE=64)",
    ),
    "bad WORLD_SIZE": ([], {"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be a positive integer"),
    "missing teacher": (
        ["method=dmae", "masking.keep_ratio=0.25", "dmae.teacher_checkpoint=/no/teacher.pth"],
        {},
        "dmae.teacher_checkpoint=/no/teacher.pth does not exist",
    ),
    "missing init checkpoint": (
        ["model.checkpoint=/no/init.pth"],
        {},
        "model.checkpoint=/no/init.pth does not exist",
    ),
    "bad policy": (["train.on_nonfinite=ignore"], {}, "choose one of: stop, skip"),
    "not key=value": (["train.epochs"], {}, "must look like key=value"),
    "not a ViT": (["model.name=resnet50"], {}, "'resnet50' is a timm ResNet, not a Vision"),
    "width vs heads": (["model.kwargs.embed_dim=95"], {}, "dim should be divisible by num_heads"),
    "eval batch 0": (["eval.batch_size=0"], {}, "eval.batch_size=0 must be > 0"),
}
if not torch.cuda.is_available():
    CASES["cuda without CUDA"] = (["train.device=cuda"], {}, "CUDA is not available here")


def ssl_kd(*args, env=None):
    return run_cli(*args, env=env, timeout=120)


@pytest.mark.parametrize("case", CASES)
def test_bad_config_is_one_line_exit_2_before_any_work(tmp_path, case):
    overrides, env, expected = CASES[case]
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    result = ssl_kd("train", str(config), *tiny_overrides(tmp_path / "out"), *overrides, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ssl-kd: error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was built or written


# Checked in-process (fast): each a one-line ConfigError, exit 2, before anything is written.
CONFIG_CASES = {
    "resnet": (["model.name=resnet50"], "'resnet50' is a timm ResNet, not a VisionTransformer"),
    "swin": (["model.name=swin_tiny_patch4_window7_224"], "is a timm SwinTransformer, not a"),
    "unknown model": (["model.name=vit_nope"], "Unknown model (vit_nope)"),
    "timm kwarg": (["model.kwargs.bogus=1"], "unexpected keyword argument 'bogus'"),
    "width vs heads": (["model.kwargs.embed_dim=95"], "dim should be divisible by num_heads"),
    "img below patch": (["model.img_size=2"], "model.img_size=2 is smaller than the patch size 4"),
    "drop path": (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 must lie in [0, 1)"),
    "crop scale length": (["data.global_crop_scale=[0.5]"], "data.global_crop_scale=[0.5] must"),
    "hflip": (["data.hflip_prob=5"], "data.hflip_prob=5.0 must lie in [0, 1]"),
    "workers": (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    "warmup": (["optim.warmup_epochs=-5"], "optim.warmup_epochs=-5 must be >= 0"),
    "min lr": (["optim.min_lr=0.01"], "optim.min_lr=0.01 is larger than optim.lr=0.0005"),
    "weight decay": (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
    "three betas": (["optim.betas=[0.9,0.99,0.9]"], "must be two values in [0, 1)"),
    "beta 1": (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0] must be two values"),
    "eval batch": (["eval.batch_size=0"], "eval.batch_size=0 must be > 0"),
    "knn k": (["eval.knn_k=0"], "eval.knn_k=0 must be > 0"),
    "dino hidden": (["dino.hidden_dim=0"], "dino.hidden_dim=0 must be > 0"),
    "student temp": (["dino.student_temp=0"], "dino.student_temp=0.0 must be > 0"),
    "teacher momentum": (["dino.momentum_teacher=2"], "dino.momentum_teacher=2.0 must lie in"),
    "clip": (["dino.clip_grad=-1"], "dino.clip_grad=-1.0 must be >= 0"),
    "mae decoder": (
        ["method=mae", "masking.keep_ratio=0.25", "dmae.decoder_dim=30", "dmae.decoder_heads=4"],
        "dmae.decoder_dim=30 is not divisible by dmae.decoder_heads=4",
    ),
    "dmae teacher not a ViT": (["dmae.teacher_name=resnet50"], "dmae.teacher_name / dmae"),
    "dmae teacher grid": (
        ["dmae.teacher_kwargs={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}"],
        "teacher patch grid (4, 4) differs from the student's (8, 8)",
    ),
    "dmae block": (["dmae.aligned_blocks=[[1, 5]]"], "pair [1, 5] is out of range"),
}
DMAE = ["method=dmae", "masking.keep_ratio=0.25", "dmae.aligned_blocks=[[1, 1]]",
        "dmae.teacher_name=vit_tiny_patch16_224",
        "dmae.teacher_kwargs={patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2}"]  # fmt: skip


def assert_one_line_error(err, expected):
    assert err.startswith("ssl-kd: error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_value_is_one_line_exit_2_before_any_work(tmp_path, capsys, case):
    overrides, expected = CONFIG_CASES[case]
    if any(text.startswith("dmae.") for text in overrides) and "method=mae" not in overrides:
        (tmp_path / "teacher.pth").write_bytes(b"")  # only its existence is checked first
        overrides = [*DMAE, f"dmae.teacher_checkpoint={tmp_path / 'teacher.pth'}", *overrides]
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    assert main(["train", str(config), *tiny_overrides(tmp_path / "out"), *overrides]) == 2
    assert_one_line_error(capsys.readouterr().err, expected)
    assert not (tmp_path / "out").exists()


COMMAND_CASES = {
    "flops resnet": (["flops", "resnet50"], "'resnet50' is a timm ResNet, not a"),
    "flops swin": (["flops", "swin_tiny_patch4_window7_224"], "is a timm SwinTransformer"),
    "flops img size": (
        ["flops", "vit_tiny_patch16_224", "--img-size", "7"],
        "--img-size 7 is not a multiple of the patch size 16",
    ),
    "flops keep": (["flops", "vit_tiny_patch16_224", "--keep-ratio", "0"], "--keep-ratio"),
    "flops block": (
        ["flops", "vit_tiny_patch16_224", "--stop-after-block", "12"],
        "--stop-after-block 12: vit_tiny_patch16_224 has blocks 0..11",
    ),
    "linear epochs": (["eval", "linear", "ckpt.pth", "--epochs", "0"], "--epochs 0 must be > 0"),
    "linear lr": (["eval", "linear", "ckpt.pth", "--lr", "-1"], "--lr -1.0 must be > 0"),
    "knn k": (["eval", "knn", "ckpt.pth", "--ks", "10", "0"], "--ks 0 must be > 0"),
    "knn batch": (["eval", "knn", "ckpt.pth", "--batch-size", "0"], "--batch-size 0 must be"),
    "knn bad fraction": (
        ["eval", "knn", "ckpt.pth", "--max-bad-fraction", "1.5"],
        "--max-bad-fraction 1.5 must be <= 1",
    ),
    "linear mae blocks": (
        ["eval", "linear", "ckpt.pth", "--protocol", "mae", "--n-last-blocks", "4"],
        "--n-last-blocks and --avgpool are for --protocol dino: MAE's probe reads the [CLS] of "
        "the last block",
    ),
    "attention size": (
        ["eval", "attention", "--model", "vit_tiny_patch16_224", "x.png", "--img-size", "0"],
        "--img-size 0 must be > 0",
    ),
}


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_bad_command_option_is_one_line_exit_2(tmp_path, capsys, case, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ckpt.pth does not exist: the option is checked first
    args, expected = COMMAND_CASES[case]
    assert main(args) == 2
    assert_one_line_error(capsys.readouterr().err, expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["under a file", "is a file"])
def test_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, layout):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file\n")
    out = blocker / "run" if layout == "under a file" else blocker
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    assert main(["train", str(config), *tiny_overrides(out)]) == 2
    expected = f"lies under the file {blocker}" if layout == "under a file" else "is a file, not"
    assert_one_line_error(capsys.readouterr().err, expected)
    assert blocker.read_text() == "a file\n"


def test_ctrl_c_to_the_process_group_is_one_line_exit_130(tmp_path):
    """SIGINT to the whole group, DataLoader workers included (what Ctrl-C in a shell does)."""
    from tests.helpers import write_digit_folder

    write_digit_folder(tmp_path / "data", per_class=8)
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    run = tmp_path / "run"
    extra = {"data.name": "imagefolder", "data.path": str(tmp_path / "data"),
             "data.transform": "lightly", "data.num_workers": 2, "train.batch_size": 4,
             "train.max_steps": 10_000, "train.log_every_steps": 1,
             "train.checkpoint_every_steps": 2}  # fmt: skip
    process = start_cli("train", str(config), *tiny_overrides(run, **extra),
                        env={"OMP_NUM_THREADS": "2"}, new_session=True)  # fmt: skip
    metrics, deadline = run / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"ssl-kd: interrupted; {run / 'checkpoint.pth'} (step ")
    assert "is kept, and the same command resumes from it" in err


def test_ctrl_c_elsewhere_is_one_line_exit_130(monkeypatch, capsys):
    import ssl_kd.flops

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ssl_kd.flops, "cost_report", interrupted)
    assert main(["flops", "vit_tiny_patch16_224"]) == 130
    assert capsys.readouterr().err == "ssl-kd: interrupted\n"


def test_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    args = ["train", str(config), *tiny_overrides(tmp_path / "out"), "train.epochz=3"]
    result = ssl_kd(*args, "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert "Did you mean 'train.epochs'?" in result.stderr


def test_bad_arguments_exit_2(tmp_path):
    result = ssl_kd("train", "x.yaml", "--strict", "maybe")
    assert result.returncode == 2 and "use true or false" in result.stderr
    result = ssl_kd("train", "x.yaml", "--resume", "--overwrite")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_config_errors_come_before_torch_is_imported(tmp_path):
    code = (
        "import sys\nfrom ssl_kd.cli import main\n"
        f"code = main(['train', {str(tmp_path / 'none.yaml')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch imported before the config was checked'\n"
        "sys.exit(code)\n"
    )
    result = run_python(code, timeout=None)
    assert result.returncode == 2, result.stderr
    assert torch  # the test process itself may import torch


def test_yaml_file_errors_are_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dino:\n  out_dimm: 3\n")
    result = ssl_kd("train", str(config))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown config key 'dino.out_dimm'" in result.stderr
    assert "Did you mean 'dino.out_dim'?" in result.stderr


def test_a_user_error_is_one_line_and_any_other_error_is_a_bug_with_its_traceback(
    monkeypatch, capsys
):
    """Only `UserError` means "bad input, exit 2": a ValueError from inside ssl_kd is a bug."""
    import ssl_kd.flops
    from ssl_kd.cli import main
    from ssl_kd.errors import UserError

    def bad_input(*args, **kwargs):
        raise UserError("--img-size 7 is smaller than a patch; use 16 or more")

    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(ssl_kd.flops, "cost_report", bad_input)
    assert main(["flops", "vit_tiny_patch16_224"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr(ssl_kd.flops, "cost_report", bug)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["flops", "vit_tiny_patch16_224"])


def test_help_names_every_registered_method():
    from ssl_kd.methods import method_names

    result = run_cli("train", "--help", timeout=120)
    assert result.returncode == 0
    assert all(name in result.stdout for name in method_names())
    assert "<methods>" not in result.stdout
    top = run_cli("--help", timeout=120).stdout
    assert "train with any method (" + ", ".join(method_names()) + ")" in " ".join(top.split())
