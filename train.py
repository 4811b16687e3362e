"""embedlab entry point.

    python train.py fit --config configs/quickstart.yaml            # train (also: validate, test)
    python train.py fit --config configs/simcse_unsup_bert_base.yaml --model.temperature 0.1
    python train.py export --ckpt_path CKPT --output_dir DIR         # -> sentence-transformers folder
    python train.py evaluate --model DIR_OR_CKPT --tasks stsb,sickr   # STS scores (default: the 7 STS tasks)
    python train.py evaluate --model DIR --tasks STSBenchmark,SICK-R  # MTEB tasks (or --benchmark NAME)
    python train.py interpret --sae SAE_DIR --cache CACHE_DIR         # SAE interpretability suite + browser
    python train.py study decomposition --models M1 M2 --data_root D  # a whole study -> report folder
    python train.py push --model DIR --repo_id USER/NAME [--dry_run true] # upload an export to the HF Hub
    python train.py mine --model M --pairs PAIRS.csv --output TRIPLETS.csv # mined hard negatives -> SimCSE triplets

Model, datamodule, logger and callbacks are chosen in YAML (``class_path`` / ``init_args``) and overridable on the
command line; unknown keys are rejected at parse time.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
from collections.abc import Mapping

import yaml
from jsonargparse import Namespace
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from callbacks import preemption
from commands.evaluate import evaluate_main
from commands.export import export_main
from commands.interpret import interpret_main
from commands.mine import mine_main
from commands.push import push_main
from commands.run_defaults import PROJECT, apply_run_defaults, config_paths, recipe_name
from commands.run_environment import (
    bound_startup,
    check_run_folders,
    check_trainer_environment,
    remember_wandb_runs,
    start_wandb,
)
from commands.study import study_main
from core.errors import DataError, StorageError
from lightning_modules.checkpoints import DATA_CONFIG_KEY, AtomicCheckpointIO, resume_config
from lightning_modules.components.guard import DivergenceError
from lightning_modules.family import family_class


class LogConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` next to the logs, record the whole CLI config as every logger's run config, and keep
    the data config in every checkpoint (so that a resumed run can refuse other data settings)."""

    @functools.cached_property
    def _as_dict(self) -> dict:
        """The whole config as plain data, dumped once (the config does not change during a run, and a dump costs
        ~150 ms: it ran at every checkpoint save)."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self._as_dict)

    def on_save_checkpoint(self, trainer: Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[DATA_CONFIG_KEY] = self._as_dict.get("data")

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
    What a recipe leaves unset (folders, loggers, checkpointing, LR monitoring) is filled in for ``fit``, named
    after ``recipe`` (:mod:`commands.run_defaults`); a config file's ``defaults:`` is read before it
    (:func:`with_defaults`).
    """

    def __init__(self, *args, recipe: str = PROJECT, **kwargs) -> None:
        self.recipe = recipe
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") != "fit":
            return super()._parse_ckpt_path()  # validate / test: Lightning's (the checkpoint's hparams apply)
        apply_run_defaults(self.config.fit, self.recipe)
        resume_config(self.config.fit, warn=rank_zero_warn)
        check_run_folders(self.config.fit)

    def parse_arguments(self, parser, args) -> None:
        """Parse with each config file's ``defaults`` read first (:func:`with_defaults`)."""
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(with_defaults(sys.argv[1:] if args is None else list(args)))

    def add_arguments_to_parser(self, parser) -> None:
        # read by with_defaults before parsing; hidden (SUPPRESS), so --print_config and config.yaml show the
        # composed result and never name the file again
        parser.add_argument("--defaults", type=str | None, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--startup_timeout", type=float, default=300.0,
                            help="seconds the processes of a distributed run wait for each other at start-up before "
                                 "giving up with the ranks that never joined")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # e.g. max_steps -5, or devices against SLURM's tasks
            raise DataError(f"trainer: {err}") from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the config chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(background=True)
        check_trainer_environment(trainer)
        subcommand = self.config.get("subcommand")
        bound_startup(trainer.strategy, self.config[subcommand].startup_timeout)
        if subcommand == "fit":
            start_wandb(trainer.loggers)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:  # Lightning stopped on SIGTERM: a SystemExit with no code, i.e. exit 0
            stop = next((cb for cb in self.trainer.callbacks if isinstance(cb, preemption.PreemptionCheckpoint)),
                        None)
            if stop is None or stop.step is None:  # validate / test, or a recipe without the callback
                raise preemption.Preempted(f"stopped by SIGTERM during {subcommand} at step "
                                           f"{self.trainer.global_step}; no checkpoint was saved",
                                           signal.SIGTERM) from None
            raise preemption.Preempted(stop.message(), stop.signum or signal.SIGTERM) from None
        finally:
            if subcommand == "fit":
                remember_wandb_runs(self.trainer.loggers)


#: The commands beside LightningCLI's fit / validate / test, each ``function(argv)``: the one place they are named.
COMMANDS = {"export": export_main, "evaluate": evaluate_main, "interpret": interpret_main, "study": study_main,
            "push": push_main, "mine": mine_main}


def moved_options(class_path: str) -> Mapping[str, str]:
    """The init arguments the module of ``class_path`` (or bare class name) no longer takes where they were: old
    name -> new one, as its family says (an old recipe or command line is told the new key)."""
    family = family_class(class_path)
    return family.moved_options if family is not None else {}


