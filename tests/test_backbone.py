import pytest
import torch
import torch._inductor.config

from ssl_kd.masking import gather_patches
from ssl_kd.models.backbone import create_backbone
from ssl_kd.models.weights import load_backbone_weights
from tests.helpers import TINY_VIT, tiny_backbone


@pytest.fixture
def backbone():
    return tiny_backbone().eval()


def test_unmasked_forward_equals_timm(backbone):
    x = torch.randn(3, 3, 32, 32)
    out = backbone(x)
    vit = backbone.vit
    reference = vit.forward_head(vit.forward_features(x), pre_logits=True)
    assert torch.equal(out.cls, reference)
    kept_all = backbone(x, torch.arange(64).expand(3, -1))
    assert torch.allclose(kept_all.cls, reference, atol=1e-6)


def test_masked_forward_adds_position_embedding_before_gather(backbone):
    x = torch.randn(2, 3, 32, 32)
    keep_idx = torch.tensor([[0, 3, 10, 63], [1, 2, 40, 50]])
    out = backbone(x, keep_idx)
    # reference: embed with timm's own pieces, gather by hand, run the blocks
    vit = backbone.vit
    tokens = vit._pos_embed(vit.patch_embed(x))
    kept = torch.stack(
        [torch.cat([t[:1], t[1:][k]]) for t, k in zip(tokens, keep_idx, strict=True)]
    )
    reference = vit.norm(vit.blocks(kept))
    assert out.tokens.shape == (2, 5, 64)
    assert torch.allclose(out.tokens, reference, atol=1e-6)


def test_cls_attention_equals_explicit_attention(backbone):
    x = torch.randn(2, 3, 32, 32)
    out = backbone(x, cls_attention=True)
    # explicit attention matrix of the last block, from timm's unfused path
    last = backbone.vit.blocks[-1].attn
    captured = []
    handle = last.attn_drop.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    last.fused_attn = False
    try:
        backbone(x)
    finally:
        last.fused_attn = True
        handle.remove()
    explicit = captured[0][:, :, 0, 1:]  # [B, H, N]: [CLS] query row, patch keys
    assert out.cls_attention.shape == (2, 2, 64)
    assert torch.allclose(out.cls_attention, explicit, atol=1e-5)


def test_cls_attention_on_masked_tokens(backbone):
    x = torch.randn(2, 3, 32, 32)
    keep_idx = torch.arange(0, 64, 2).expand(2, -1)
    out = backbone(x, keep_idx, cls_attention=True)
    assert out.cls_attention.shape == (2, 2, 32)
    assert (out.cls_attention.sum(-1) < 1).all()  # [CLS]'s attention to itself is excluded


def test_fused_attention_stays_on(backbone):
    backbone(torch.randn(1, 3, 32, 32), cls_attention=True)
    assert all(block.attn.fused_attn for block in backbone.vit.blocks)


def test_local_crops_of_another_size(backbone):
    out = backbone(torch.randn(2, 3, 16, 16))
    assert out.tokens.shape == (2, 1 + 16, 64)


def test_truncated_forward_and_block_outputs(backbone):
    x = torch.randn(2, 3, 32, 32)
    out = backbone(x, stop_after_block=0, return_blocks=[0])
    vit = backbone.vit
    reference = vit.blocks[0](vit._pos_embed(vit.patch_embed(x)))
    assert out.cls is None
    assert torch.allclose(out.block_outputs[0], reference, atol=1e-6)
    with pytest.raises(ValueError, match="stop_after_block"):
        backbone(x, stop_after_block=5)


def test_gather_patches_keeps_prefix():
    tokens = torch.arange(2 * 5 * 1.0).reshape(1, 5, 2)
    out = gather_patches(tokens, torch.tensor([[3]]), num_prefix_tokens=1)
    assert out.tolist() == [[[0.0, 1.0], [8.0, 9.0]]]


