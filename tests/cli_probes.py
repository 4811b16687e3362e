"""Callbacks that tests name by class path in CLI arguments, to look inside a run."""

from __future__ import annotations

import torch
from pytorch_lightning import Callback

SEEN: dict = {}


class RecordTrainStart(Callback):
    """Stores the global step, the first optimiser state and one weight matrix when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        SEEN["step"] = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        SEEN["state"] = {k: v.clone() for k, v in state.get(0, {}).items() if torch.is_tensor(v)}
        SEEN["weights"] = pl_module.encoder.model.embeddings.word_embeddings.weight.detach().clone()


BATCHES: list = []


class RecordBatches(Callback):
    """Appends (global_step, epoch, batch_idx, fingerprint of the token ids) of each training batch to BATCHES."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        fingerprint = hash(tuple(batch["input_ids"].flatten().tolist()))
        BATCHES.append((trainer.global_step, trainer.current_epoch, batch_idx, fingerprint))


class KillAt(Callback):
    """SIGKILLs its own process at the end of training step ``step`` (after the checkpoints of earlier steps): a
    job killed by the cluster, at a known point, so the resumed run can be compared with an uninterrupted one."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)



class DivergeOnOneRank(Callback):
    """Records a NaN loss in the guard of rank ``rank`` only, at step ``step``: what one process of a DDP run sees
    when only its shard of the batch goes bad. The other ranks must stop too, not wait for it forever."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            pl_module.guard.note_loss(torch.tensor(float("nan")), self.step)


class WaitAt(Callback):
    """At the end of training step ``step``, writes ``marker`` and waits (up to a minute) for a signal from outside:
    a test then sends SIGTERM to the process at a known step, as a scheduler would."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import time
            from pathlib import Path

            Path(self.marker).write_text(str(self.step))
            deadline = time.time() + 60
            while not trainer.received_sigterm and time.time() < deadline:
                time.sleep(0.05)


SYNCS: list = []


class SyncCounter:
    """While entered, appends to ``found`` one ``(name, "file:function < ...")`` per call that would wait for a GPU
    (a host sync), callers outside torch first:

    - values read on the host: ``Tensor.item / tolist / cpu / numpy / __bool__ / __float__ / __int__``;
    - host data copied to the device: ``torch.tensor(device=...)``;
    - outputs whose size depends on the data, which the host must learn before it can go on: ``nonzero``,
      ``masked_select``, a boolean-mask index, ``unique`` / ``unique_consecutive``, and ``bincount`` (its CUDA kernel
      reads the largest value to size the output, whatever ``minlength`` says).

    On the CPU none of them waits, but each marks a place that would. Calls made inside torch's own Python code are
    not seen; on a GPU, ``torch.cuda.set_sync_debug_mode`` finds those."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero", "masked_select",
               "unique", "unique_consecutive", "bincount", "__getitem__")
    FUNCTIONS = ("tensor", "nonzero", "masked_select", "unique", "unique_consecutive", "bincount")

    def __init__(self, found: list) -> None:
        self.found, self._saved = found, {}

    def __enter__(self) -> SyncCounter:
        import traceback

        def syncs(name: str, args: tuple, kwargs: dict) -> bool:
            if name == "torch.tensor":
                return kwargs.get("device") is not None  # host data staying on the host: no copy to a device
            if name == "Tensor.__getitem__":
                index = args[1] if len(args) > 1 else None
                parts = index if isinstance(index, tuple) else (index,)
                return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)
            return True

        def counted(name, original):
            def wrapper(*args, **kwargs):
                if syncs(name, args, kwargs):
                    frames = [f for f in traceback.extract_stack(limit=40)[:-1]
                              if "/torch/" not in f.filename and "cli_probes" not in f.filename]
                    callers = [f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in frames[::-1][:6]]
                    self.found.append((name, " < ".join(callers)))
                return original(*args, **kwargs)
            return wrapper

        for name in self.METHODS:
            self._saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, counted(f"Tensor.{name}", self._saved[(torch.Tensor, name)]))
        for name in self.FUNCTIONS:
            self._saved[(torch, name)] = getattr(torch, name)
            setattr(torch, name, counted(f"torch.{name}", self._saved[(torch, name)]))
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved = {}


class CountSyncs(Callback):
    """Counts the host syncs (:class:`SyncCounter`) from the start of training step ``start`` to the start of step
    ``stop`` into SYNCS; the counting stops at the window's end, at the end of training, or when the fit fails."""

    def __init__(self, start: int = 3, stop: int = 8) -> None:
        self.start, self.stop = start, stop
        self._counter: SyncCounter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start and self._counter is None:
            SYNCS.clear()
            self._counter = SyncCounter(SYNCS).__enter__()
        elif trainer.global_step == self.stop:
            self._stop()

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def on_exception(self, trainer, pl_module, exception):
        self._stop()

    def _stop(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
