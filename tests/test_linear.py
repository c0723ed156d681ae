import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from ssl_kd.cli import main
from ssl_kd.data.splits import eval_splits
from ssl_kd.engine.trainer import train
from ssl_kd.evaluation.features import FeatureSpec, backbone_features
from ssl_kd.evaluation.lars import LARS
from ssl_kd.evaluation.linear import linear_probe, probe_warnings
from ssl_kd.evaluation.linear_head import LinearProbeConfig, linear_head, train_head
from tests.helpers import tiny_backbone, tiny_config


def separable(centres, n, generator):
    """Class c lies around its own centre, far from the others: linearly separable."""
    labels = torch.randint(0, len(centres), (n,), generator=generator)
    return centres[labels] + 0.3 * torch.randn(n, centres.shape[1], generator=generator), labels


@pytest.mark.parametrize("protocol", ["dino", "mae"])
def test_probe_on_linearly_separable_features_reaches_100(protocol):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=generator) * 4
    train_x, train_y = separable(centres, 512, generator)
    val_x, val_y = separable(centres, 256, generator)
    # The recipes' base lrs (1e-3; LARS 0.1 with a 1e-3 trust ratio) are tuned for 100 epochs at
    # batch 1024-16384; here the point is that a separable problem gets solved in 15 short epochs.
    cfg = LinearProbeConfig(
        protocol, epochs=15, batch_size=64, lr=1.0 if protocol == "dino" else 100.0
    )

    def batches(epoch):
        order = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        for index in order.split(64):
            yield train_x[index], train_y[index]

    history, _head = train_head(cfg, 32, 5, batches, 8, lambda: (val_x, val_y))
    assert history[0]["epoch"] == 1 and len(history) == 15
    assert history[-1]["top1"] == 100.0
    assert history[-1]["top5"] == 100.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_mae_head_is_batchnorm_without_affine_then_linear():
    head = linear_head("mae", 16, 3)
    norm, linear = head[0], head[1]
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert isinstance(linear, nn.Linear) and torch.equal(linear.bias, torch.zeros(3))
    assert isinstance(linear_head("dino", 16, 3), nn.Linear)


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3))
    bias = nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad, bias.grad
    optimizer = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9)
    optimizer.step()
    update = gw + 0.1 * w0
    trust = 0.001 * w0.norm() / update.norm()
    assert torch.allclose(weight, w0 - 0.5 * trust * update)
    assert torch.allclose(bias, b0 - 0.5 * gb)  # 1-d: no weight decay, no trust ratio
    optimizer.step()  # momentum: buffer = 0.9 · previous + new update
    update2 = gw + 0.1 * (w0 - 0.5 * trust * update)
    trust2 = 0.001 * (w0 - 0.5 * trust * update).norm() / update2.norm()
    expected = w0 - 0.5 * trust * update - 0.5 * (0.9 * trust * update + trust2 * update2)
    assert torch.allclose(weight, expected, atol=1e-6)


def test_dino_features_concatenate_normed_cls_of_last_blocks_and_avgpool():
    backbone = tiny_backbone().eval()
    images = torch.randn(3, 3, 32, 32)
    out = backbone(images, return_blocks=[0, 1])
    features = backbone_features(backbone, images, FeatureSpec(2, avgpool=True))
    norm = backbone.vit.norm
    expected = torch.cat(
        [norm(out.block_outputs[0])[:, 0], out.tokens[:, 0], out.tokens[:, 1:].mean(1)], dim=1
    )
    assert features.shape == (3, 3 * 64)
    assert torch.allclose(features, expected, atol=1e-5)


@pytest.fixture(scope="module")
def small_digits():
    splits = eval_splits("digits", 32, seed=0)
    keep_train, keep_val = torch.arange(0, 1437, 4), torch.arange(0, 360, 2)
    splits.train = torch.utils.data.Subset(splits.train, keep_train.tolist())
    splits.val = torch.utils.data.Subset(splits.val, keep_val.tolist())
    splits.train_labels = splits.train_labels[keep_train]
    splits.val_labels = splits.val_labels[keep_val]
    return splits


