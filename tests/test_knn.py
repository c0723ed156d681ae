import pytest
import torch
import torch.nn.functional as F

from ssl_kd.data.splits import eval_splits
from ssl_kd.evaluation.knn import DINO_KS, evaluate_knn, extract_features, knn_classify
from tests.helpers import tiny_backbone


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
    """Top-5 class ranking of each test sample, one sample and one neighbour at a time."""
    rankings = []
    for feature in test:
        similarity = [
            (float(feature @ t), int(label)) for t, label in zip(train, train_labels, strict=True)
        ]
        similarity.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for sim, label in similarity[:k]:
            votes[label] += torch.exp(torch.tensor(sim / temperature)).item()
        rankings.append(sorted(range(num_classes), key=lambda c: -votes[c])[:5])
    return torch.tensor(rankings)


@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_knn_equals_brute_force_for_every_dino_k(temperature):
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(300, 16, generator=generator), dim=1)
    test = F.normalize(torch.randn(40, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 9, (300,), generator=generator)
    test_labels = torch.randint(0, 9, (40,), generator=generator)
    results = knn_classify(
        train, train_labels, test, test_labels, DINO_KS, temperature, chunk_size=17
    )
    assert sorted(results) == [10, 20, 100, 200]
    tops = []
    for k in DINO_KS:
        ranking = brute_force_knn(train, train_labels, test, k, temperature, 9)
        top1 = 100.0 * (ranking[:, 0] == test_labels).float().mean().item()
        top5 = 100.0 * (ranking == test_labels[:, None]).any(dim=1).float().mean().item()
        assert results[k]["top1"] == pytest.approx(top1, abs=1e-4), k
        assert results[k]["top5"] == pytest.approx(top5, abs=1e-4), k
        tops.append(top1)
    if temperature == 1.0:  # flat weights: the ks really differ on this data
        assert len(set(tops)) > 1


def test_knn_on_separable_clusters_is_perfect():
    centers = F.normalize(torch.eye(4), dim=1)
    labels = torch.arange(4).repeat(10)
    features = F.normalize(centers[labels] + 0.01 * torch.randn(40, 4), dim=1)
    assert knn_classify(features, labels, features, labels, ks=(5,))[5]["top1"] == 100.0


def test_extracted_features_are_the_normalised_cls_in_order():
    backbone = tiny_backbone().eval()
    images = torch.randn(10, 3, 32, 32)
    features = extract_features(backbone, images.split(3))
    expected = F.normalize(backbone(images).cls, dim=-1)
    assert torch.allclose(features, expected, atol=1e-5)
    assert torch.allclose(features.norm(dim=1), torch.ones(10))


def test_evaluate_knn_on_digits_matches_manual_pipeline():
    backbone = tiny_backbone().eval()
    splits = eval_splits("digits", 32, seed=0)
    scores = evaluate_knn(backbone, splits, ks=(20,), batch_size=500, progress=False)
    train = extract_features(backbone, [torch.stack([splits.train[i][0] for i in range(1437)])])
    val = extract_features(backbone, [torch.stack([splits.val[i][0] for i in range(360)])])
    manual = knn_classify(train, splits.train_labels, val, splits.val_labels, ks=(20,))
    assert scores[20]["top1"] == pytest.approx(manual[20]["top1"])
    assert 10.0 < scores[20]["top1"] <= 100.0  # above chance (10 classes) even untrained


def test_cli_on_an_imagefolder_with_train_and_val(tmp_path, capsys):
    import json

    from PIL import Image

    from ssl_kd.cli import main
    from tests.helpers import TINY_VIT

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, colour in enumerate(([200, 30, 30], [30, 30, 200])):
            folder = tmp_path / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                noise = torch.randint(0, 40, (40, 48, 3), generator=generator)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"{index}.png")
    weights = tmp_path / "timm_state.pth"
    torch.save(tiny_backbone().vit.state_dict(), weights)
    common = ["--model", "vit_tiny_patch16_224", "--model-kwargs", str(TINY_VIT),
              "--data", str(tmp_path / "data"), "--img-size", "32", "--num-workers", "0",
              "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(["eval", "knn", str(weights), "--ks", "1", "3", *common]) == 0
    printed = capsys.readouterr().out
    assert "ImageFolder" in printed and "12 train / 6 val images at 32 px" in printed
    scores = json.loads((tmp_path / "out" / "knn_eval.json").read_text())["scores"]
    assert scores["1"]["top1"] == 100.0  # two flat colours: the nearest neighbour is right
    argv = ["eval", "linear", str(weights), "--epochs", "1", "--augment", *common]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "linear_dino" / "linear_eval.json").read_text())
    assert result["augmentation"] and not result["cached_features"]
    assert main(["eval", "knn", str(weights), *common[:4], "--data", str(tmp_path)]) == 2
    assert (
        "expected 'digits', 'cluttered_digits' or a folder with train/ and val/"
        in capsys.readouterr().err
    )
