"""Stopping on a scheduler's signal without losing work: a checkpoint of the step reached, a non-zero exit.

Schedulers stop a job with SIGTERM (``scancel``, a preemption without ``--signal``, a Kubernetes eviction) and some
send SIGUSR1 first (``#SBATCH --signal=SIGUSR1@90``). Lightning 2.6 answers SIGTERM by leaving the loop with a
``SIGTERMException`` (a ``SystemExit`` with no code): the process exits 0 without saving the steps since the last
checkpoint, and the scheduler marks the job COMPLETED. Here:

- :class:`PreemptionCheckpoint` (every ``fit`` gets one, :mod:`commands.run_defaults`) saves a complete checkpoint
  of the step reached when the loop stops on the signal: ``last.ckpt`` in the checkpoint folder, which
  ``--ckpt_path last`` resumes. Under SLURM with auto-requeue (Lightning's ``SLURMEnvironment``) it saves
  Lightning's ``hpc_ckpt_<n>.ckpt`` instead and requeues the job once (``scontrol requeue``; a failure is
  named), and the requeued job resumes from it by itself. SIGUSR1 is treated as SIGTERM unless Lightning's SLURM
  requeue owns it.
- ``train.py`` turns the stop into :class:`Preempted`: one line saying where the checkpoint is, exit code
  ``128 + signal`` (143 for SIGTERM), which schedulers and pipelines read as "killed", not "done".
- Before training starts (parsing, building the activation cache, a module's ``on_fit_start`` such as MCR2's
  k-means), :func:`arm` makes the signal raise :class:`Preempted`, so a cache build stops between writes (its
  shards are whole and a rerun reuses them) and the loggers are closed, instead of dying silently or (with
  Lightning's handler) running on to the end of setup. From the first training step the loop owns it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from core.files import shown
from lightning_modules.checkpoints import AtomicCheckpointIO, finish_checkpoint_writes

#: The signals a scheduler stops a job with.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """The run was stopped by a signal. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way swallows it. ``exit_code`` is what the process should exit with (128 + the signal's number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _raise_preempted(signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    raise Preempted(f"stopped by {name} before training started (nothing trained yet; an activation cache being "
                    "built keeps its finished shards, which a rerun reuses)", signum)


