"""A few SAEModule steps on N CPU processes (gloo), for the DDP test: every rank writes its state dict; the SAE
export and the interpretability suite run when fit ends.

    python tests/sae_ddp_steps.py --cache DIR --devices 2 --steps 3 --out_dir OUT

Run as a script: strategy="ddp" re-launches it (docs/pitfalls.md #9).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch


def main() -> None:
    from datamodules import ActivationsDataModule
    from lightning_modules import SAEModule

    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--matryoshka_widths", type=float, nargs="*", default=None, help="fractions: a Matryoshka SAE")
    args = ap.parse_args()

    pl.seed_everything(0)
    data = ActivationsDataModule(model_name_or_path=args.model_dir, source=args.source, cache_path=args.cache,
                                 batch_size=32, max_length=32)
    model = SAEModule(sae=dict(expansion_factor=2, k=4, dead_after=64, threshold_start=1,
                               matryoshka_widths=args.matryoshka_widths), init_samples=256)
    # the end-of-fit writers resolve <log_dir> on every rank (a broadcast) and write on rank 0 only
    from pytorch_lightning.loggers import CSVLogger

    from callbacks import ExportOnFitEnd, InterpretSAE

    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=args.steps, logger=CSVLogger(args.out_dir, name="csv"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExportOnFitEnd(), InterpretSAE(pseval=False, top_k=20, n_unique=5, n_contexts=2)])
    trainer.fit(model, data)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               f"{args.out_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