def test_load_weights_round_trip_and_mismatch(tmp_path):
    source = tiny_backbone()
    path = tmp_path / "weights.pth"
    torch.save({"model": source.vit.state_dict()}, path)
    target = tiny_backbone()
    torch.nn.init.zeros_(target.vit.cls_token)
    load_backbone_weights(target, path)
    assert torch.equal(target.vit.cls_token, source.vit.cls_token)
    state = source.vit.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.weight"]
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"missing keys \['norm.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        load_backbone_weights(target, path)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_backbone_weights(target, tmp_path / "junk.pth")


def test_register_tokens_stay_with_every_kept_patch_and_out_of_the_cls_attention():
    """DINOv2 with registers (timm's `no_embed_class`): [CLS] and 4 registers come first and get
    no position embedding; the patches get theirs before the gather; the [CLS] attention row
    covers the kept patches only (softmax over all keys, registers included)."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch14_reg4_dinov2", 32, **TINY_VIT).eval()
    with torch.no_grad():  # the tokens and layer scales start near 0: make every part count
        for parameter in backbone.parameters():
            parameter.normal_(0.0, 0.2)
    vit = backbone.vit
    x = torch.randn(2, 3, 32, 32)
    keep_idx = torch.tensor([[0, 3, 10, 63], [1, 2, 40, 50]])
    out = backbone(x, keep_idx, cls_attention=True)
    # reference built by hand from the parameters, not from timm's _pos_embed
    patches = vit.patch_embed(x).flatten(1, 2) + vit.pos_embed  # [B, 64, D]
    prefix = torch.cat([vit.cls_token, vit.reg_token], dim=1).expand(2, -1, -1)  # [B, 5, D]
    kept = torch.cat([prefix, patches[torch.arange(2)[:, None], keep_idx]], dim=1)
    last = vit.blocks[-1].attn
    captured = []
    handle = last.attn_drop.register_forward_hook(lambda _m, inp, _o: captured.append(inp[0]))
    last.fused_attn = False
    try:
        reference = vit.norm(vit.blocks(kept))
    finally:
        last.fused_attn = True
        handle.remove()
    assert backbone.num_prefix_tokens == 5 and out.tokens.shape == (2, 5 + 4, 64)
    assert torch.allclose(out.tokens, reference, atol=1e-5)
    assert out.cls_attention.shape == (2, 2, 4)
    assert torch.allclose(out.cls_attention, captured[0][:, :, 0, 5:], atol=1e-5)
    everything = backbone(x)  # all patches: timm's own forward
    assert torch.equal(everything.cls, vit.forward_head(vit.forward_features(x), pre_logits=True))


@pytest.mark.slow  # compiling takes ~30-60 s on one core
@torch._inductor.config.patch(fallback_random=True)  # drop path from eager's generator
def test_compiled_blocks_give_the_eager_forward_in_one_graph_for_every_keep_ratio():
    """Every kept-token count an adaptive keep ratio reaches (1.0 down to 0.2), two batch
    sizes, drop path on: the tokens eager gives, from one graph (train mode), and one more for
    eval mode."""
    from torch._dynamo.utils import counters

    eager = tiny_backbone(drop_path_rate=0.1).train()
    compiled = tiny_backbone(drop_path_rate=0.1).train()
    compiled.compiled = True
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for keep in range(64, 12, -3):  # 64 patches
        for batch in (4, 2):
            keep_idx = torch.randperm(64, generator=torch.Generator().manual_seed(keep))[:keep]
            keep_idx = keep_idx.sort().values.expand(batch, -1)
            torch.manual_seed(keep)
            expected = eager(x[:batch], keep_idx).tokens
            torch.manual_seed(keep)
            got = compiled(x[:batch], keep_idx).tokens
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():
        got = compiled.eval()(x, cls_attention=True)
        expected = eager.eval()(x, cls_attention=True)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.cls_attention, expected.cls_attention, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2
    assert list(compiled.state_dict()) == list(eager.state_dict())