@pytest.mark.parametrize("protocol", ["dino", "mae"])
def test_cached_and_uncached_probes_agree(small_digits, protocol):
    lr = 0.5 if protocol == "dino" else 100.0
    cfg = LinearProbeConfig(protocol, epochs=3, batch_size=64, lr=lr, warmup_epochs=1)
    results = {}
    for cache in (True, False):
        cfg.cache = cache
        result, head = linear_probe(tiny_backbone(), small_digits, cfg, progress=False)
        results[cache] = (result, head)
    (cached, cached_head), (uncached, uncached_head) = results[True], results[False]
    assert cached["cached_features"] and not uncached["cached_features"]
    assert [e["top1"] for e in cached["per_epoch"]] == [e["top1"] for e in uncached["per_epoch"]]
    for a, b in zip(
        cached_head.state_dict().values(), uncached_head.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5)
    assert [e["train_loss"] for e in cached["per_epoch"]] == pytest.approx(
        [e["train_loss"] for e in uncached["per_epoch"]], rel=1e-5
    )


def test_augmentation_turns_the_cache_off(small_digits):
    small_digits.augmented = True
    try:
        cfg = LinearProbeConfig(epochs=1, batch_size=128)
        result, _ = linear_probe(tiny_backbone(), small_digits, cfg, progress=False)
    finally:
        small_digits.augmented = False
    assert result["augmentation"] and not result["cached_features"]


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(run, **{"train.max_steps": 1}))
    return run / "checkpoint.pth"


def test_cli_writes_linear_eval_json_and_per_epoch_tensorboard(run_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "linear", str(run_checkpoint), "--epochs", "2", "--batch-size", "512",
            "--protocol", "mae", "--output-dir", str(out), "--report", "best"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "linear_mae" / "linear_eval.json").read_text())
    assert result["protocol"] == "mae" and "LARS" in result["protocol_details"]
    assert result["cached_features"] and result["feature_dim"] == 64
    best = max(result["per_epoch"], key=lambda e: e["top1"])
    assert (result["reported_epoch"], result["top1"]) == (best["epoch"], best["top1"])
    assert "best val top-1" in result["epoch_choice"]
    assert "ssl_kd dino run checkpoint (teacher)" in result["load"]
    events = EventAccumulator(str(out / "linear_mae" / "tb"))
    events.Reload()
    top1 = events.Scalars("linear/val_top1")
    assert [e.step for e in top1] == [1, 2]
    assert [e.value for e in top1] == pytest.approx([e["top1"] for e in result["per_epoch"]])
    assert "linear/val_top5" in events.Tags()["scalars"]
    assert "at epoch" in capsys.readouterr().out


# Measured with the defaults on `run_checkpoint` (1 DINO step, 2 blocks of width 64): before the
# lr sweep the recipes' lrs (1e-3 / LARS 0.1, tuned for ~125k / ~7k ImageNet steps, here 600
# steps) reached 25.3 (dino) and 25.0 (mae) top-1; swept: 46.1 (dino, base lr 0.5) and 75.6
# (mae, base lr 100). Chance (the most frequent of 10 classes) is 10.3.
@pytest.mark.parametrize(("protocol", "at_least", "blocks", "warmup"),
                         [("dino", 38.0, 2, 0), ("mae", 60.0, 1, 10)])  # fmt: skip
