import pytest
import torch
from PIL import Image

from ssl_kd.data import (
    DIGITS_IMAGES,
    BatchedMultiCrop,
    DataError,
    EpochPermutation,
    MultiCropSpec,
    Views,
    check_batch,
    digits,
    digits_train_size,
    image_dataset,
    load_image,
)
from ssl_kd.engine.trainer import Trainer
from ssl_kd.errors import ConfigError, RunFailed, UserError
from tests.helpers import tiny_config, train_stream, write_digit_folder

SPEC = MultiCropSpec(32, 16, 3, (0.4, 1.0), (0.05, 0.4))


def test_digits_split_is_fixed_by_seed_and_stratified():
    a = digits(0)
    b = digits(0)
    c = digits(1)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    train_images, train_labels, _, test_labels = a
    assert (
        train_images.shape[1:] == (3, 32, 32)
        and train_images.min() >= 0
        and train_images.max() <= 1
    )
    assert len(train_labels) + len(test_labels) == DIGITS_IMAGES
    assert len(train_labels) == digits_train_size(0.2)
    assert len(digits(0, 0.33)[1]) == digits_train_size(0.33)  # the test part is rounded up
    share = torch.bincount(test_labels, minlength=10).float() / len(test_labels)
    assert (share - 0.1).abs().max() < 0.02  # every class in proportion


def test_batched_multicrop_shapes_and_determinism():
    images = digits(0)[0][:8]
    crop = BatchedMultiCrop(SPEC)
    views = crop(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    again = crop(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))
    assert not torch.equal(views[0], views[1])  # two different global crops


def test_full_crop_without_jitter_is_identity():
    images = digits(0)[0][:4]
    spec = MultiCropSpec(32, 16, 0, (1.0, 1.0), (1.0, 1.0), hflip_prob=0.0)
    crop = BatchedMultiCrop(spec, mean=(0, 0, 0), std=(1, 1, 1), jitter_prob=0.0, aspect=(1, 1))
    view = crop(images, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(view, images, atol=1e-5)


def test_epoch_permutation_resumes_at_a_batch():
    full = EpochPermutation(100, 8, seed=0, epoch=3).indices
    resumed = EpochPermutation(100, 8, seed=0, epoch=3, start_batch=5).indices
    assert resumed == full[40:96]  # drop_last: 12 batches of 8
    ranks = [EpochPermutation(100, 8, 0, 3, rank=r, num_replicas=2).indices for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_image_folder_and_flat_folder(tmp_path):
    write_digit_folder(tmp_path / "classes")
    labelled = image_dataset(tmp_path / "classes")
    assert len(labelled) == 12 and sorted(set(labelled.targets)) == [0, 1, 2]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(flat / f"{i}.jpg")
    assert len(image_dataset(flat)) == 3
    with pytest.raises(UserError, match="is not a folder"):
        image_dataset(tmp_path / "missing")


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"^cannot read image .*broken.jpg: ") as err:
        load_image(str(bad))
    assert err.value.path == str(bad)
    assert isinstance(err.value, RunFailed) and err.value.exit_code == 1


def test_lightly_multicrop_stream_trains_on_an_image_folder(tmp_path):
    write_digit_folder(tmp_path / "data")
    cfg = tiny_config(
        tmp_path / "run",
        **{"data.name": "imagefolder", "data.path": str(tmp_path / "data"),
           "data.transform": "lightly", "data.num_workers": 0, "train.batch_size": 4},
    )  # fmt: skip
    stream = train_stream(cfg)
    views = next(stream.epoch(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    trainer = Trainer(cfg)
    first = trainer.train_step(views)
    assert first["loss"] > 0 and first["teacher_tokens_kept"] == 33


def test_single_crop_streams_give_one_global_view(tmp_path):
    batched = tiny_config(tmp_path / "batched", **{"train.batch_size": 4})
    views = next(train_stream(batched, Views.SINGLE_CROP).epoch(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)]
    write_digit_folder(tmp_path / "data")
    folder = tiny_config(
        tmp_path / "lightly",
        **{"data.name": "imagefolder", "data.path": str(tmp_path / "data"),
           "data.transform": "lightly", "data.num_workers": 0, "train.batch_size": 4},
    )  # fmt: skip
    views = next(train_stream(folder, Views.SINGLE_CROP).epoch(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)]


def test_batched_stream_draws_crops_by_epoch_and_batch_only(tmp_path):
    stream = train_stream(tiny_config(tmp_path, **{"train.batch_size": 64}))
    full = list(stream.epoch(1))
    resumed = list(stream.epoch(1, start_batch=3))
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3], resumed[0], strict=True))
    assert not torch.equal(full[0][0], next(stream.epoch(0))[0])


def test_check_batch_names_the_share_per_process(tmp_path):
    cfg = tiny_config(tmp_path)
    share = digits_train_size(0.2) // 2  # 1437 training digits over 2 processes
    check_batch(cfg.data, share, world_size=2)
    message = (
        f"train.batch_size={share + 1} (per process) is larger than the data's share per "
        f"process ({share} digits images with WORLD_SIZE=2): lower train.batch_size or use "
        "fewer processes"
    )
    with pytest.raises(ConfigError) as err:
        check_batch(cfg.data, share + 1, world_size=2)
    assert str(err.value) == message
    folder = tiny_config(tmp_path, **{"data.name": "imagefolder", "data.path": str(tmp_path)})
    check_batch(folder.data, 10**6, world_size=2)  # a folder's size is checked once scanned


def test_batched_crops_on_an_image_folder_are_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.name": "imagefolder", "data.path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"data\.transform=batched works on in-memory data"):
        train_stream(cfg)
