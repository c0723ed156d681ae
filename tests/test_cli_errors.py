"""Every bad config or argument stops a real `ssl-kd` process before any work: one line on
stderr, exit status 2, no traceback; `--debug` shows the traceback."""

import pytest
import torch

from tests.helpers import run_cli, run_python, tiny_overrides

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
}


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
