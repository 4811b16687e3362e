"""Sparse-autoencoder objectives and metrics as pure tensor functions (Bussmann et al. 2024, docs/methods.md §4).

Names follow dictionary_learning: ``x_BD`` inputs, ``x_hat_BD`` reconstructions, ``e_BD = x - x_hat`` residuals.
"""

from __future__ import annotations

import torch
from torch import Tensor


def squared_error(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Mean over rows of ``||x - x_hat||^2`` (the reconstruction loss of dictionary_learning and OpenAI's TopK SAE:
    summed over dimensions, so its scale is that of the inputs' squared norm, ~1 after input normalisation)."""
    return (x_BD - x_hat_BD).pow(2).sum(-1).mean()


def total_variance(x_BD: Tensor) -> Tensor:
    """Mean over rows of ``||x - mean(x)||^2`` (the denominator of FVU)."""
    return (x_BD - x_BD.mean(0, keepdim=True)).pow(2).sum(-1).mean()


def fvu(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the batch.

    ``1 - fvu`` is the explained variance. Zero variance (one row, or identical rows) gives inf or nan.
    """
    return squared_error(x_BD, x_hat_BD) / total_variance(x_BD)


def normalized_mse(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """``sum ||x - x_hat||^2 / sum ||x||^2`` (OpenAI's normalised MSE: relative to predicting zero, not the mean)."""
    return (x_BD - x_hat_BD).pow(2).sum() / x_BD.pow(2).sum()


def mean_cosine(x_BD: Tensor, x_hat_BD: Tensor) -> Tensor:
    """Mean cosine similarity between each input and its reconstruction."""
    return torch.nn.functional.cosine_similarity(x_BD, x_hat_BD, dim=-1).mean()


def aux_loss(e_BD: Tensor, aux_recon_BD: Tensor, normalize: bool = True) -> Tensor:
    """AuxK loss: how well the dead latents' reconstruction ``aux_recon`` (decoder without bias) explains the
    residual ``e = x - x_hat`` of the main reconstruction.

    ``||e - aux_recon||^2`` averaged over rows, divided (``normalize=True``, the OpenAI / dictionary_learning variant)
    by the residual's own variance ``mean ||e - mean(e)||^2``, making it a dimensionless FVU of the residual. NaN
    (zero residual variance) becomes 0. Whether ``e`` carries gradient is the caller's choice (detach it to train only
    the dead latents, as dictionary_learning does).
    """
    loss = squared_error(e_BD, aux_recon_BD)
    if normalize:
        loss = loss / total_variance(e_BD)
    return loss.nan_to_num(0.0, posinf=0.0, neginf=0.0)


def dead_fraction(tokens_since_fired_F: Tensor, dead_after: int) -> Tensor:
    """Fraction of latents that have not fired for at least ``dead_after`` tokens."""
    return (tokens_since_fired_F >= dead_after).float().mean()


__all__ = ["aux_loss", "dead_fraction", "fvu", "mean_cosine", "normalized_mse", "squared_error",
           "total_variance"]
