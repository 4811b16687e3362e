"""The SAE interpretability suite (docs/methods.md 5) as a callback: at the end of fit, and on demand through
:meth:`InterpretSAE.run` or ``python train.py interpret`` (same code, same files, same logged keys)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from callbacks.export import WritesAtFitEnd
from core.errors import DataError
from datamodules.activation_cache import ActivationCache
from datamodules.wic import load_wic
from evaluation.evaluate import task_subsets
from evaluation.interpret.suite import run_suite
from lightning_modules.checkpoints import Checkpoint
from lightning_modules.export import load_any_sae
from lightning_modules.family import SAE
from lightning_modules.model_card import DEFAULT_STS_TASKS

#: Columns of the W&B feature table (one row per feature).
FEATURE_COLUMNS = ["id", "label", "purity", "energy", "fires", "contribution", "survival", "stability_cos",
                   "top_tokens"]
PSEVAL_COLUMNS = ["layer", "tp", "fp", "tn", "fn", "precision", "recall", "f1", "accuracy", "specificity", "pairs"]


def top_tokens(record: dict, n: int = 10) -> str:
    """The first ``n`` distinct activating tokens of a feature's top contexts, comma-separated."""
    seen: list[str] = []
    for ctx in record["contexts"]:
        if 0 <= ctx["index"] < len(ctx["tokens"]) and ctx["tokens"][ctx["index"]] not in seen:
            seen.append(ctx["tokens"][ctx["index"]])
    return ", ".join(seen[:n])


def log_suite(loggers: list[Logger], result, step: int | None = None, browser: bool = True) -> None:
    """Scalars to every logger; on W&B also the string settings (run summary), a feature table, a PS-Eval table, a
    purity-by-tag table and the browser page (``wandb.Html``)."""
    scalars = {k: float(v) for k, v in result.summary.items() if isinstance(v, int | float)}
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            logger.log_metrics(scalars, step=step)
            continue
        # imported when used: wandb (~1 s to import) only when a W&B logger or project is given
        import wandb

        run = logger.experiment
        for k, v in result.summary.items():
            if isinstance(v, str):
                run.summary[k] = v
        media: dict = {"interpret/features": wandb.Table(columns=FEATURE_COLUMNS, data=[
            [r["id"], r["label"], r["purity"], r["energy"], r["fires"], r["contribution"], r["survival"],
             r["stability_cos"], top_tokens(r)] for r in result.features])}
        tags = sorted({k.rsplit("/", 1)[1] for k in result.summary if k.startswith("interpret/pos_purity_ge_0.8/")})
        if tags:
            media["interpret/purity_by_tag"] = wandb.Table(
                columns=["tag", "share_of_alive", "share_pure"],
                data=[[t, result.summary[f"interpret/pos_dominant_share/{t}"],
                       result.summary[f"interpret/pos_purity_ge_0.8/{t}"]] for t in tags])
        if result.pseval:
            media["interpret/pseval"] = wandb.Table(columns=PSEVAL_COLUMNS, data=[
                [layer, r.confusion.tp, r.confusion.fp, r.confusion.tn, r.confusion.fn, r.precision, r.recall, r.f1,
                 r.accuracy, r.specificity, r.counts.get("balanced")] for layer, r in sorted(result.pseval.items())])
        if browser and "browser" in result.files:
            media["interpret/browser"] = wandb.Html(result.files["browser"].read_text(encoding="utf-8"))
        logger.log_metrics({**scalars, **media}, step=step)  # one W&B step for all of it


def describe(sae, cache, max_tokens: int | None = None) -> str:
    """A page title: the dictionary and the vectors it reads."""
    meta = cache.meta
    where = f"{Path(str(meta.get('model', '?'))).name} layer {meta.get('layer', '?')}"
    sample = f", a sample of <= {max_tokens:,} tokens" if max_tokens and max_tokens < len(cache) else ""
    return f"BatchTopK SAE {sae.num_latents} x k{sae.cfg.k} on {where} tokens ({Path(cache.folder).name}{sample})"


