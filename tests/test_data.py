from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_kd.data import (
    DIGITS_IMAGES,
    BatchedMultiCrop,
    EpochPermutation,
    MultiCropSpec,
    Views,
    check_batch,
    digits,
    digits_train_size,
    image_dataset,
)
from ssl_kd.data.photometric import NO_COLOR, dino_colors
from ssl_kd.engine.trainer import Trainer
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.seeding import generator_for
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
    crop = BatchedMultiCrop(spec, [NO_COLOR] * 2, mean=(0, 0, 0), std=(1, 1, 1), aspect=(1, 1))
    view = crop(images, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(view, images, atol=1e-5)


def test_epoch_permutation_resumes_at_a_batch():
    full = EpochPermutation(100, 8, seed=0, epoch=3).indices
    resumed = EpochPermutation(100, 8, seed=0, epoch=3, start_batch=5).indices
    assert resumed == full[40:96]  # drop_last: 12 batches of 8
    ranks = [EpochPermutation(100, 8, 0, 3, rank=r, num_replicas=2).indices for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_repeated_augmentation_spreads_each_images_copies_over_the_ranks():
    """DeiT's RASampler: the epoch's permutation with each index repeated 3 times in a row,
    every rank taking every other index, as many per rank as without repeats."""
    permutation = torch.randperm(100, generator=generator_for(0, "order", 4))
    repeated = permutation.repeat_interleave(3)
    ranks = [
        EpochPermutation(100, 5, 0, 4, rank=r, num_replicas=2, repeats=3).indices for r in (0, 1)
    ]
    assert ranks == [repeated[r::2][:50].tolist() for r in (0, 1)]
    counts = torch.bincount(torch.tensor(ranks[0] + ranks[1]), minlength=100)
    assert set(counts.tolist()) <= {0, 1, 2, 3} and (counts == 3).sum() >= 32
    # the copies of one image sit at neighbouring positions of the two ranks' orders
    assert ranks[0][:3] == [int(permutation[0]), int(permutation[0]), int(permutation[1])]
    assert ranks[1][:3] == [int(permutation[0]), int(permutation[1]), int(permutation[1])]


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


def write_pngs(folder, count, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{prefix}_{i:02d}.png")


def test_images_at_the_top_make_a_flat_folder_whatever_its_sub_folders(tmp_path):
    # ImageFolder would read backup/ as the one class and train on its 10 images only.
    write_pngs(tmp_path / "data", 40)
    write_pngs(tmp_path / "data" / "backup", 10)
    write_pngs(tmp_path / "data" / "backup" / "older", 2)
    dataset = image_dataset(tmp_path / "data")
    assert len(dataset) == 52
    assert dataset.description == "flat folder, 52 images (40 at the top, 12 in sub-folders)"
    assert len(image_dataset(f"{tmp_path / 'data'}/")) == 52  # a trailing / changes nothing


def test_hidden_files_and_folders_are_never_data(tmp_path):
    flat = tmp_path / "flat"
    write_pngs(flat, 3)
    (flat / ".ipynb_checkpoints").mkdir()  # empty: made the folder an "empty ImageFolder"
    write_pngs(flat / ".cache", 2)
    write_pngs(flat / "more" / ".thumbs", 2)
    (flat / "._img_00.png").write_bytes(b"macOS resource fork")  # unreadable if read
    dataset = image_dataset(flat)
    assert [Path(p).name for p in dataset.paths] == ["img_00.png", "img_01.png", "img_02.png"]
    assert dataset.description == "flat folder, 3 images (3 at the top, 0 in sub-folders)"

    write_digit_folder(tmp_path / "classes")
    (tmp_path / "classes" / ".ipynb_checkpoints").mkdir()
    write_pngs(tmp_path / "classes" / ".trash", 2)
    write_pngs(tmp_path / "classes" / "class_0" / ".thumbs", 2)
    (tmp_path / "classes" / "class_1" / ".0.png").write_bytes(b"")
    labelled = image_dataset(tmp_path / "classes")
    assert labelled.classes == ["class_0", "class_1", "class_2"]
    assert len(labelled) == 12 and labelled.description == "ImageFolder, 3 classes, 12 images"
    assert not any("/." in path for path, _ in labelled.samples)


def test_the_training_log_names_the_layout_with_its_counts(tmp_path, capfd):
    write_pngs(tmp_path / "data", 12)
    write_pngs(tmp_path / "data" / "backup", 4)
    cfg = tiny_config(
        tmp_path / "run",
        **{"data.name": "imagefolder", "data.path": str(tmp_path / "data"),
           "data.transform": "lightly", "data.num_workers": 2, "train.batch_size": 4},
    )  # fmt: skip
    stream = train_stream(cfg)
    list(stream.epoch(0))  # DataLoader workers get the dataset: they print nothing
    train_stream(cfg, rank=1, world_size=2)  # nor does another rank
    out = capfd.readouterr().out
    line = (
        f"data.path {tmp_path / 'data'}: flat folder, 16 images (12 at the top, 4 in sub-folders)"
    )
    assert out.count("data.path") == 1 and line in out, out


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


def write_photos(folder: Path, count: int) -> None:
    """`count` 64 × 48 JPEGs of smooth random colours."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        coarse = torch.rand(1, 3, 6, 8, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear")
        array = (image[0].permute(1, 2, 0) * 255).byte().numpy()
        Image.fromarray(array).save(folder / f"photo_{index:02d}.jpg", quality=90)


def fast_folder_config(tmp_path: Path, workers: int, **extra: object):  # type: ignore[no-untyped-def]
    return tiny_config(
        tmp_path / f"run_{workers}",
        **{"data.name": "imagefolder", "data.path": str(tmp_path / "data"),
           "data.transform": "fast", "data.num_workers": workers, "train.batch_size": 4, **extra},
    )  # fmt: skip


def test_fast_stream_colours_an_image_folders_crops_by_sample_seed(tmp_path):
    """data.transform=fast: workers crop (uint8), the stream colours and normalises; a sample's
    views depend on (seed, epoch, index) only: the same with 0 or 1 worker processes, and from
    a resumed batch. An unreadable file is skipped as with the lightly transform."""
    write_photos(tmp_path / "data", 13)
    (tmp_path / "data" / "photo_99.jpg").write_bytes(b"not a jpeg")
    in_process = train_stream(fast_folder_config(tmp_path, 0))
    epoch = list(in_process.epoch(1))
    assert len(epoch) == 3
    assert [tuple(v.shape) for v in epoch[0]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 for v in epoch[0])
    assert in_process.bad_files == {str(tmp_path / "data" / "photo_99.jpg")}
    in_worker = list(train_stream(fast_folder_config(tmp_path, 1)).epoch(1))
    resumed = list(in_process.epoch(1, start_batch=2))
    for a, b in zip(epoch[0] + epoch[2], in_worker[0] + resumed[0], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(epoch[0][0], epoch[0][1])  # two different global views
    trainer = Trainer(fast_folder_config(tmp_path, 0))
    assert trainer.train_step(epoch[0])["loss"] > 0


def test_fast_stream_single_crop_and_its_limits(tmp_path):
    write_photos(tmp_path / "data", 8)
    views = next(train_stream(fast_folder_config(tmp_path, 0), Views.SINGLE_CROP).epoch(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)]
    with pytest.raises(ConfigError, match=r"data\.transform=fast makes DINO's and MAE's views"):
        train_stream(fast_folder_config(tmp_path, 0), Views.LABELLED)
    bundled = train_stream(tiny_config(tmp_path / "bundled", **{"data.transform": "fast"}))
    assert bundled.crop.colors == dino_colors(2)  # DINO's colours on the in-memory crops


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
