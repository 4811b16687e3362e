"""``train.py export``: a checkpoint to its family's export folder, its card scored on the STS test sets."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from evaluation.evaluate import parse_tasks, score_export
from lightning_modules.checkpoints import read_checkpoint
from lightning_modules.export import export, export_format
from lightning_modules.model_card import DEFAULT_STS_TASKS


def export_main(argv: list[str]) -> None:
    """``export --ckpt_path CKPT --output_dir DIR [--format sparsify|saelens]``: write a sentence-transformers folder
    from a checkpoint (an SAE checkpoint gives an SAE folder instead, sparsify's layout or SAELens'; see
    ``lightning_modules.export.export``). Its card is written from what the checkpoint records (the module's
    ``card_record``); an encoder's is then scored on the STS test sets the run names (``score_export``)."""

    parser = ArgumentParser(prog="train.py export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", type=str, required=True, help="a checkpoint written by `train.py fit`")
    parser.add_argument("--output_dir", type=str, required=True, help="folder to write")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an earlier export in output_dir")
    parser.add_argument("--format", type=str | None, default=None,
                        help="SAE checkpoints only: sparsify (default; cfg.json + sae.safetensors) or saelens (a "
                             "JumpReLU folder sae_lens.SAE.load_from_disk opens, with the global threshold)")
    parser.add_argument("--sts_tasks", type=str, default=",".join(DEFAULT_STS_TASKS),
                        help="STS test sets the model card scores when the run names a data root ('' for none)")
    args = parser.parse_args(argv)
    tasks = parse_tasks(args.sts_tasks) if args.sts_tasks.strip() else []
    export_format(None, args.format, "--format")  # a misspelt format fails before the checkpoint loads
    checkpoint = read_checkpoint(args.ckpt_path)
    module = checkpoint.module()
    export_format(module, args.format, "--format")
    card = module.card_record(checkpoint)
    out = export(module, args.output_dir, overwrite=args.overwrite, card=card, format=args.format)
    score_export(out, module, card, tasks)
    print(f"exported {args.ckpt_path} -> {out}  (load with {module.how_to_load(out)})")
