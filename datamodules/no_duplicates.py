"""Batches in which no text appears twice: a premise repeated across NLI triplets would otherwise meet itself as an
in-batch negative (a false negative the loss pushes away from its own copy).

The sampler builds each epoch's order from (seed, epoch) alone, so every process computes the same thing and a
resumed run skips to the same sample, exactly as :class:`~datamodules.samplers.ResumableSampler` does. What it
orders is the *global* batch: ``world * batch_size`` rows, rank ``r`` taking rows ``r, r + world, ...`` of each.
The DataLoader then cuts each rank's order into plain ``batch_size`` chunks, and the chunks of one step together
are one global batch, duplicate-free, which is what matters when negatives are gathered across ranks. Where no
text collides, the order is exactly the plain sampler's.

:func:`duplicate_rate` measures how often a plain shuffled order puts a text twice in a batch (the "before").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_lightning.utilities import rank_zero_info

from datamodules.samplers import ResumableSampler


def text_keys(rows: Sequence[Sequence[str]]) -> list[tuple[int, ...]]:
    """Each row's texts as small integers, the same integer for the same text anywhere in the data (a row's own
    repeated text appears once): cheaper to compare and hold than the strings."""
    ids: dict[str, int] = {}
    return [tuple(dict.fromkeys(ids.setdefault(t, len(ids)) for t in row)) for row in rows]


def pack(
    order: Sequence[int], keys: Sequence[Sequence[int]], sizes: Sequence[int], lookback: int = 64
) -> tuple[list[list[int]], dict]:
    """Cut ``order`` into batches of ``sizes``, each holding every text at most once where that is possible.

    Each batch first takes the rows deferred earlier (oldest first), then the next rows of ``order``; a row sharing
    a text with the batch is deferred to a later one. When every row left shares a text with the batch (near the
    end of the epoch), the batch is completed with the oldest deferred rows: each first tries to trade places with
    a row of one of the ``lookback`` previous batches that fits here while it fits there (:func:`swap_in`), and
    otherwise joins this batch beside a copy of one of its texts (``forced``). No row is lost. Rows of ``order``
    beyond ``sum(sizes)`` are not used (``unused``).

    A row's own texts are not compared with each other: an anchor equal to its own positive is the data's business,
    not a collision between rows.

    Returns:
        The batches, and counts: ``deferred`` (distinct rows pushed to a later batch at least once), ``forced`` and
        ``unused``.
    """
    pos, waiting, deferred, forced = 0, [], set(), 0
    batches: list[list[int]] = []
    held: list[set[int] | None] = []  # each batch's texts while it is duplicate-free, else None
    for size in sizes:
        batch: list[int] = []
        seen: set[int] = set()
        still: list[int] = []
        for i in waiting:
            if len(batch) < size and seen.isdisjoint(keys[i]):
                batch.append(i)
                seen.update(keys[i])
            else:
                still.append(i)
        waiting = still
        while len(batch) < size and pos < len(order):
            i = order[pos]
            pos += 1
            if seen.isdisjoint(keys[i]):
                batch.append(i)
                seen.update(keys[i])
            else:
                waiting.append(i)
                deferred.add(i)
        clean, used = True, 0
        for i in waiting[: size - len(batch)]:  # everything left collides with the batch
            used += 1
            if not swap_in(i, batch, seen, batches, held, keys, lookback):
                batch.append(i)
                seen.update(keys[i])
                forced += 1
                clean = False
        waiting = waiting[used:]
        batches.append(batch)
        held.append(seen if clean else None)
    unused = len(waiting) + len(order) - pos
    return batches, {"deferred": len(deferred), "forced": forced, "unused": unused}


def swap_in(
    i: int,
    batch: list[int],
    seen: set[int],
    batches: list[list[int]],
    held: list[set[int] | None],
    keys: Sequence[Sequence[int]],
    lookback: int,
) -> bool:
    """Put row ``i``, which collides with ``batch`` (texts ``seen``), into one of the last ``lookback`` duplicate-free
    ``batches`` (texts ``held``) in exchange for a row of it that collides with neither ``batch`` nor the rest of
    its own batch; the exchanged row joins ``batch`` and ``seen``. False when no such exchange exists."""
    mine = keys[i]
    for j in range(len(batches) - 1, max(len(batches) - lookback, 0) - 1, -1):
        texts = held[j]
        if texts is None:
            continue
        clashes = [k for k in mine if k in texts]
        for slot, other in enumerate(batches[j]):
            theirs = keys[other]
            if all(k in theirs for k in clashes) and seen.isdisjoint(theirs):
                batches[j][slot] = i
                texts.difference_update(theirs)
                texts.update(mine)
                batch.append(other)
                seen.update(theirs)
                return True
    return False


def shuffle_windows(batches: list[list[int]], full: int, window_batches: int, seed: int) -> list[list[int]]:
    """The first ``full`` batches shuffled within consecutive windows of ``window_batches``, from ``seed`` (the
    stream :class:`~datamodules.samplers.LengthGroupedSampler` draws its batch order from); later batches stay last."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    out = []
    for start in range(0, full, window_batches):
        out += [batches[start + b] for b in torch.randperm(min(window_batches, full - start), generator=g).tolist()]
    return out + batches[full:]


