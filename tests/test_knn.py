import torch
import torch.nn.functional as F

from ssl_kd.evaluation.knn import knn_classify


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
    predictions = []
    for feature in test:
        similarity = [
            (float(feature @ t), int(label)) for t, label in zip(train, train_labels, strict=True)
        ]
        similarity.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for sim, label in similarity[:k]:
            votes[label] += torch.exp(torch.tensor(sim / temperature)).item()
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(predictions)


def test_knn_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(200, 16, generator=generator), dim=1)
    test = F.normalize(torch.randn(50, 16, generator=generator), dim=1)
    train_labels = torch.randint(0, 7, (200,), generator=generator)
    test_labels = torch.randint(0, 7, (50,), generator=generator)
    results = knn_classify(train, train_labels, test, test_labels, ks=(10, 20, 100), chunk_size=17)
    for k in (10, 20, 100):
        predicted = brute_force_knn(train, train_labels, test, k, 0.07, 7)
        expected = 100.0 * (predicted == test_labels).float().mean().item()
        assert abs(results[k]["top1"] - expected) < 1e-4
        assert results[k]["top5"] >= results[k]["top1"]


def test_knn_on_separable_clusters_is_perfect():
    centers = F.normalize(torch.eye(4), dim=1)
    labels = torch.arange(4).repeat(10)
    features = F.normalize(centers[labels] + 0.01 * torch.randn(40, 4), dim=1)
    assert knn_classify(features, labels, features, labels, ks=(5,))[5]["top1"] == 100.0