def test_defaults_learn_on_small_data_and_the_json_says_what_was_used(
    run_checkpoint, tmp_path, capsys, protocol, at_least, blocks, warmup
):
    # One thread: the probe's ops are tiny, and on a busy 2-core machine two threads mostly wait
    # for each other (5 s vs 30 s measured for the mae probe).
    torch.set_num_threads(1)
    out = tmp_path / "eval"
    argv = ["eval", "linear", str(run_checkpoint), "--protocol", protocol, "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / f"linear_{protocol}" / "linear_eval.json").read_text())
    assert result["top1"] >= at_least
    sweep, used = result["lr_sweep"], result["config"]
    assert len(sweep["base_lrs"]) == 16 and sweep["holdout_size"] == 144  # 10% of 1437
    assert sweep["fit_size"] == 1437 - 144
    assert used["lr"] == sweep["chosen_base_lr"]
    assert (used["epochs"], used["batch_size"], result["steps"]) == (100, 256, 600)
    # what the features are made of: 2 blocks for dino (its 4 capped at the depth), 1 for mae
    assert (used["n_last_blocks"], used["avgpool"], used["warmup_epochs"]) == (
        blocks,
        False,
        warmup,
    )
    assert f"[CLS] of the last {blocks} block(s)" in result["protocol_details"]
    assert f"base {used['lr']:g} x batch / 256" in result["protocol_details"]
    assert result["feature_dim"] == 64 * blocks
    assert "held-out 10% of the train split" in result["lr_choice"]
    printed = capsys.readouterr()
    assert f"base lr {used['lr']:g}): top-1 {result['top1']:.2f}" in printed.out
    assert all(f"warning: {text}" in printed.err for text in result["warnings"])


def test_the_swept_probe_is_the_probe_at_the_chosen_lr(small_digits):
    swept, _ = linear_probe(
        tiny_backbone(), small_digits, LinearProbeConfig(epochs=3, batch_size=64), progress=False
    )
    chosen = swept["config"]["lr"]
    assert swept["lr_sweep"]["chosen_base_lr"] == chosen
    given, _ = linear_probe(
        tiny_backbone(), small_digits, LinearProbeConfig(epochs=3, batch_size=64, lr=chosen),
        progress=False,
    )  # fmt: skip
    assert given["per_epoch"] == swept["per_epoch"] and given["lr_sweep"] is None
    assert given["lr_choice"] == "given (--lr)"
    # 3 epochs of 6 batches with a given lr: under the 1000 steps the recipes' lrs assume
    assert any(
        text.startswith("only 18 steps (3 epochs of 6 batches") for text in given["warnings"]
    )


def test_chance_level_is_warned_about(tmp_path, capsys):
    """A backbone whose features are all equal (zero weights) cannot beat always answering one
    class; the warning says so, next to a result that otherwise looks like any other."""
    weights = tmp_path / "zero.pth"
    torch.save(
        {k: torch.zeros_like(v) for k, v in tiny_backbone().vit.state_dict().items()}, weights
    )
    out = tmp_path / "eval"
    argv = ["eval", "linear", str(weights), "--model", "vit_tiny_patch16_224", "--model-kwargs",
            "{patch_size: 4, embed_dim: 64, depth: 2, num_heads: 2}", "--data", "digits",
            "--epochs", "2", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "linear_dino" / "linear_eval.json").read_text())
    assert result["top1"] <= 10.3 + 1e-6  # 37 of 360 val images: the most frequent class
    err = capsys.readouterr().err
    assert "is at chance level (10.28: always answering the most frequent of the 10" in err
    assert any("chance level" in text for text in result["warnings"])


def test_probe_warnings_compare_with_the_most_frequent_class():
    labels = torch.tensor([0] * 60 + [1] * 20 + [2] * 20)  # chance: 60%, 2 SE = 9.8 points
    base = {"steps": 5000, "config": {"epochs": 100, "batch_size": 256}}
    assert any("chance level" in w for w in probe_warnings({**base, "top1": 69.0}, labels, None))
    assert probe_warnings({**base, "top1": 70.0}, labels, None) == []
    few = probe_warnings({**base, "top1": 90.0, "steps": 600}, labels, None)
    assert len(few) == 1 and few[0].startswith("only 600 steps (100 epochs of 6 batches of 256)")
    sweep = {"chosen_base_lr": 1.0, "base_lrs": [0.5, 1.0]}
    edge = probe_warnings({**base, "top1": 90.0, "steps": 600}, labels, sweep)
    assert len(edge) == 1 and "the best lr of the sweep is its largest (1," in edge[0]
