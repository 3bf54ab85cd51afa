"""The toy problem of the FAMO paper (Appendix D) in PyTorch, as the authors' script computes it.

The PyTorch side of ``benchmarks/vs_pytorch.py``; the JAX side is
``famo_jax.problems.toy_losses`` (tested against independent values in
``tests/test_problems.py``).
"""

from __future__ import annotations

import torch

LOWER = 5e-6  # the clamps' lower bound in the authors' script
SCALE = 0.1  # loss 1 is scaled by 0.1


def toy_losses(theta: torch.Tensor) -> torch.Tensor:
    """The two task losses at ``theta`` (shape ``(2,)``), shape ``(2,)``."""
    x1, x2 = theta[0], theta[1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    g1 = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    g2 = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return torch.stack([SCALE * (f1 * c1 + g1 * c2), f2 * c1 + g2 * c2])