class NoDuplicatesSampler(ResumableSampler):
    """This rank's share of duplicate-free global batches, deterministic per (seed, epoch) and resumable.

    The epoch starts from :class:`~torch.utils.data.DistributedSampler`'s permutation (``seed + epoch``; the
    dataset order when ``shuffle`` is off), padded by repeating its first rows (without ``drop_last``) so that
    every rank gets ``len(self)`` rows, as the parent does. :func:`pack` cuts it into global batches of
    ``num_replicas * batch_size`` rows, then one final global batch of ``num_replicas * (len(self) % batch_size)``
    rows when the share does not divide; rank ``r`` takes rows ``r, r + num_replicas, ...`` of each, the way
    DistributedSampler deals, so that when no text collides the order is exactly
    :class:`~datamodules.samplers.ResumableSampler`'s (on any number of ranks). Duplicates are avoided in the
    global batch, hence across ranks as well as within each rank's batch.

    With ``lengths`` (``group_by_length``), each window of ``window_batches`` global batches is sorted by length
    before packing, ascending and descending in turn, so that a deferred row mostly waits for a batch of similar
    lengths (at a window's end, the next window starts with the same lengths); after packing, the full batches are
    shuffled within each window (:func:`shuffle_windows`). Lengths are grouped over global batches, not over each
    rank's share as :class:`~datamodules.samplers.LengthGroupedSampler` does. A row deferred within a descending
    window lands in a batch of shorter rows: on the SNLI dev/test triplets (batch 64, windows of 50) the padded
    tokens are about 3% above length grouping alone, and half those of no grouping.

    After each epoch's order is built, ``deferred`` (rows pushed to a later batch), ``forced`` (rows placed beside a
    copy of one of their texts because no duplicate-free place was left) and ``tail`` (rows of the final incomplete
    batch, which the DataLoader drops under ``drop_last``, plus the few rows ``drop_last`` trims so that ranks get
    equal shares) hold its counts over all ranks; rank zero logs them in one line.

    Args:
        dataset: the training rows.
        keys: each row's texts as comparable values (:func:`text_keys`).
        batch_size: rows per batch per rank.
        lengths: each row's padded length, to group similar lengths (``group_by_length``); None keeps the shuffle.
        window_batches: global batches per length-sorting window.
        **kwargs: :class:`~torch.utils.data.DistributedSampler`'s (num_replicas, rank, shuffle, seed, drop_last).
    """

    def __init__(
        self,
        dataset,
        keys: Sequence[Sequence[int]],
        batch_size: int,
        lengths: Sequence[int] | None = None,
        window_batches: int = 50,
        **kwargs,
    ) -> None:
        super().__init__(dataset, **kwargs)
        if len(keys) != len(dataset):
            raise ValueError(f"{len(keys)} key rows for {len(dataset)} rows")
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} rows")
        self.keys, self.batch_size, self.window_batches = keys, batch_size, window_batches
        self.lengths = None if lengths is None else list(lengths)
        self.deferred = self.forced = self.tail = 0

    def global_batches(self) -> list[list[int]]:
        """Every rank's rows of this epoch, as global batches (the counts are updated and logged)."""
        n, world, size = len(self.dataset), self.num_replicas, self.batch_size
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.lengths is not None:  # sorted windows: a deferred row waits for the next batch of similar lengths
            window = self.window_batches * world * size
            chunks = [sorted(order[s : s + window], key=self.lengths.__getitem__) for s in range(0, n, window)]
            order = [i for k, chunk in enumerate(chunks) for i in (chunk[::-1] if k % 2 else chunk)]
        total = world * self.num_samples
        if total > n:  # no drop_last: pad by repeating rows, as DistributedSampler does
            order += (order * (-(-(total - n) // n)))[: total - n]
        full, rest = divmod(self.num_samples, size)
        batches, counts = pack(order, self.keys, [world * size] * full + ([world * rest] if rest else []))
        self.deferred, self.forced = counts["deferred"], counts["forced"]
        self.tail = world * rest + counts["unused"]
        if self.lengths is not None and self.shuffle:
            batches = shuffle_windows(batches, full, self.window_batches, self.seed + self.epoch)
        rank_zero_info(
            f"no_duplicates: epoch {self.epoch} deferred {self.deferred} of {n} rows; {self.tail} left for the final "
            f"incomplete batch{' (dropped)' if self.drop_last else ''}"
            + (
                f"; {self.forced} placed beside a copy of one of their texts (no duplicate-free batch was left for "
                "them)"
                if self.forced
                else ""
            )
        )
        return batches

    def __iter__(self):
        world, rank = self.num_replicas, self.rank
        indices = []
        for batch in self.global_batches():
            indices += batch[rank::world]
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def repeats_per_batch(keys: Sequence[Sequence[int]], order: Sequence[int], batch_size: int,
                      drop_last: bool = False) -> list[int]:
    """For each batch cut from ``order``, the texts its rows hold beyond the first row holding each (``keys``: each
    row's distinct text ids, :func:`text_keys`; a row's own repeated text does not count)."""
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    batches = [[keys[i] for i in order[start : start + batch_size]] for start in range(0, stop, batch_size)]
    return [sum(map(len, batch)) - len(set().union(*batch)) for batch in batches]


def duplicate_rate(rows: Sequence[Sequence[str]], batch_size: int, seed: int = 0, drop_last: bool = False) -> dict:
    """How often the plain shuffled order (one process, epoch 0 of ``seed``, as without ``no_duplicates``) puts a
    text twice in a batch.

    A batch's duplicates are the texts its rows hold beyond the first row holding each (a row's own repeated text
    does not count, as in :func:`pack`).

    Returns:
        ``batches``, ``with_duplicate`` (fraction of batches holding at least one duplicate) and
        ``mean_duplicates`` (duplicate texts per batch, on average).
    """
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    counts = repeats_per_batch(text_keys(rows), order, batch_size, drop_last)
    return {
        "batches": len(counts),
        "with_duplicate": sum(c > 0 for c in counts) / max(len(counts), 1),
        "mean_duplicates": sum(counts) / max(len(counts), 1),
    }
