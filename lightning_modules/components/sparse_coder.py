"""What the interpretability analyses need of a sparse autoencoder: the :class:`SparseCoder` protocol.

``evaluation/interpret`` reads an SAE only through these members, so another architecture is analysed by giving it
them, without naming it anywhere there. :class:`~lightning_modules.components.batch_topk.BatchTopKSAE` satisfies the
protocol as it is (structurally: it does not inherit from it). The model is a dictionary with one global threshold::

    pre   = pre_acts(x)                          (B, F), >= 0, normalised units
    codes = input_scale * pre * [pre > threshold] (B, F), input units: what ``encode`` returns in eval mode
    x_hat = codes W_dec + input_scale * b_dec     (B, d): what ``decode`` returns

``W_dec`` holds one unit-norm dictionary row per latent, so ``d_in`` (:func:`input_dim`) is its width. The train /
eval switch is ``nn.Module``'s: the analyses put the coder in eval mode (the threshold) and restore the mode after.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from core.tensors import eval_mode  # the analyses take it from here, beside SparseCoder


@runtime_checkable
class SparseCoder(Protocol):
    """A sparse autoencoder as the interpretability analyses see it (see the module docstring for the maths)."""

    W_dec: Tensor
    """(F, d) dictionary: one unit-norm row per latent; every parameter lives on its device, in its dtype."""
    b_dec: Tensor
    """(d,) decoder bias, normalised units (times ``input_scale`` in input units)."""
    input_scale: Tensor
    """() scale s of the inputs: codes and reconstructions are in input units, ``pre_acts`` in units of s."""
    threshold: Tensor
    """() inference threshold on ``pre_acts`` (normalised units); < 0 while it was never estimated."""
    training: bool
    """True in train mode (``nn.Module``'s flag)."""

    @property
    def num_latents(self) -> int:
        """F, the dictionary size."""
        ...

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """(B, F) non-negative pre-activations of inputs ``x_BD`` (input units), normalised units."""
        ...

    def encode(self, x_BD: Tensor) -> Tensor:
        """(B, F) codes, input units (in eval mode: the entries of ``pre_acts`` above ``threshold``, times s)."""
        ...

    def decode(self, codes_BF: Tensor) -> Tensor:
        """(B, d) reconstruction, input units, of codes in input units."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Set train (True) or eval (False) mode."""
        ...

    def eval(self) -> Any:
        """Set eval mode: codes come from the threshold."""
        ...


def input_dim(coder: SparseCoder) -> int:
    """d, the width of the vectors ``coder`` reads (its dictionary rows')."""
    return int(coder.W_dec.shape[-1])


__all__ = ["SparseCoder", "eval_mode", "input_dim"]
