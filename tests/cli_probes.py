"""Callbacks that tests name by class path in CLI arguments, to look inside a run."""

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


class CountSyncs(Callback):
    """Counts, from the start of training step ``start`` to the start of step ``stop``, every call that would wait
    for a GPU (a host sync): ``Tensor.item / tolist / cpu / numpy / __bool__ / __float__ / __int__`` and
    ``torch.tensor(device=...)`` (host data copied to the device). On the CPU none of them waits, but each marks a
    place that would; SYNCS gets one ``(name, "file:function < ...")`` per call, callers outside torch first. Syncs
    inside torch (a boolean mask index, ``nonzero``) are not seen: on a GPU, ``torch.cuda.set_sync_debug_mode``
    finds those."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, start: int = 3, stop: int = 8) -> None:
        self.start, self.stop = start, stop
        self._saved: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start and not self._saved:
            SYNCS.clear()
            self._patch()
        elif trainer.global_step == self.stop and self._saved:
            self._unpatch()

    def on_train_end(self, trainer, pl_module):
        self._unpatch()

    def _patch(self) -> None:
        import traceback

        def counted(name, original):
            def wrapper(*args, **kwargs):
                if name == "torch.tensor" and kwargs.get("device") is None:
                    return original(*args, **kwargs)  # host data staying on the host: no copy to a device
                frames = [f for f in traceback.extract_stack(limit=40)[:-1]
                          if "/torch/" not in f.filename and "cli_probes" not in f.filename]
                callers = [f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in frames[::-1][:6]]  # file:function
                SYNCS.append((name, " < ".join(callers)))
                return original(*args, **kwargs)
            return wrapper

        for name in self.NAMES:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, counted(name, self._saved[name]))
        self._saved["tensor"] = torch.tensor
        torch.tensor = counted("torch.tensor", torch.tensor)

    def _unpatch(self) -> None:
        for name, original in self._saved.items():
            if name == "tensor":
                torch.tensor = original
            else:
                setattr(torch.Tensor, name, original)
        self._saved = {}
