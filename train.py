"""embedlab entry point.

    python train.py fit --config configs/quickstart.yaml            # train (also: validate, test)
    python train.py fit --config configs/simcse_unsup_bert_base.yaml --model.temperature 0.1
    python train.py export --ckpt_path CKPT --output_dir DIR         # -> sentence-transformers folder
    python train.py evaluate --model DIR_OR_CKPT --tasks stsb,sickr   # STS scores (default: the 7 STS tasks)
    python train.py interpret --sae SAE_DIR --cache CACHE_DIR         # SAE interpretability suite + browser

Model, datamodule, logger and callbacks are chosen in YAML (``class_path`` / ``init_args``) and overridable on the
command line; unknown keys are rejected at parse time.
"""

from __future__ import annotations

import os
import re
import sys

import yaml
from jsonargparse import ArgumentParser
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from callbacks.interpret import interpret_main
from lightning_modules.checkpoints import DATA_CONFIG_KEY, AtomicCheckpointIO, resume_config
from lightning_modules.components.errors import DataError, StorageError
from lightning_modules.components.guard import DivergenceError
from lightning_modules.evaluate import evaluate_main
from lightning_modules.export import export, how_to_load, load_module


class LogConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` next to the logs, record the whole CLI config as every logger's run config, and keep
    the data config in every checkpoint (so that a resumed run can refuse other data settings)."""

    def _as_dict(self) -> dict:
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        as_dict = self._as_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams(as_dict)

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[DATA_CONFIG_KEY] = self._as_dict().get("data")

    def on_load_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        # ModelCheckpoint restores its best-k and last-checkpoint state only when its dirpath equals the one saved:
        # a resumed run names the same folder absolutely (resume_config), the first run may have named it relatively
        # too, and the paths it keeps must match its new absolute file names, or save_last writes last-v1.ckpt
        def real(path):
            return os.path.realpath(path) if isinstance(path, str) and path else path

        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, dict) and isinstance(state.get("dirpath"), str):
                for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                    if key in state:
                        state[key] = real(state[key])
                if isinstance(state.get("best_k_models"), dict):
                    state["best_k_models"] = {real(k): v for k, v in state["best_k_models"].items()}


class EmbedLabCLI(LightningCLI):
    """LightningCLI over any LightningModule and LightningDataModule named in the config (``class_path``).

    ``fit --ckpt_path`` resumes what it names (see :func:`lightning_modules.checkpoints.resume_config`): ``last``
    is the newest complete checkpoint wherever the loggers put it, changed model / data options are refused, and
    the W&B run and checkpoint folder continue. Checkpoints are written atomically (:class:`AtomicCheckpointIO`).
    """

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") != "fit":
            return super()._parse_ckpt_path()  # validate / test: Lightning's (the checkpoint's hparams apply)
        resume_config(self.config.fit, warn=rank_zero_warn)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # e.g. max_steps -5: Lightning's check of the trainer options
            raise DataError(f"trainer: {err}") from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the config chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def export_main(argv: list[str]) -> None:
    """``export --ckpt_path CKPT --output_dir DIR``: write a sentence-transformers folder from a checkpoint (an SAE
    checkpoint gives cfg.json + sae.safetensors instead; see ``lightning_modules.export.export``)."""

    parser = ArgumentParser(prog="train.py export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", type=str, required=True, help="a checkpoint written by `train.py fit`")
    parser.add_argument("--output_dir", type=str, required=True, help="folder to write")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an earlier export in output_dir")
    args = parser.parse_args(argv)
    module = load_module(args.ckpt_path)
    out = export(module, args.output_dir, overwrite=args.overwrite)
    print(f"exported {args.ckpt_path} -> {out}  (load with {how_to_load(module, out)})")


#: The commands beside LightningCLI's fit / validate / test, each ``function(argv)``: the one place they are named.
COMMANDS = {"export": export_main, "evaluate": evaluate_main, "interpret": interpret_main}


def main(argv: list[str] | None = None) -> EmbedLabCLI | None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return None
    return EmbedLabCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def user_error(err: BaseException) -> str | None:
    """The one-line message of a bad input or option, or None for anything else (a bug keeps its traceback): a
    DataError or missing file, or a module's ValueError that jsonargparse wrapped while instantiating the config
    (its report buries the message under the Union subtypes it tried)."""

    text = str(err)
    if text.startswith("Does not validate against any of the Union subtypes"):
        reasons = [line[4:] for line in text.splitlines()
                   if line.startswith("  - ") and not line.startswith("  - Expected a <class 'NoneType'>")]
        which = re.search(r"Given value: Namespace\(class_path='([^']+)'", text)
        return f"{which.group(1) + ': ' if which else ''}{'; '.join(reasons)}" if reasons else None
    known = (DataError, FileNotFoundError, FileExistsError, StorageError, DivergenceError)
    return text if isinstance(err, known) else None


if __name__ == "__main__":  # the guard matters: strategy="ddp" re-launches this script (docs/pitfalls.md #9)
    try:
        main()
    except (ValueError, OSError, RuntimeError) as err:
        message = user_error(err)
        if message is None or os.environ.get("EMBEDLAB_TRACEBACK"):
            raise
        sys.exit(f"error: {message}\n(EMBEDLAB_TRACEBACK=1 shows the traceback)")
