"""LARS: SGD with a layer-wise trust ratio, as the paper's linear classification protocol uses it.

Source: You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks" (2017, arXiv
1708.03888), §3 and Algorithm 1: each parameter tensor ``w`` gets the local learning rate

    trust = η · ‖w‖ / (‖∇w‖ + β · ‖w‖)          η = trust coefficient (0.001), β = weight decay

and its update direction is ``trust · (∇w + β · w)``, fed to SGD with momentum. This follows the
variant the official SimSiam ``main_lincls.py --lars`` runs (NVIDIA apex ``LARC`` with
``trust_coefficient=0.001, clip=False`` wrapped around ``torch.optim.SGD``): the learning rate
multiplies the momentum buffer, the trust ratio is 1 when ``‖w‖`` or ``‖∇w‖`` is 0 (a zero-initialised
bias on its first step), and every parameter is adapted, the linear classifier's bias included.
A group with ``adapt=False`` skips the trust ratio: the common rule of SimCLR / BYOL, which exclude
biases and BatchNorm parameters from adaptation and weight decay, is a second group
``{"params": biases, "weight_decay": 0, "adapt": False}``.

Why not a library: timm's ``Lars`` implements the same step but adapts only groups with non-zero
weight decay unless ``always_adapt=True`` (the linear protocol's weight decay is 0), and it would add
timm, huggingface_hub, safetensors and PyYAML to the install for these 40 lines.
The step makes no host reads (``torch.where`` instead of a Python ``if`` on the norms).
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum on LARS-scaled gradients (apex ``LARC(SGD, clip=False)`` semantics).

    Args:
        params: parameters or parameter groups; a group may set ``adapt=False`` to take plain SGD
            steps (its weight decay still applies).
        lr: learning rate γ (the paper's linear protocol: 0.02 × batch / 256).
        momentum: SGD momentum (0.9), PyTorch convention ``buf = m·buf + g``, ``w -= γ·buf``.
        weight_decay: β, added to the gradient before scaling (0 in the linear protocol).
        trust_coefficient: η = 0.001 (the official SimSiam code and the LARS paper's ImageNet runs).
        eps: added to the trust ratio's denominator, 1e-8 (apex).

    Raises:
        ValueError: a negative lr, momentum, weight decay or trust coefficient.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coefficient", trust_coefficient)):
            if not value >= 0:
                raise ValueError(f"LARS {name} must be >= 0, got {value}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["adapt"]:
                    w_norm, g_norm = p.norm(), p.grad.norm()
                    trust = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    grad.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = grad
                    else:
                        grad = state["momentum_buffer"].mul_(momentum).add_(grad)
                p.add_(grad, alpha=-group["lr"])
        return loss

