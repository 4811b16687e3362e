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
