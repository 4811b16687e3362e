"""Small heads placed on top of a pooled embedding."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPHead(nn.Module):
    """SimCSE's pooler MLP: ``tanh(W x + b)`` with ``W`` square and randomly initialised."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.activation = nn.Tanh()

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.activation(self.dense(x_BD))


class ProjectionHead(nn.Module):
    """Maps a (frozen) teacher's sentence embedding (D) to a compressed one (K): one Linear, or a small MLP
    ``Linear(D, H) -> activation -> Linear(H, K)``.

    Args:
        in_dim: D, the teacher's embedding size.
        out_dim: K, the compressed size.
        hidden_dim: H for an MLP; None gives a linear head.
        activation: MLP activation, ``relu``, ``gelu`` or ``tanh``.
        normalize_input: L2-normalise the teacher embedding first (what a sentence-transformers teacher ending
            with Normalize outputs, and what PCA baselines are fitted on).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None,
                 activation: Literal["relu", "gelu", "tanh"] = "gelu", normalize_input: bool = True) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim or 1)):
            if value < 1:
                raise ValueError(f"ProjectionHead: {name} must be >= 1, got {value}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ProjectionHead: unknown activation {activation!r}; choose {', '.join(ACTIVATIONS)}")
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.normalize_input = normalize_input
        if hidden_dim is None:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), ACTIVATIONS[activation](),
                                        nn.Linear(hidden_dim, out_dim))

    def forward(self, x_BD: Tensor) -> Tensor:
        if x_BD.shape[-1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects {self.in_dim}-d inputs, got {x_BD.shape[-1]}-d")
        return self.layers(F.normalize(x_BD, dim=-1) if self.normalize_input else x_BD)

    def dense_layers(self) -> list[tuple[nn.Linear, nn.Module]]:
        """(Linear, activation) pairs in order, the last with Identity: one sentence-transformers Dense each."""
        mods = list(self.layers)
        pairs = []
        for i, mod in enumerate(mods):
            if isinstance(mod, nn.Linear):
                nxt = mods[i + 1] if i + 1 < len(mods) and not isinstance(mods[i + 1], nn.Linear) else nn.Identity()
                pairs.append((mod, nxt))
        return pairs

    @torch.no_grad()
    def init_truncation(self) -> None:
        """Set a linear head to keep the first K inputs (after the input normalisation): ``W = [I_K | 0]``,
        ``b = 0``. Its embedding is then the teacher's truncated to K dims, so its cosines (and every STS score)
        equal plain truncation's exactly."""
        if self.hidden_dim is not None:
            raise ValueError("truncation initialisation needs a linear head (hidden_dim=None)")
        if self.out_dim > self.in_dim:
            raise ValueError(f"truncation keeps at most in_dim = {self.in_dim} dims; out_dim is {self.out_dim}")
        linear = self.layers[0]
        linear.weight.zero_()
        linear.weight[:, : self.out_dim].copy_(torch.eye(self.out_dim))
        linear.bias.zero_()

    @torch.no_grad()
    def init_pca(self, x_ND: Tensor) -> Tensor:
        """Set a linear head to the PCA projection of ``x_ND`` (after the input normalisation):
        ``(x - mean) @ V_K``, the K leading right singular vectors. Returns the explained-variance ratio."""
        if self.hidden_dim is not None:
            raise ValueError("PCA initialisation needs a linear head (hidden_dim=None)")
        if self.out_dim > min(x_ND.shape[0], self.in_dim):
            raise ValueError(f"PCA gives at most min(rows, in_dim) = {min(x_ND.shape[0], self.in_dim)} components; "
                             f"out_dim is {self.out_dim}")
        x_ND = F.normalize(x_ND.float(), dim=-1) if self.normalize_input else x_ND.float()
        mean_D = x_ND.mean(0)
        _, s_N, vh_ND = torch.linalg.svd(x_ND - mean_D, full_matrices=False)
        components_KD = vh_ND[: self.out_dim]
        linear = self.layers[0]
        linear.weight.copy_(components_KD)
        linear.bias.copy_(-(components_KD @ mean_D))
        var_N = s_N.pow(2)
        return var_N[: self.out_dim].sum() / var_N.sum()
