"""One optimiser step of a ContrastiveModule on N CPU processes (gloo), for the DDP equivalence tests.

    python tests/ddp_one_step.py --model_dir D --data FILE --devices 2 --batch_size 4 --out step.pt \
        [--builder '{"class_path": "lightning_modules.losses.InBatchNegatives", "init_args": {}}'] \
        [--mini_batch_size 2] [--mlp none --matryoshka_dims 4,8,32]

Rank 0 writes {"params": state_dict after the step, "grads": gradients before it} to --out. The data is read in
order (no shuffling), so 2 processes x batch B see the same SET of 2B rows as 1 process x batch 2B; the
gathered order is rows 0, 2, 4, ..., 1, 3, 5, ... (DistributedSampler deals rows alternately), which matters to
builders whose random draws are tied to row positions (HNM: tests/test_hncse.py feeds the single process that order).
Run as a script: strategy="ddp" re-launches it (docs/pitfalls.md #9).
"""

from __future__ import annotations

import argparse
import importlib
import json

import pytorch_lightning as pl
import torch


class CaptureGrads(pl.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def build(spec: str | None):
    if not spec:
        return None
    spec = json.loads(spec)
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def main(argv: list[str] | None = None) -> None:
    from datamodules import NLIDataModule, SentencesDataModule
    from lightning_modules import ContrastiveModule

    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--data", required=True, help=".txt sentences (unsupervised) or .csv triplets (supervised)")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--builder", default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pooler", default="mean")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no_sync_grads", action="store_true", help="gather without gradients (the known-wrong way)")
    ap.add_argument("--mini_batch_size", type=int, default=None, help="GradCache chunk size (rows)")
    ap.add_argument("--mlp", default="train_only")
    ap.add_argument("--matryoshka_dims", default=None, help="comma-separated prefix sizes, e.g. 4,8,32")
    args = ap.parse_args(argv)

    pl.seed_everything(0)
    model = ContrastiveModule(
        args.model_dir, pooler=args.pooler, mlp=args.mlp, lr=args.lr, candidates=build(args.builder),
        mini_batch_size=args.mini_batch_size,
        matryoshka_dims=[int(k) for k in args.matryoshka_dims.split(",")] if args.matryoshka_dims else None,
    )
    if args.no_sync_grads:
        def gather_no_grad(x):
            if model.trainer.world_size == 1:
                return x, 0
            g = model.all_gather(x.contiguous())  # no gradient flows to other ranks' rows
            rank = model.global_rank
            return torch.cat([x if r == rank else g[r] for r in range(g.shape[0])]), rank * x.shape[0]
        model.gather = gather_no_grad
    kw = dict(source=args.data, batch_size=args.batch_size, shuffle=False)
    data = NLIDataModule(**kw) if args.data.endswith(".csv") else SentencesDataModule(**kw)
    capture = CaptureGrads()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[capture],
    )
    # DDP re-seeds every rank in its setup (reset_seed), after the model consumed random numbers for its MLP:
    # re-seed here too, so 1 and 2 processes start training from the same RNG state (HNM's seeded draws).
    pl.seed_everything(0)
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "grads": capture.grads},
                   args.out)


if __name__ == "__main__":
    main()
