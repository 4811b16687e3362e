"""Small heads placed on top of a pooled embedding."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    """SimCSE's pooler MLP: ``tanh(W x + b)`` with ``W`` square and randomly initialised."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.activation = nn.Tanh()

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.activation(self.dense(x_BD))
