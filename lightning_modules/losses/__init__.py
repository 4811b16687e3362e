"""Pure tensor functions: no Lightning, no ``.item()``, no device literals."""

from lightning_modules.losses.contrastive import (
    CandidateBuilder,
    Candidates,
    InBatchNegatives,
    Views,
    contrastive_logits,
    info_nce,
    matryoshka_info_nce,
)
from lightning_modules.losses.grad_cache import grad_cached_loss
from lightning_modules.losses.hard_negatives import HardNegativeMixing, PositiveMixing
from lightning_modules.losses.mcr2 import (
    MCR2Output,
    coding_rate,
    cosine_distillation,
    grouped_coding_rate,
    listwise_distillation,
    matryoshka_mcr2_loss,
    mcr2_loss,
)
from lightning_modules.losses.sae import (
    aux_loss,
    dead_fraction,
    fvu,
    mean_cosine,
    normalized_mse,
    squared_error,
)

__all__ = [
    "CandidateBuilder",
    "Candidates",
    "HardNegativeMixing",
    "InBatchNegatives",
    "MCR2Output",
    "PositiveMixing",
    "Views",
    "coding_rate",
    "contrastive_logits",
    "cosine_distillation",
    "grad_cached_loss",
    "grouped_coding_rate",
    "info_nce",
    "listwise_distillation",
    "matryoshka_info_nce",
    "matryoshka_mcr2_loss",
    "mcr2_loss",
    "aux_loss",
    "dead_fraction",
    "fvu",
    "mean_cosine",
    "normalized_mse",
    "squared_error",
]
