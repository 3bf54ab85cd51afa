"""FAMO in PyTorch, written from Algorithm 2 (Appendix C) of the FAMO paper.

This is the *reference* the JAX port is compared against. The tests never
import it (they replay the committed ``fixtures/*.npz``), so they run without
torch installed.

Algorithm 2, in words: the task logits ``xi`` start at zero and are trained by
``torch.optim.Adam(lr, weight_decay=gamma)`` (coupled L2 decay). Given the task
losses ``l``, with ``z = softmax(xi)`` and ``D = l - m + 1e-8``, the model is
trained on ``sum(c * z * log D)`` where ``c = 1 / sum(z / D)`` is detached. After
the model step, ``delta = log(D_prev) - log(D_curr)`` and the logits get the
gradient ``J_softmax(xi)^T delta`` (obtained with ``torch.autograd.grad`` of the
softmax with ``grad_outputs=delta``), then one Adam step.

All tensors follow ``torch.get_default_dtype()`` unless a ``dtype`` is given:
switch it to float64 to run the reference in double precision.

Used by ``make_fixtures.py`` (the committed parity fixtures) and by
``benchmarks/vs_pytorch.py`` (speed and agreement against PyTorch).

Reference:
  Liu, Feng, Stone and Liu, FAMO: Fast Adaptive Multitask Optimization,
  NeurIPS 2023, Algorithm 2. https://arxiv.org/abs/2306.03792
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # The constant Algorithm 2 adds to losses - min_losses.


class FamoReference:
    """Algorithm 2 of the paper: ``get_weighted_loss`` and ``update``."""

    def __init__(
        self, num_tasks: int, min_losses, lr: float = 0.025, gamma: float = 0.001, dtype=None
    ):
        dtype = dtype or torch.get_default_dtype()
        self.min_losses = torch.as_tensor(min_losses, dtype=dtype)
        self.xi = torch.zeros(num_tasks, dtype=dtype, requires_grad=True)
        self.xi_opt = torch.optim.Adam([self.xi], lr=lr, weight_decay=gamma)

    def get_weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The scalar loss whose gradient w.r.t. ``losses`` is ``c * z / D``."""
        z = F.softmax(self.xi, -1)
        gap = losses - self.min_losses + EPS
        c = 1 / (z / gap).sum().detach()
        return (c * gap.log() * z).sum()

    def update(self, prev_losses: torch.Tensor, curr_losses: torch.Tensor) -> None:
        """One Adam step on the logits along ``J_softmax^T (log D_prev - log D_curr)``."""
        delta = (prev_losses - self.min_losses + EPS).log() - (
            curr_losses - self.min_losses + EPS
        ).log()
        with torch.enable_grad():
            (logits_grad,) = torch.autograd.grad(
                F.softmax(self.xi, -1), self.xi, grad_outputs=delta.detach()
            )
        self.xi_opt.zero_grad()
        self.xi.grad = logits_grad
        self.xi_opt.step()

    @property
    def logits(self) -> torch.Tensor:
        return self.xi.detach()
