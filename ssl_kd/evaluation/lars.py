"""LARS (You et al., "Large Batch Training of Convolutional Networks", arXiv:1708.03888), with the
conventions of MAE's linear probe (arXiv:2111.06377 §A.2): parameters with one dimension
(biases, norms) get neither weight decay nor the layer-wise trust ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is rescaled to
    `trust_coefficient · ‖w‖ / ‖g + wd·w‖` of the gradient (1 if either norm is 0).

    update = g (+ wd·w and the trust ratio if w.ndim > 1); buffer = momentum · buffer + update;
    w -= lr · buffer.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    weight_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * weight_norm / update_norm
                    ones = torch.ones_like(ratio)
                    ratio = torch.where((weight_norm > 0) & (update_norm > 0), ratio, ones)
                    update = update.mul(ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss
