import pytest

from ssl_kd.cli import main
from ssl_kd.config import ConfigError, to_yaml
from ssl_kd.run_config import load_config
from tests.helpers import run_cli


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  name: digits\ntrain:\n  epochs: 7\nmasking:\n  keep_ratio: 0.66\n")
    cfg = load_config(path, ["train.batch_size=12", "masking.strategy=random"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (7, 12)
    assert (cfg.masking.keep_ratio, cfg.masking.strategy) == (0.66, "random")
    assert cfg.optim.lr == 5e-4  # untouched default
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg  # the saved resolved config round-trips


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key 'train.epoch'.*Did you mean 'train.epochs'"),
        ("trian.epochs=3", "unknown config key 'trian.epochs'.*Valid keys in <top level>"),
        ("train.epochs=ten", "train.epochs"),
        ("masking.keep_ratio=0", r"masking.keep_ratio=0.0 is impossible.*\(0, 1\]"),
        ("masking.keep_ratio=1.5", "masking.keep_ratio=1.5 is impossible"),
        (
            "masking.strategy=topk",
            "choose one of: attention_topk, random, attention_bottomk, block",
        ),
        ("data.name=imagenet", "data.name='imagenet' is not valid"),
        ("train.batch_size=0", "train.batch_size=0 must be > 0"),
        ("data.max_bad_fraction=1.5", r"data.max_bad_fraction=1.5 must lie in \[0, 1\]"),
        ("data.max_bad_fraction=-0.1", r"data.max_bad_fraction=-0.1 must lie in \[0, 1\]"),
        ("masking.tolerance=-0.1", r"masking.tolerance=-0.1 must be >= 0"),
        ("masking.adaptive_min=0", r"masking.adaptive_min=0.0 is impossible"),
        ("masking.adaptive_step=0", r"masking.adaptive_step=0.0 must be > 0"),
        ("masking.hysteresis=1", r"masking.hysteresis=1.0 must lie in \[0, 1\)"),
        ("masking.probe_every_steps=0", r"masking.probe_every_steps=0 must be > 0"),
        ("masking.probe_fraction=0", r"masking.probe_fraction=0.0 must lie in \(0, 1\]: the share"),
        ("epochs", "must look like key=value"),
    ],
)
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.name=digits", override])


def test_imagefolder_needs_a_path():
    with pytest.raises(ConfigError, match=r"data.path is not set"):
        load_config(None, [])


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("dino:\n  out_dimm: 3\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown config key 'dino.out_dimm'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("data: {name: digits}\n")
    code = main(["train", str(path), "masking.keep_ratio=2", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "masking.keep_ratio=2.0 is impossible" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before any work


def test_console_script_exit_code(tmp_path):
    result = run_cli("train", "nope.yaml", timeout=None)
    assert result.returncode == 2
    assert "config file nope.yaml does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_pos_embed_interpolation_defaults_to_the_methods_and_reaches_the_backbones(tmp_path):
    from ssl_kd.engine.build import build_method
    from tests.helpers import tiny_config

    dino = build_method(tiny_config(tmp_path))
    assert dino.student.backbone.pos_embed_interpolation == "dino"
    assert dino.teacher.backbone.pos_embed_interpolation == "dino"
    mae = load_config(None, ["data.name=digits", "method=mae", "masking.keep_ratio=0.25"])
    assert mae.model.pos_embed_interpolation == "timm"
    chosen = tiny_config(tmp_path, **{"model.pos_embed_interpolation": "timm"})
    assert build_method(chosen).student.backbone.pos_embed_interpolation == "timm"
    with pytest.raises(ConfigError, match=r"model\.pos_embed_interpolation='bicubic' is not valid"):
        load_config(None, ["data.name=digits", "model.pos_embed_interpolation=bicubic"])
