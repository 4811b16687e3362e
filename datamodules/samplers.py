"""Resumable batch orders: a DistributedSampler that resumes mid-epoch, and one that groups similar lengths."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

from core.errors import DataError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (any number of processes, one included) that can skip the first ``skip`` indices of
    its next epoch: how a run resumed mid-epoch continues at the same sample. Lightning calls ``set_epoch``.

    ``len()`` stays the full epoch's: Lightning sizes every later epoch from the first length it reads, and the
    resumed epoch simply ends early when the shortened iterator runs out."""

    skip: int = 0

    def __iter__(self):
        indices = self.order(list(super().__iter__()))
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def order(self, indices: list[int]) -> list[int]:
        """This rank's indices of the epoch, in the order batches are cut from; subclasses reorder them."""
        return indices


class LengthGroupedSampler(ResumableSampler):
    """Batches of similar lengths (less padding), drawn from a shuffled order, deterministic and resumable.

    The epoch's order is :class:`ResumableSampler`'s (shuffled from ``seed + epoch``, this rank's share). It is
    cut into windows of ``window_batches * batch_size`` indices; each window is sorted by length (stable) and cut
    into batches, whose order within the window is shuffled (from ``seed + epoch`` too). A trailing incomplete
    batch stays last, so batches never straddle a cut. The result depends only on (seed, epoch, rank), hence a
    resumed run skips to the same sample (``skip`` applies to this order).

    In-batch negatives of similar length: for contrastive training this changes which negatives meet (off by
    default); HF's ``LengthGroupedSampler`` does the same with 50-batch "megabatches".

    Args:
        lengths: the padded length each dataset row needs (longest of its views).
        batch_size: rows per batch (per rank).
        window_batches: batches per sorting window; larger means less padding and less randomness.
        **kwargs: :class:`~torch.utils.data.DistributedSampler`'s (num_replicas, rank, shuffle, seed, drop_last).
    """

    def __init__(self, dataset, lengths: Sequence[int], batch_size: int, window_batches: int = 50,
                 **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} rows")
        if window_batches < 1:
            raise DataError(f"length_group_batches must be >= 1, got {window_batches}")
        self.lengths, self.batch_size, self.window_batches = list(lengths), batch_size, window_batches

    def order(self, indices: list[int]) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch + 1_000_003)  # not the permutation's stream
        window = self.window_batches * self.batch_size
        out: list[int] = []
        for start in range(0, len(indices), window):
            chunk = sorted(indices[start : start + window], key=self.lengths.__getitem__)
            batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
            for b in torch.randperm(len(batches), generator=g).tolist() if self.shuffle else range(len(batches)):
                out.extend(batches[b])
            for b in tail:
                out.extend(b)
        return out