def arm() -> None:
    """Until Lightning's loop owns the signals, SIGTERM (and SIGUSR1, when nobody handles it) raise
    :class:`Preempted` (see the module docstring). Only in the main thread (signals can be set nowhere else)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, None, _raise_preempted):
            try:
                signal.signal(signum, _raise_preempted)
            except ValueError:  # not the main thread
                return


def disarm(signum: int) -> None:
    """Give ``signum`` back to its default (Lightning registers its SLURM requeue handler only where none is set)."""
    if signal.getsignal(signum) is _raise_preempted:
        signal.signal(signum, signal.SIG_DFL)


def foreground(trainer: pl.Trainer):
    """A context in which the trainer's checkpoint saves are on disk when they return (see
    :class:`~lightning_modules.checkpoints.AtomicCheckpointIO`); a no-op for other checkpoint writers."""
    checkpoint_io = trainer.strategy.checkpoint_io
    return checkpoint_io.in_foreground() if isinstance(checkpoint_io, AtomicCheckpointIO) else contextlib.nullcontext()


class PreemptionCheckpoint(pl.Callback):
    """Save a complete checkpoint of the step reached when SIGTERM (or SIGUSR1 outside SLURM's auto-requeue) stops
    ``fit``; see the module docstring. ``saved`` / ``requeued`` / ``signum`` say what happened, for ``train.py``'s
    message."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved: Path | None = None
        self.requeued: str | None = None  # the SLURM job id, once requeued
        self.requeue_failed: tuple[str, str] | None = None  # (job id, why) when `scontrol requeue` failed
        self.step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        slurm = self._slurm(trainer)
        if slurm is not None:  # before Lightning registers its handlers (after setup and on_fit_start)
            disarm(slurm.requeue_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's SIGTERM handler calls the one it found (ours, raising Preempted) after its own: not any more,
        # the loop stops on its flag from here on
        lightning_term = signal.getsignal(signal.SIGTERM)
        chained = getattr(lightning_term, "signal_handlers", None)
        if isinstance(chained, list):
            chained[:] = [h for h in chained if h is not _raise_preempted]
        elif lightning_term is _raise_preempted:
            lightning_term = None
        slurm = self._slurm(trainer)
        usr1 = slurm.requeue_signal if slurm is not None else signal.SIGUSR1
        lightning_usr1 = signal.getsignal(usr1)

        def on_term(signum, frame):
            self.signum = self.signum or signum
            if callable(lightning_term):
                lightning_term(signum, frame)

        def on_usr1(signum, frame):
            if slurm is not None and callable(lightning_usr1):  # Lightning's: hpc checkpoint + requeue, goes on
                self.requeued = self._job_id()
                with foreground(trainer):  # the checkpoint on disk before Lightning's handler requeues the job
                    lightning_usr1(signum, frame)
            else:  # nobody owns it: a stop like SIGTERM
                on_term(signum, frame)

        try:
            signal.signal(signal.SIGTERM, on_term)
            signal.signal(usr1, on_usr1)
        except ValueError:  # not the main thread: Lightning's handlers stay as they are
            pass

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.signum = self.signum or signal.SIGTERM
        self.step = trainer.global_step
        if trainer.checkpoint_callback is None:  # checkpointing is off: nothing saved, nothing requeued
            return
        slurm = self._slurm(trainer)
        connector = trainer._checkpoint_connector
        if slurm is not None:
            # Lightning's resume under SLURM reads the newest hpc_ckpt_<n>.ckpt in default_root_dir
            self.saved = Path(connector.hpc_save_path(trainer.default_root_dir))
            trainer.save_checkpoint(self.saved)
            finish_checkpoint_writes(trainer)  # on disk before the requeue ends this job
            if self.requeued is None and trainer.is_global_zero:  # SIGTERM without SIGUSR1 first: requeue once
                self._requeue(self._job_id())
            return
        else:
            callback = trainer.checkpoint_callback
            folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(
                trainer.default_root_dir)
            self.saved = folder / "last.ckpt"
        trainer.save_checkpoint(self.saved)
        finish_checkpoint_writes(trainer)

    def _requeue(self, job: str) -> None:
        """``scontrol requeue JOB``, as Lightning's SLURM handler runs it, but its failure is kept for the message
        (Lightning only logs it)."""
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            failure = None if done.returncode == 0 else (done.stderr.strip().splitlines() or [""])[-1] or \
                f"exit code {done.returncode}"
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        self.requeued, self.requeue_failed = (job, None) if failure is None else (None, (job, failure))

    @staticmethod
    def _slurm(trainer: pl.Trainer) -> SLURMEnvironment | None:
        environment = trainer._accelerator_connector.cluster_environment
        return environment if isinstance(environment, SLURMEnvironment) and environment.auto_requeue else None

    @staticmethod
    def _job_id() -> str:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID", "?")

    def message(self) -> str:
        """What ``train.py`` prints: the signal, the step, where the checkpoint is and how the run resumes."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        head = f"stopped by {name} at step {self.step}"
        if self.saved is None:
            return f"{head}; no checkpoint was saved (checkpointing is off)"
        if self.requeue_failed:
            job, why = self.requeue_failed
            return (f"{head}: checkpoint {shown(self.saved)}; requeueing SLURM job {job} failed ({why}): submit it "
                    "again with the same default_root_dir and it resumes from that checkpoint by itself")
        if self.requeued:
            return (f"{head}: checkpoint {shown(self.saved)}; SLURM job {self.requeued} was requeued and resumes "
                    "from it by itself")
        return f"{head}: checkpoint {shown(self.saved)} holds that step; `--ckpt_path last` resumes it"