class InterpretSAE(WritesAtFitEnd):
    """Run the interpretability suite on the trained SAE when ``fit`` ends (the best checkpoint's weights, else the
    final ones) and log it; :meth:`run` runs it on demand.

    Args:
        cache: token-level activation cache folder; default: the datamodule's (an ``ActivationsDataModule``).
        compare_sae: an exported SAE (``cfg.json`` + ``sae.safetensors``) or ``SAEModule`` checkpoint of the same
            data trained with another seed, for the stability scores; None skips them.
        pseval: PS-Eval on WiC: ``True`` runs it (a missing WiC is an error), ``None`` runs it when WiC loads (else a
            warning), ``False`` skips it.
        pseval_saes: ``{layer: exported SAE folder or checkpoint}`` of other layers of the same encoder, scored by
            PS-Eval too.
        wic_split, wic_data_root: see :func:`datamodules.wic.load_wic`; the root defaults to the datamodule's
            ``data_root``.
        max_tokens: analyse only whole sentences drawn at random up to this many tokens; sample_seed: their draw.
        output_dir: default ``<run folder>/interpret``, beside the run's checkpoints.
        sts_tasks: STS test sets on which STS recovered is measured (their files under ``wic_data_root`` or the
            datamodule's ``data_root``; none without one): ``[stsb, sickr]`` for example; None: those two when their
            files are there (a warning names each one that is not).
        log_browser: also log the browser page to W&B (it can be tens of MB for large dictionaries).
        top_k, n_unique, n_contexts: see :func:`evaluation.interpret.pos.label_features`.
    """

    subdir = "interpret"
    marker = "summary.json"

    def __init__(self, cache: str | None = None, compare_sae: str | None = None, pseval: bool | None = None,
                 pseval_saes: Mapping[int, str] | None = None, wic_split: str = "dev",
                 wic_data_root: str | None = None, max_tokens: int | None = None, sample_seed: int = 0,
                 output_dir: str | None = None, sts_tasks: Sequence[str] | None = (),
                 log_browser: bool = True, top_k: int = 500, n_unique: int = 100, n_contexts: int = 10) -> None:
        super().__init__(output_dir)
        if max_tokens is not None and max_tokens < 1:
            raise DataError(f"InterpretSAE max_tokens={max_tokens}: give a positive number of tokens, or None for "
                            "the whole cache")
        self.cache, self.compare_sae, self.pseval = cache, compare_sae, pseval
        self.pseval_saes = dict(pseval_saes or {})
        self.wic_split, self.wic_data_root = wic_split, wic_data_root
        self.max_tokens, self.sample_seed = max_tokens, sample_seed
        self.log_browser = log_browser
        self.sts_tasks = None if sts_tasks is None else list(sts_tasks)
        self.label_kwargs = {"top_k": top_k, "n_unique": n_unique, "n_contexts": n_contexts}
        self.result = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the settings before training, not hours later when fit ends."""
        if stage != "fit":
            return
        if getattr(pl_module, "export_type", None) != SAE:
            raise DataError(f"InterpretSAE needs an SAEModule, got {type(pl_module).__name__}")
        if self.cache is None and getattr(trainer.datamodule, "level", None) != "token":
            raise DataError("InterpretSAE: the datamodule does not give token-level activations (an "
                            "ActivationsDataModule with level=token); set InterpretSAE cache=<token cache folder>")
        dim = getattr(getattr(trainer.datamodule, "cache", None), "dim", None)
        if self.cache is not None:
            if not (Path(self.cache) / "meta.json").is_file():
                raise DataError(f"InterpretSAE cache={self.cache!r}: not an activation cache (no meta.json)")
            meta = json.loads((Path(self.cache) / "meta.json").read_text())
            if meta.get("level") != "token":
                raise DataError(f"InterpretSAE cache={self.cache!r} holds {meta.get('level')}-level vectors; the "
                                "suite needs a token-level cache (data.level=token)")
            dim = meta.get("dim")
        for what, path in [("compare_sae", self.compare_sae),
                           *((f"pseval_saes[{k}]", v) for k, v in self.pseval_saes.items())]:
            if path is None or (Path(path).is_file() and Path(path).suffix == ".ckpt"):
                continue  # a checkpoint's width is checked when it is loaded, at the end of fit
            if not (Path(path) / "cfg.json").is_file():
                raise DataError(f"InterpretSAE {what}={path!r}: neither an exported SAE folder (no cfg.json) nor an "
                                "SAEModule checkpoint (.ckpt)")
            d_in = json.loads((Path(path) / "cfg.json").read_text()).get("d_in")
            if dim is not None and d_in != dim:
                raise DataError(f"InterpretSAE {what}={path!r} takes {d_in}-d inputs but the activations are "
                                f"{dim}-d: an SAE of another model or layer width?")
        if self.pseval:
            self._wic(self.wic_data_root or getattr(trainer.datamodule, "data_root", None))

    def _cache(self, trainer: pl.Trainer):
        if self.cache is not None:
            return ActivationCache(self.cache)
        cache = getattr(trainer.datamodule, "cache", None)
        if cache is None:
            raise DataError("InterpretSAE: no activation cache: set callbacks' InterpretSAE cache=<folder>, or train "
                            "with datamodules.ActivationsDataModule")
        return cache

    def _wic(self, data_root: str | None):
        if self.pseval is False:
            return None

        root = self.wic_data_root or data_root
        try:
            return load_wic(self.wic_split, root)
        except (DataError, OSError) as err:
            if self.pseval:
                raise
            rank_zero_warn(f"InterpretSAE: PS-Eval skipped, WiC did not load ({err}); set pseval=False to silence "
                           "this, or wic_data_root to a folder holding wic/")
            return None

    def _sts_tasks(self, root: str | None) -> list[str]:
        if not root:
            return []
        if self.sts_tasks is not None:
            return self.sts_tasks
        found = []
        for task in DEFAULT_STS_TASKS:
            try:
                task_subsets(task, root)
                found.append(task)
            except DataError as err:
                rank_zero_warn(f"InterpretSAE: STS recovered on {task} skipped ({err})")
        return found

    def run(self, sae, cache, loggers: Sequence[Logger] = (), output_dir: str | Path = "interpret",
            step: int | None = None, data_root: str | None = None, title: str | None = None):
        """Run the suite on ``sae`` over ``cache``, write the files to ``output_dir`` and log to ``loggers``
        (``data_root``: where WiC is looked for when ``wic_data_root`` is unset; ``title``: the page's)."""

        sae_b = load_any_sae(self.compare_sae) if self.compare_sae else None
        others = {int(layer): load_any_sae(path) for layer, path in self.pseval_saes.items()}
        self.result = run_suite(sae, cache, output_dir, sae_b=sae_b, wic_pairs=self._wic(data_root),
                                pseval_saes=others, max_tokens=self.max_tokens, sample_seed=self.sample_seed,
                                sts_tasks=self._sts_tasks(self.wic_data_root or data_root),
                                data_root=self.wic_data_root or data_root,
                                **self.label_kwargs, title=title or describe(sae, cache, self.max_tokens))
        log_suite(list(loggers), self.result, step=step, browser=self.log_browser)
        print(f"interpretability suite: {self.result.files['browser']} (open in a browser), "
              f"{self.result.files['summary']}", flush=True)
        return self.result

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: Checkpoint | None,
              out: Path) -> None:
        sae = module.sae.eval().to(trainer.strategy.root_device)  # the training device (the fit left it on CPU)
        self.run(sae, self._cache(trainer), trainer.loggers, out, step=trainer.global_step,
                 data_root=getattr(trainer.datamodule, "data_root", None))


