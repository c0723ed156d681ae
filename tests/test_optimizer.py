import copy

import pytest
import torch
from torch import nn

from ssl_kd.config.sections import OptimConfig
from ssl_kd.engine.checkpoint import load_optimizer_state
from ssl_kd.engine.optimizer import build_optimizer, implementation_flags


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def optimizer_for(net: nn.Module, implementation: str, name: str = "adamw"):  # type: ignore[no-untyped-def]
    """A decayed and an undecayed group, as the trainer's methods make them."""
    groups = [
        {"params": [p for p in net.parameters() if p.ndim > 1]},
        {"params": [p for p in net.parameters() if p.ndim <= 1], "apply_wd": False},
    ]
    return build_optimizer(
        groups, OptimConfig(name=name, implementation=implementation), torch.device("cpu")
    )


def update(net: nn.Module, optimizer, step: int) -> None:  # type: ignore[no-untyped-def]
    """One step as the trainer runs it: lr and weight decay set from the step, then the update."""
    for group in optimizer.param_groups:
        group["lr"] = 1e-2 * (step + 1)
        group["weight_decay"] = 0.05 if group.get("apply_wd", True) else 0.0
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
    optimizer.zero_grad(set_to_none=True)
    net(inputs).pow(2).mean().backward()
    optimizer.step()


def trained(implementation: str, name: str = "adamw", steps: int = 4):  # type: ignore[no-untyped-def]
    net = small_net()
    optimizer = optimizer_for(net, implementation, name)
    for step in range(steps):
        update(net, optimizer, step)
    return net, optimizer


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("implementation", ["foreach", "fused", "auto"])
def test_every_implementation_makes_the_loops_update(name, implementation):
    reference, _ = trained("loop", name)
    other, optimizer = trained(implementation, name)
    for a, b, start in zip(
        reference.parameters(), other.parameters(), small_net().parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, start)  # every tensor moved: the comparison means something
    expected_fused = implementation in ("fused", "auto")  # auto: torch has a CPU fused kernel
    assert all(group["fused"] is expected_fused for group in optimizer.param_groups)


def test_auto_is_fused_where_torch_has_the_kernel_and_fused_elsewhere_is_refused():
    assert implementation_flags("auto", torch.device("cpu")) == {"fused": True}
    assert implementation_flags("auto", torch.device("meta")) == {}
    assert implementation_flags("loop", torch.device("meta")) == {"foreach": False, "fused": False}
    with pytest.raises(ValueError, match="no fused kernel on meta"):
        implementation_flags("fused", torch.device("meta"))


def test_a_resume_keeps_its_own_implementation_and_continues_the_same(tmp_path):
    """A checkpoint the loop wrote loads into a fused optimizer: the flags stay fused, the
    moments load, and the next update is the loop's up to rounding."""
    loop_net, loop = trained("loop", steps=2)
    fused_net = copy.deepcopy(loop_net)
    fused = optimizer_for(fused_net, "fused")
    load_optimizer_state(fused, copy.deepcopy(loop.state_dict()), tmp_path / "checkpoint.pth")
    assert all(group["fused"] and not group["foreach"] for group in fused.param_groups)
    before = copy.deepcopy(loop_net)
    update(loop_net, loop, 2)
    update(fused_net, fused, 2)
    for a, b, start in zip(
        loop_net.parameters(), fused_net.parameters(), before.parameters(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, start)
