"""Divergence guard: remember on the device the first step that went wrong, read it rarely.

A training step must not synchronise with the host (a ``.item()`` per step stalls a GPU), so each check here is a
``torch.where`` into a small device tensor; :meth:`DivergenceGuard.first` reads every record at once (one sync) when
the module asks, which it does every few steps, before a checkpoint is written and when training ends.
No Lightning here: the module decides when to record and when to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPREAD_SHRINK = 10.0  # how much the spread of a batch must shrink from the first batch to count as collapse
#: What a record can say, in the order a message reports them when several fire at the same step.
KINDS = ("loss", "grad_norm", "embeddings", "collapse", "weights")


class DivergenceError(RuntimeError):
    """Training went wrong (non-finite loss, gradient or embeddings, or collapsed embeddings); the message names
    the step and the likely cause, and says that the checkpoints written before it are intact."""


@dataclass
class Event:
    """The first step at which one kind of check failed, with the value seen and any module-specific numbers."""

    kind: str
    step: int
    value: float
    extra: list[float]


class DivergenceGuard:
    """Per kind of check, a device tensor ``[fired, step, value, *extra]`` holding its first failure.

    Args:
        max_mean_cosine: embeddings count as collapsed when the mean cosine between the distinct rows of a batch
            rises above this (all sentences mapped to nearly one direction) after the first batch seen was at or
            below it; a model that starts above it (an untrained encoder's CLS vectors are nearly parallel) is not
            flagged, nor one whose spread ``1 - mean cosine`` has not shrunk to a tenth of the first batch's
            (``SPREAD_SHRINK``: a random encoder on unknown words starts at 0.985 and drifts to 0.993 without
            collapsing). None disables the check. Measured on all-MiniLM-L6-v2 at lr 1e4: a collapsed encoder still
            reads 0.996 in training mode (dropout 0.1 keeps the rows slightly apart) against 0.18 before, hence
            the default 0.99 rather than a bound nearer 1.
    """

    def __init__(self, max_mean_cosine: float | None = 0.99) -> None:
        if max_mean_cosine is not None and not -1 < max_mean_cosine <= 1:
            raise ValueError(f"max_mean_cosine must be in (-1, 1] or null, got {max_mean_cosine}")
        self.max_mean_cosine = max_mean_cosine
        self.records: dict[str, Tensor] = {}
        self._start_cosine: Tensor | None = None  # mean cosine of the first batch seen, on the device

    def note(self, kind: str, bad: Tensor, step: int, value: Tensor, extra: Tensor | None = None) -> None:
        """Keep ``(step, value, extra)`` for ``kind`` if ``bad`` (a 0-d bool tensor) and nothing was kept yet."""
        dev = value.device
        # torch.full fills on the device: no host-to-device copy, hence no synchronisation
        parts = [torch.ones((), device=dev), torch.full((), float(step), device=dev), value.detach().float()]
        row = torch.cat([torch.stack(parts), extra.detach().float().reshape(-1) if extra is not None
                         else torch.zeros(0, device=dev)])
        old = self.records.get(kind)
        if old is None or old.shape != row.shape or old.device != dev:
            old = torch.zeros_like(row)
        self.records[kind] = torch.where(bad & (old[0] == 0), row, old)

    def note_loss(self, loss: Tensor, step: int, extra: Tensor | None = None) -> None:
        self.note("loss", ~torch.isfinite(loss.detach()), step, loss, extra)

    def note_grad_norm(self, norm: Tensor, step: int) -> None:
        self.note("grad_norm", ~torch.isfinite(norm), step, norm)

    def note_weights(self, params, step: int) -> None:
        """Non-finite parameters (an update can make them so before any loss shows it); records how many tensors
        hold one. One sum per tensor: a NaN or an infinity makes its tensor's sum non-finite, and summing in float32
        at least cannot overflow on finite weights of any sane size (a sum reads each tensor once and allocates
        nothing: 25x cheaper on a CPU than ``isfinite`` per element, which the save of every checkpoint paid)."""
        params = [p.detach() for p in params if p.is_floating_point()]
        if params:
            sums = torch.stack([p.sum(dtype=torch.promote_types(p.dtype, torch.float32)) for p in params])
            bad = (~torch.isfinite(sums)).sum().float()
            self.note("weights", bad > 0, step, bad)

    def note_embeddings(self, z_ND: Tensor, step: int) -> None:
        """Non-finite entries, and (with at least two rows) the mean pairwise cosine against the collapse bound."""
        z = z_ND.detach().float()
        finite = torch.isfinite(z).all()
        self.note("embeddings", ~finite, step, (~torch.isfinite(z)).sum().float())
        n = z.shape[0]
        if self.max_mean_cosine is None or n < 2:
            return
        s_D = torch.nn.functional.normalize(z, dim=-1).sum(0)
        mean_cos = ((s_D @ s_D) - n) / (n * (n - 1))  # mean of cos(z_i, z_j) over i != j, in O(N D)
        if self._start_cosine is None:
            self._start_cosine = mean_cos
        # collapsed: above the bound AND the spread (1 - mean cosine) shrank to a tenth of the first batch's, so a
        # model that starts near the bound (a random encoder on unknown words: 0.985) and drifts over it is not one
        spread, start_spread = 1 - mean_cos, 1 - self._start_cosine
        collapsed = (finite & (mean_cos > self.max_mean_cosine) & (self._start_cosine <= self.max_mean_cosine)
                     & (spread < start_spread / SPREAD_SHRINK))
        self.note("collapse", collapsed, step, mean_cos)

    def first(self) -> Event | None:
        """The earliest failure recorded (one host sync for all kinds), or None."""
        if not self.records:
            return None
        kinds = list(self.records)
        flat = torch.cat([self.records[k].to(next(iter(self.records.values())).device) for k in kinds]).tolist()
        rows, at = [], 0
        for k in kinds:
            n = self.records[k].numel()
            rows.append(flat[at : at + n])
            at += n
        fired = [(row[1], KINDS.index(k) if k in KINDS else len(KINDS), k, row)
                 for k, row in zip(kinds, rows) if row[0]]
        if not fired:
            return None
        _, _, kind, row = min(fired)
        return Event(kind, int(row[1]), row[2], row[3:])


def describe(event: Event) -> str:
    """What went wrong, in words (the module adds the likely causes)."""
    if event.kind == "loss":
        return f"the training loss is {event.value:g}"
    if event.kind == "grad_norm":
        return f"the gradient norm is {event.value:g}"
    if event.kind == "embeddings":
        return f"the embeddings hold {int(event.value)} non-finite value(s)"
    if event.kind == "weights":
        return f"{int(event.value)} weight tensor(s) hold non-finite values"
    if event.kind == "collapse":
        return (f"the embeddings collapsed: the mean cosine between the sentences of a batch is {event.value:.5f} "
                "(every sentence maps to nearly the same vector)")
    return f"{event.kind} = {event.value:g}"
