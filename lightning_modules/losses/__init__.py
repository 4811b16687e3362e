"""Pure tensor functions: no Lightning, no ``.item()``, no device literals."""

from lightning_modules.losses.contrastive import (
    CandidateBuilder,
    Candidates,
    InBatchNegatives,
    Views,
    contrastive_logits,
    info_nce,
)

__all__ = ["CandidateBuilder", "Candidates", "InBatchNegatives", "Views", "contrastive_logits", "info_nce"]
