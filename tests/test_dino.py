import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kd.config import MaskingConfig
from ssl_kd.flops import forward_macs
from ssl_kd.masking import select
from ssl_kd.methods.base import StepState, clip_gradients_per_parameter
from ssl_kd.methods.dino import DINO, DinoConfig
from tests.helpers import tiny_backbone

SMALL_HEAD = {"out_dim": 50, "hidden_dim": 32, "bottleneck_dim": 16}


def dino_loss_reference(teacher, student, center, teacher_temp, student_temp):
    """The paper's formula, written out: H(P_t(x), P_s(x')) over pairs of different views."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        p_t = F.softmax((t - center) / teacher_temp, dim=-1)
        for j, s in enumerate(student):
            if i == j:
                continue  # same view: no loss term
            total = total + (-(p_t * F.log_softmax(s / student_temp, dim=-1)).sum(-1)).mean()
            pairs += 1
    return total / pairs


def make_dino(keep_ratio=1.0, strategy="attention_topk", **dino_overrides):
    cfg = DinoConfig(**{**SMALL_HEAD, **dino_overrides})
    return DINO(tiny_backbone(), cfg, MaskingConfig(keep_ratio, strategy), 32, epochs=2)


def views(batch=4, locals_=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(locals_)
    ]


def test_loss_equals_the_paper_formula():
    dino = make_dino()
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(6, 50, generator=generator) for _ in range(2)]
    student = [torch.randn(6, 50, generator=generator) for _ in range(4)]
    dino.loss_fn.center.copy_(torch.randn(1, 1, 50, generator=generator))
    center = dino.loss_fn.center.reshape(1, -1).clone()
    expected = dino_loss_reference(teacher, student, center, 0.04, 0.1)
    actual = dino.loss_fn(teacher, student, teacher_temp=0.04)
    assert torch.allclose(actual, expected, atol=1e-5)
    # the center moved towards the batch mean of the teacher outputs with momentum 0.9
    batch_mean = torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(
        dino.loss_fn.center.reshape(1, -1), 0.9 * center + 0.1 * batch_mean, atol=1e-6
    )


def test_method_loss_matches_formula_on_its_own_outputs():
    dino = make_dino(teacher_temp=0.07).eval()
    batch = views()
    state = StepState(0, 0)
    center = dino.loss_fn.center.reshape(1, -1).clone()
    with torch.no_grad():
        student, _, _ = dino.student(torch.cat(batch[:2]), torch.cat(batch[2:]))
        teacher, _, _ = dino.teacher(torch.cat(batch[:2]))
        out = dino(batch, state)
    expected = dino_loss_reference(teacher.chunk(2), student.chunk(4), center, 0.07, 0.1)
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_teacher_starts_as_exact_copy_and_is_frozen():
    dino = make_dino()
    for (name, s), (_, t) in zip(
        dino.student.named_parameters(), dino.teacher.named_parameters(), strict=True
    ):
        assert torch.equal(s, t), name
        assert s.data_ptr() != t.data_ptr()  # a copy, not a shared module
        assert not t.requires_grad
    assert not dino.teacher.training
    dino.train()
    assert not dino.teacher.training


def test_ema_update_formula():
    dino = make_dino(momentum_teacher=0.9)
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in dino.teacher.parameters()]
    dino.update_teacher(StepState(0, 0))
    for t0, s, t in zip(before, dino.student.parameters(), dino.teacher.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_unmasked_teacher_equals_plain_timm_forward():
    dino = make_dino(keep_ratio=1.0)
    x = torch.randn(3, 3, 32, 32)
    logits, _, _ = dino.teacher(x)
    vit = dino.teacher.backbone.vit
    reference = dino.teacher.head(vit.forward_head(vit.forward_features(x), pre_logits=True))
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("strategy", ["attention_topk", "attention_bottomk", "random", "block"])
def test_teacher_sees_the_selected_patches_of_the_same_view(strategy):
    dino = make_dino(keep_ratio=0.5, strategy=strategy).eval()
    batch = views()
    seen = []
    original = dino.teacher.backbone.forward
    dino.teacher.backbone.forward = lambda x, keep_idx=None, **kw: (
        seen.append(keep_idx),
        original(x, keep_idx, **kw),
    )[1]
    state = StepState(0, 0, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = dino(batch, state)
    # On CPU one forward per global view (DINO.forward says why); the cost count runs later.
    assert [tuple(idx.shape) for idx in seen[:2]] == [(4, 32), (4, 32)]
    keep_idx = torch.cat(seen[:2])
    assert keep_idx.shape == (8, 32)  # 2 global views × batch 4, half of 64 patches
    assert out.metrics["teacher_tokens_kept"] == 33
    if strategy.startswith("attention"):
        attention = dino.student.backbone(torch.cat(batch[:2]), cls_attention=True).cls_attention
        expected = select(attention.mean(1), 32, strategy)
        assert torch.equal(keep_idx, expected)
    assert out.teacher_macs < 0.6 * out.teacher_macs_unmasked


def test_one_view_per_forward_gives_the_batched_forward():
    """`images_per_forward` (the CPU teacher's one view at a time) changes no result: logits,
    [CLS] features and [CLS] attention of masked global views, with local views."""
    network = make_dino().student.eval()
    batch = views()
    global_views, local_views = torch.cat(batch[:2]), torch.cat(batch[2:])
    keep_idx = torch.stack([torch.randperm(64)[:20].sort().values for _ in range(8)])
    with torch.no_grad():
        together = network(global_views, local_views, keep_idx, cls_attention=True)
        per_view = network(global_views, local_views, keep_idx, True, images_per_forward=4)
    for a, b in zip(together, per_view, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_collapse_signals():
    dino = make_dino()
    uniform = dino._teacher_stats(torch.zeros(8, 50), 0.04)
    assert uniform["teacher_entropy"] == pytest.approx(math.log(50), rel=1e-5)
    one_hot = torch.full((8, 50), -100.0)
    one_hot[:, 3] = 100.0
    collapsed = dino._teacher_stats(one_hot, 0.04)
    assert collapsed["teacher_batch_entropy"] == pytest.approx(0.0, abs=1e-4)


def test_teacher_entropy_uses_the_center_of_the_steps_loss():
    """The loss updates the center after using it; the logged entropy is that of the teacher
    distribution the loss used, i.e. with the center before its update."""
    dino = make_dino().eval()
    batch = views()
    dino.loss_fn.center.copy_(
        3.0 * torch.randn(1, 1, 50, generator=torch.Generator().manual_seed(5))
    )
    before = dino.loss_fn.center.reshape(1, -1).clone()
    out = dino(batch, StepState(0, 0))
    after = dino.loss_fn.center.reshape(1, -1)
    teacher_logits = dino.teacher(torch.cat(batch[:2]))[0]

    def entropy(center):
        probs = ((teacher_logits - center) / 0.04).softmax(-1)
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())

    assert not torch.allclose(before, after)  # the step moved the center
    assert out.metrics["teacher_entropy"] == pytest.approx(entropy(before), rel=1e-5)
    assert out.metrics["teacher_entropy"] != pytest.approx(entropy(after), rel=1e-3)


def test_per_parameter_clipping_as_official_dino():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    total = clip_gradients_per_parameter([a, b], clip=1.0)
    assert total == pytest.approx(math.sqrt(25 + 0.25))
    assert torch.allclose(a.grad.norm(), torch.tensor(1.0), atol=1e-5)  # clipped alone
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4]))  # under the clip: unchanged


def test_last_layer_gradients_dropped_in_first_epoch():
    dino = make_dino()
    out = dino(views(), StepState(0, 0))
    out.loss.backward()
    dino.before_optimizer_step(StepState(0, 0))
    assert all(p.grad is None for p in dino.student.head.last_layer.parameters())
    assert dino.student.backbone.vit.cls_token.grad is not None


def test_batch_norm_head_of_the_teacher_normalises_with_batch_statistics():
    """As official DINO (teacher never in eval mode): the EMA copies parameters, not running
    statistics, so an eval-mode BatchNorm would stay at its initial (0, 1) for ever."""
    dino = make_dino(keep_ratio=0.5, batch_norm=True).train()
    dino(views(batch=8), StepState(0, 0))
    norms = [m for m in dino.teacher.head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(m.training for m in norms)  # still so after the cost was measured
    assert not dino.teacher.backbone.training  # the backbone stays in eval mode (no drop path)
    features = dino.teacher.backbone(views(batch=8)[0]).cls
    hidden = dino.teacher.head.layers[1](dino.teacher.head.layers[0](features))
    assert torch.allclose(hidden.mean(0), dino.teacher.head.layers[1].bias, atol=1e-5)


def test_koleo_term_is_dinov2s_regulariser_on_the_global_student_features():
    dino = make_dino(koleo_weight=0.1).train()
    batch = views(batch=6)
    state = StepState(0, 0)
    with torch.random.fork_rng():
        out = dino(batch, state)
    features = dino.student.backbone(torch.cat(batch[:2])).cls.detach()
    expected = 0.0
    for crop in F.normalize(features, dim=-1).chunk(2):  # -log(distance to nearest neighbour)
        distances = torch.cdist(crop, crop) + torch.eye(len(crop)) * 1e9
        expected += -torch.log(distances.min(dim=1).values + 1e-8).mean()
    assert float(out.metrics["koleo_loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_the_adaptive_probe_measures_kl_between_full_and_masked_targets_and_its_cost():
    """masking.adaptive: on a probe step the full teacher also sees the probe's images (the
    first of each global view); the gap is KL(full ‖ masked) of the centred, sharpened teacher
    distributions, and the full forwards are counted in the teacher's cost."""
    masking = MaskingConfig(0.5, "attention_topk", adaptive=True, probe_every_steps=2,
                            probe_fraction=0.5, tolerance=DINO.default_tolerance)  # fmt: skip
    dino = DINO(tiny_backbone(), DinoConfig(**SMALL_HEAD), masking, 32, epochs=2).eval()
    dino.loss_fn.center.copy_(
        0.05 * torch.randn(1, 1, 50, generator=torch.Generator().manual_seed(3))
    )
    center = dino.loss_fn.center.reshape(1, -1).clone()
    for keep in (32, 64):  # the cost is measured by a forward of its own, done beforehand
        dino.teacher_macs_per_view(keep)
    seen = []
    original = dino.teacher.backbone.forward
    dino.teacher.backbone.forward = lambda x, keep_idx=None, **kw: (
        seen.append((x.shape[0], keep_idx)),
        original(x, keep_idx, **kw),
    )[1]
    batch = views()
    out = dino(batch, StepState(0, 0, torch.Generator().manual_seed(5)))
    # On CPU the masked teacher runs one global view per forward (DINO.forward says why).
    (first_rows, first_idx), (second_rows, second_idx), (probe_rows, probe_idx) = seen
    keep_idx = torch.cat([first_idx, second_idx])
    assert (first_rows, second_rows, keep_idx.shape) == (4, 4, (8, 32))
    assert (probe_rows, probe_idx) == (4, None)

    rows = [0, 1, 4, 5]  # images 0 and 1 of the batch of 4, in both global views
    global_views = torch.cat(batch[:2])
    with torch.no_grad():
        masked = dino.teacher(global_views, keep_idx=keep_idx)[0][rows]
        full = dino.teacher(global_views[rows])[0]
    p_full = F.softmax((full - center) / 0.04, dim=-1)
    log_p_masked = F.log_softmax((masked - center) / 0.04, dim=-1)
    expected = (p_full * (p_full.clamp_min(1e-30).log() - log_p_masked)).sum(-1).mean()
    assert out.keep_ratio_gap == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert out.keep_ratio_gap > 1e-3  # half the patches do change the targets
    full_macs = forward_macs(dino.teacher, 32)
    assert out.probe_macs == 4 * full_macs
    assert out.teacher_macs == 8 * forward_macs(dino.teacher, 32, 32) + 4 * full_macs
    assert out.teacher_macs_unmasked == 8 * full_macs  # what a run that never masks pays

    seen.clear()
    later = dino(batch, StepState(1, 0, torch.Generator().manual_seed(5)))  # not a probe step
    assert len(seen) == 2 and later.keep_ratio_gap is None and later.probe_macs == 0
    assert later.teacher_macs == 8 * forward_macs(dino.teacher, 32, 32)