def read_config(path: str) -> dict:
    """The YAML of a ``--config`` file ({} when it cannot be opened or holds no mapping: the parser names that
    itself), or a DataError naming the file, line and column when it is not YAML (jsonargparse would print its whole
    usage first and name the file ``<unicode string>``)."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError:
        return {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        tabs = " (YAML indents with spaces, not tabs)" if "\\t" in problem else ""
        raise DataError(f"{path}{where}: not valid YAML: {problem}{tabs}") from None
    return config if isinstance(config, dict) else {}


def base_configs(path: str, chain: tuple[str, ...] = ()) -> list[str]:
    """The config files ``path`` builds on, first to last: its ``defaults`` (a path relative to its own folder,
    e.g. ``defaults/sae.yaml`` in configs/), that file's own defaults before it, and so on."""
    base = read_config(path).get("defaults")
    if not base:
        return []
    chain = chain or (os.path.normpath(path),)
    full = os.path.normpath(os.path.join(os.path.dirname(path), str(base)))
    if not os.path.isfile(full):
        raise DataError(f"{path}: defaults: {base} is not a file ({full}; the path is relative to the config's folder)")
    if full in chain:
        raise DataError(f"{path}: defaults: {base} builds on itself ({' -> '.join((*chain, full))})")
    return [*base_configs(full, (*chain, full)), full]


def with_defaults(args: list[str]) -> list[str]:
    """``args`` with one more ``--config`` before each config file that names ``defaults``: the shared settings it
    builds on (configs/defaults/), so that a recipe holds only its differences. Later files and the command line
    still win, and a list the recipe extends with ``callbacks+:`` keeps the defaults' entries first."""
    if any(arg == "--defaults" or arg.startswith("--defaults=") for arg in args):
        raise DataError("--defaults is read from config files only: give the file as one more --config before the "
                        "recipe")
    out, done = [], 0
    for i, width, path in config_paths(args):
        out += args[done:i] + [f"--config={base}" for base in base_configs(path)] + args[i:i + width]
        done = i + width
    return out + args[done:]


def check_moved_options(args: list[str]) -> None:
    """Refuse options a module no longer takes at that place, naming the new key (before jsonargparse reports
    them as merely "not accepted"). Each ``--config`` is read over the files it builds on (``defaults:``), so a
    recipe that names its module only through them is checked against that module; a config file that is not YAML
    is named by :func:`read_config`."""
    models = set()
    for _, _, recipe in config_paths(args):
        class_path = ""
        for path in [*base_configs(recipe), recipe]:
            model = read_config(path).get("model") or {}
            if not isinstance(model, dict):
                continue  # `model: SomeModule` as a plain class name: no init_args here
            class_path = str(model.get("class_path") or class_path)
            init_args, moved = model.get("init_args"), moved_options(class_path)
            for key in init_args if isinstance(init_args, dict) else ():
                if key in moved:
                    raise DataError(f"{path}: model.init_args.{key} is now model.init_args.{moved[key]} "
                                    f"({class_path.rpartition('.')[2]} takes its config whole)")
        models.add(class_path)
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            models.add(args[i + 1])
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--model.")):
        key = flag.removeprefix("--model.").removeprefix("init_args.")
        for class_path in models:
            moved = moved_options(class_path)
            if key in moved:
                raise DataError(f"{flag} is now --model.init_args.{moved[key]} ({class_path.rpartition('.')[2]} "
                                "takes its config whole)")


def main(argv: list[str] | None = None) -> EmbedLabCLI | None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return None
    check_moved_options(args)
    if args[:1] == ["fit"]:
        preemption.arm()  # until the training loop owns SIGTERM: a stop while the data is prepared is named too
    return EmbedLabCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=argv,
        recipe=recipe_name(args),
    )


def user_error(err: BaseException) -> str | None:
    """The one-line message of a bad input or option, or None for anything else (a bug keeps its traceback): a
    DataError or missing file, or a module's ValueError that jsonargparse wrapped while instantiating the config
    (its report buries the message under the Union subtypes it tried)."""

    text = str(err)
    if text.startswith("Does not validate against any of the Union subtypes"):
        which = re.search(r"Given value: Namespace\(class_path='([^']+)'", text)
        cause = err
        while cause.__cause__ is not None and str(cause).startswith("Does not validate"):
            cause = cause.__cause__  # nested configs (an SAE's `sae`) wrap the module's message once more
        reasons = [str(cause)] if cause is not err and not str(cause).startswith("Does not validate") else [
            line[4:] for line in text.splitlines()
            if line.startswith("  - ") and not line.startswith("  - Expected a <class 'NoneType'>")]
        return f"{which.group(1) + ': ' if which else ''}{'; '.join(reasons)}" if reasons else None
    known = (DataError, FileNotFoundError, FileExistsError, StorageError, DivergenceError)
    return text if isinstance(err, known) else None


if __name__ == "__main__":  # the guard matters: strategy="ddp" re-launches this script (docs/pitfalls.md #9)
    try:
        main()
    except preemption.Preempted as stop:  # exit 128 + signal: a scheduler or pipeline sees a killed job, not a done one
        if rank_zero_only.rank == 0:
            sys.stderr.write(f"error: {stop}\n")
        sys.exit(stop.exit_code)
    except (ValueError, OSError, RuntimeError) as err:
        message = user_error(err)
        if message is None or os.environ.get("EMBEDLAB_TRACEBACK"):
            raise
        # one write per line (stderr is line-buffered): under DDP every rank reports, and sys.exit(text) writes the
        # text and its newline separately, so another rank's line could land in the middle of this one
        sys.stderr.write(f"error: {message}\n(EMBEDLAB_TRACEBACK=1 shows the traceback)\n")
        sys.exit(1)
