"""The gradient-norm monitor's arithmetic (its sharded path runs in the FSDP2 / SLURM system tests)."""

from __future__ import annotations

import torch

from callbacks.monitors import total_grad_norm


def test_total_grad_norm_is_the_l2_norm_of_all_gradients() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert total_grad_norm(model) is None
    model(torch.randn(5, 4)).square().sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert abs(total_grad_norm(model) - expected) < 1e-6 * expected
