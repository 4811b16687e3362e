"""``train.py interpret``: the SAE interpretability suite over an exported SAE or a checkpoint, logged to W&B in
the fit's group."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from callbacks.export import RUN_FILE
from callbacks.interpret import InterpretSAE
from datamodules.activation_cache import ActivationCache
from evaluation.interpret.suite import check_sae_reads
from lightning_modules.checkpoints import read_checkpoint
from lightning_modules.export import load_any_sae
from lightning_modules.model_card import checkpoint_facts


def fit_group(path: str | Path) -> str | None:
    """The W&B group (``train.py fit`` names it after the recipe) of the fit that made an SAE, when its checkpoint
    recorded one: ``path`` is that checkpoint, or an export folder whose ``run.json`` (the fit-end export's) names
    it. None when nothing says (a folder from ``train.py export``, a checkpoint from before groups were recorded)."""
    path = Path(path)
    ckpt: str | Path | None = path if path.is_file() else None
    if ckpt is None and (path / RUN_FILE).is_file():
        try:
            ckpt = json.loads((path / RUN_FILE).read_text()).get("checkpoint")
        except ValueError:  # a damaged run.json: the run is only ungrouped
            return None
    if not ckpt or not Path(ckpt).is_file():
        return None
    return (checkpoint_facts(read_checkpoint(ckpt)).get("wandb") or {}).get("group")


def interpret_main(argv: list[str]) -> None:
    """``interpret --sae SAE --cache CACHE``: run the interpretability suite on demand (the same files and logged
    keys as the ``InterpretSAE`` callback at the end of fit)."""

    parser = ArgumentParser(prog="train.py interpret", description=interpret_main.__doc__)
    parser.add_argument("--sae", type=str, required=True, help="exported SAE folder or SAEModule checkpoint")
    parser.add_argument("--cache", type=str, required=True, help="token-level activation cache folder the SAE was "
                        "trained on (printed by `train.py fit`; under $EMBEDLAB_CACHE)")
    parser.add_argument("--output_dir", type=str, default=None, help="default: <sae folder>/interpret")
    parser.add_argument("--compare_sae", type=str, default=None,
                        help="the same SAE trained with another seed (folder or .ckpt)")
    parser.add_argument("--pseval", type=bool | None, default=None,
                        help="PS-Eval on WiC: true (required), false (skip), null (when WiC loads)")
    parser.add_argument("--pseval_saes", type=dict[int, str], default={},
                        help='SAEs of other layers for PS-Eval, e.g. \'{"3": "runs/l3/sae"}\'')
    parser.add_argument("--wic_split", type=str, default="dev")
    parser.add_argument("--data_root", type=str, default=None, help="folder holding wic/ (e.g. ../shared/data)")
    parser.add_argument("--max_tokens", type=int | None, default=None, help="random whole sentences up to N tokens")
    parser.add_argument("--sample_seed", type=int, default=0, help="the draw of those sentences")
    parser.add_argument("--sts_tasks", type=list[str] | None, default=None,
                        help="STS recovered on these test sets under --data_root ([] to skip; null: stsb and sickr "
                        "when their files are there)")
    parser.add_argument("--top_k", type=int, default=500)
    parser.add_argument("--n_unique", type=int, default=100)
    parser.add_argument("--n_contexts", type=int, default=10)
    parser.add_argument("--wandb_project", type=str | None, default=None, help="also log to this W&B project (job type "
                        "interpret; grouped with the fit's run when its checkpoint names the group)")
    parser.add_argument("--wandb_offline", type=bool, default=True, help="offline W&B run (`wandb sync` later)")
    parser.add_argument("--log_browser", type=bool, default=True, help="log the browser page to W&B too")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda when there is one), cpu, cuda, ...")
    args = parser.parse_args(argv)

    sae_path = Path(args.sae)
    out = Path(args.output_dir or (sae_path.parent if sae_path.is_file() else sae_path) / "interpret")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sae = load_any_sae(sae_path).to(device)
    cache = ActivationCache(args.cache)
    check_sae_reads(sae, cache, str(sae_path))  # naming the file, before loggers and output folders are made
    loggers: list[Logger] = [CSVLogger(str(out), name="csv")]
    if args.wandb_project:
        loggers.append(WandbLogger(project=args.wandb_project, save_dir=str(out), offline=args.wandb_offline,
                                   name=f"interpret-{sae_path.name}", job_type="interpret",
                                   group=fit_group(sae_path)))
        loggers[-1].log_hyperparams({k: v for k, v in vars(args).items() if k != "__path__"})
    callback = InterpretSAE(compare_sae=args.compare_sae, pseval=args.pseval, pseval_saes=args.pseval_saes,
                            wic_split=args.wic_split, max_tokens=args.max_tokens, sample_seed=args.sample_seed,
                            log_browser=args.log_browser, sts_tasks=args.sts_tasks,
                            top_k=args.top_k, n_unique=args.n_unique, n_contexts=args.n_contexts)
    result = callback.run(sae, cache, loggers, out, data_root=args.data_root)
    for logger in loggers:
        logger.finalize("success")
    if args.wandb_project:
        # imported when used: wandb (~1 s to import) only when a W&B logger or project is given
        import wandb

        wandb.finish()
    width = max(len(k) for k in result.summary)
    for k, v in result.summary.items():
        if "/decile_" not in k and "_hist/" not in k:
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
