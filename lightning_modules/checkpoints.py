"""Checkpoints that survive faults: written atomically, checked before they are resumed from, found wherever the
loggers put them.

Lightning writes a checkpoint in place, so a full disk or a killed job leaves a truncated file at its final path,
which ``--ckpt_path last`` then picks. Here a checkpoint is written to a hidden temporary file, flushed to disk and
renamed over its final name (a rename is atomic on POSIX file systems): the final path holds the old checkpoint or
the new one, never part of one. Lightning has no such option (its ``_atomic_save`` buffers in memory, then writes
in place), so it is done here, as a ``CheckpointIO`` plugin that ``train.py`` installs.

A torch checkpoint is a zip archive whose last bytes are the central directory: :func:`damage` reads the archive and
every entry's CRC, which finds truncation and corruption without unpickling anything.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import glob
import importlib
import inspect
import io
import os
import socket
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.core.saving import _load_state
from pytorch_lightning.utilities.migration import pl_legacy_patch
from pytorch_lightning.utilities.migration.utils import _pl_migrate_checkpoint

from core.errors import DataError, StorageError, unwritable
from core.files import write_atomic


class ArtifactError(StorageError):
    """A checkpoint, export or cache file could not be written or read; the message names it and what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic (temporary file + fsync + rename) and whose failures (a full
    disk, a read-only folder) name the file and say that the earlier checkpoints are intact.

    With ``background=True`` (what ``train.py`` installs) a save takes a snapshot of the checkpoint and returns
    (:func:`snapshot`: each tensor storage copied once to host memory, the lists and dicts around them copied, since
    training changes them right after); a background thread serialises it (pickling and the zip entries' CRCs:
    15 ms of the 24 MB checkpoint of a tiny BERT on one CPU thread, against 5 ms for the copy) and writes, flushes
    and renames it while training goes on. The host memory of the last snapshots written (up to
    :attr:`MAX_SNAPSHOTS` checkpoints' worth) is filled by the next ones (allocating it anew costs 3x the copy on a
    CPU, in page faults). Removals of old checkpoints queue behind the
    writes, in order. At most :attr:`MAX_SNAPSHOTS` snapshots are held at once (a save waits for the oldest write
    beyond that), so a step that saves its best and ``last.ckpt`` does not wait for the first; a load and the end of
    the run (``teardown``, before ``on_fit_end`` reads the best checkpoint) wait for every job; a failed job raises
    at the next save, removal or wait, naming its file. A checkpoint holding what a snapshot does not copy (a tensor
    subclass, a sparse tensor, an object ``deepcopy`` refuses) is serialised in memory at the save instead. Not
    Lightning's ``AsyncCheckpointIO`` (experimental): it clones the tensors on their device (the model and optimiser
    state twice in GPU memory during a write), lets removals and loads run ahead of the pending write, and has no
    wait short of shutting its thread down. A job about to be requeued or stopped must call
    :meth:`wait` (``callbacks/preemption.py`` does) or save with :meth:`in_foreground`.
    """

    MAX_SNAPSHOTS = 2

    def __init__(self, background: bool = False) -> None:
        super().__init__()
        self.background = background
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        # (job, the host storages its snapshot fills, or None for a removal); storages of the last written snapshot
        self._jobs: collections.deque[tuple[concurrent.futures.Future, list | None]] = collections.deque()
        self._spare: list[torch.UntypedStorage] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote file systems (s3://...) have no rename: Lightning's own writer
            self.wait()
            return super().save_checkpoint(checkpoint, path, storage_options)
        if not self.background:
            self.wait()
            return write_atomically(checkpoint, Path(path))
        self._settle(self.MAX_SNAPSHOTS - 1)
        storages: list[torch.UntypedStorage] = []
        copied = snapshot(checkpoint, self._spare, storages)
        if copied is None:  # serialised here instead: the bytes are the snapshot
            copied = io.BytesIO()
            torch.save(checkpoint, copied)
        self._submit(storages, write_atomically, copied, Path(path))

    def _submit(self, storages: list | None, fn, *args) -> None:
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._jobs.append((self._writer.submit(fn, *args), storages))

    def _settle(self, snapshots: int | None) -> None:
        """Collect the finished jobs, oldest first, raising the first failure; then wait, oldest first, until at most
        ``snapshots`` unfinished jobs hold a snapshot (None: until every job is done)."""
        while self._jobs:
            job, storages = self._jobs[0]
            held = sum(s is not None for j, s in self._jobs if not j.done())
            if not (job.done() or snapshots is None or held > snapshots):
                return
            self._jobs.popleft()
            job.result()
            if storages:  # written: its host memory takes the next snapshots (a step's best and last.ckpt both)
                self._spare = keep_newest([*storages, *self._spare], self.MAX_SNAPSHOTS * nbytes(storages))

    def wait(self) -> None:
        """Return once every checkpoint written and removed in the background is on disk or gone; raise the first
        failure."""
        self._settle(None)

    @contextlib.contextmanager
    def in_foreground(self):
        """Saves inside the block are written before they return (a signal handler that requeues right after); the
        pending background jobs are finished first."""
        self.wait()
        background, self.background = self.background, False
        try:
            yield
        finally:
            self.background = background

    def load_checkpoint(self, *args, **kwargs) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path) -> None:
        if not self.background or "://" in str(path):
            self.wait()
            return super().remove_checkpoint(path)
        self._settle(self.MAX_SNAPSHOTS)  # collects the finished jobs (and their failures) without waiting
        self._submit(None, super().remove_checkpoint, path)

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            self._jobs.clear()
            self._spare = []
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None


class _NoSnapshot(Exception):
    """Something in a checkpoint that :func:`snapshot` does not copy."""


def snapshot(checkpoint: dict[str, Any], spare: list[torch.UntypedStorage] | None = None,
             storages: list[torch.UntypedStorage] | None = None) -> dict[str, Any] | None:
    """A copy of ``checkpoint`` that training cannot change, for a background thread to serialise: each tensor's
    storage copied once to host memory (tensors sharing one, as tied weights do, still share it, as ``torch.save``
    keeps them), every container and value around them deep-copied. A storage of ``spare`` of the same size is
    filled (and taken out of the list) rather than a new one allocated; each host storage used is appended to
    ``storages``. None (and ``spare`` and ``storages`` as they were) when it holds what this does not copy
    faithfully: a tensor subclass (``Parameter``, ``DTensor``), a sparse or quantised tensor, one that requires grad,
    or an object ``copy.deepcopy`` refuses. Done here because torch has no copy-on-write snapshot of a state dict
    (``torch.distributed.checkpoint``'s async save stages to host memory the same way, for its own format)."""
    copies: dict[tuple, torch.UntypedStorage] = {}
    memo: dict[int, Any] = {}
    free: dict[int, list[torch.UntypedStorage]] = {}
    for storage in spare or []:
        free.setdefault(storage.nbytes(), []).append(storage)

    def host_copy(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        reuse = free.get(storage.nbytes())
        target = reuse.pop() if reuse else torch.UntypedStorage(storage.nbytes())
        as_bytes(target).copy_(as_bytes(storage))
        if storages is not None:
            storages.append(target)
        return target

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor or value.layout != torch.strided or value.is_quantized \
                    or value.requires_grad:
                raise _NoSnapshot
            storage = value.untyped_storage()
            key = (value.device, storage.data_ptr(), storage.nbytes())
            if key not in copies:
                copies[key] = host_copy(storage)
            memo[id(value)] = torch.empty(0, dtype=value.dtype).set_(
                copies[key], value.storage_offset(), value.size(), value.stride())
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(k)
                visit(v)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                visit(v)

    used = len(storages) if storages is not None else 0
    try:
        visit(checkpoint)
        copied = copy.deepcopy(checkpoint, memo)
    except Exception:  # noqa: BLE001 - anything deepcopy cannot copy is serialised in the foreground instead
        copied = None
        if storages is not None:  # the host memory filled so far goes back to the pool
            for storage in storages[used:]:
                free.setdefault(storage.nbytes(), []).append(storage)
            del storages[used:]
    if spare is not None:
        spare[:] = [storage for same_size in free.values() for storage in same_size]
    return copied


def nbytes(storages: list[torch.UntypedStorage]) -> int:
    return sum(storage.nbytes() for storage in storages)


def keep_newest(storages: list[torch.UntypedStorage], limit: int) -> list[torch.UntypedStorage]:
    """The leading ``storages`` that fit in ``limit`` bytes together (the pool of host memory kept for snapshots)."""
    kept, total = [], 0
    for storage in storages:
        total += storage.nbytes()
        if total > limit:
            break
        kept.append(storage)
    return kept


def as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A storage's bytes as a uint8 tensor on its device (a copy between two of them works across devices)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def write_atomically(checkpoint: dict[str, Any] | io.BytesIO, path: Path) -> None:
    """Write a checkpoint (or its bytes, already serialised) to ``path`` atomically (:func:`write_atomic`); a failure
    raises :class:`ArtifactError` naming ``path``. Then removes dead writers' temporaries beside it."""
    data = checkpoint.getbuffer() if isinstance(checkpoint, io.BytesIO) else lambda f: torch.save(checkpoint, f)
    try:
        write_atomic(path, data, what="checkpoint ")
    except StorageError as err:
        raise ArtifactError(f"{err}. The checkpoints written before it are intact (resume with --ckpt_path last "
                            "once the cause is fixed)") from None
    remove_dead_temporaries(path.parent)


def finish_checkpoint_writes(trainer) -> None:
    """Wait until every checkpoint save and removal the trainer queued in the background is done; see
    :class:`AtomicCheckpointIO`."""
    checkpoint_io = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)
    if isinstance(checkpoint_io, AtomicCheckpointIO):
        checkpoint_io.wait()


def remove_dead_temporaries(folder: Path) -> None:
    """Delete the temporary checkpoint files in ``folder`` that writers on this machine killed mid-write left behind
    (``.<name>.ckpt.<host>-<pid>.tmp`` whose process is gone): a checkpoint's worth of disk each, never read. Another
    machine's are left alone: on a shared file system its process cannot be looked up from here."""
    host = socket.gethostname()
    for tmp in folder.glob(f".*.ckpt.{glob.escape(host)}-*.tmp"):
        pid = tmp.name[:-len(".tmp")].rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: its write is over for good
            tmp.unlink(missing_ok=True)
        except PermissionError:  # another user's process, alive
            pass


def damage(path: str | Path) -> str | None:
    """Why ``path`` is not a complete torch checkpoint (truncated, corrupt, not one), or None when it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()  # reads every entry and checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        return f"truncated or not a checkpoint ({type(err).__name__}: {err})"
    if bad is not None:
        return f"corrupt (entry {bad} fails its CRC check)"
    if not any(n.endswith("data.pkl") for n in names):
        return "not a torch checkpoint (no data.pkl in the archive)"
    return None


def candidates(roots: Iterable[str | Path]) -> list[Path]:
    """Every ``*.ckpt`` under ``roots``, newest first (W&B's own copies under ``wandb/`` left out)."""
    found = {p.resolve() for r in roots if Path(r).is_dir() for p in Path(r).rglob("*.ckpt")
             if "wandb" not in p.relative_to(r).parts and p.is_file()}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_complete(roots: Iterable[str | Path], warn=print) -> Path | None:
    """The newest complete checkpoint under ``roots``; each damaged newer one is skipped with a warning naming it."""
    for path in candidates(roots):
        reason = damage(path)
        if reason is None:
            return path
        warn(f"skipping checkpoint {path}: {reason}")
    return None


def check_complete(path: str | Path, roots: Iterable[str | Path] = ()) -> Path:
    """``path`` itself when it is a complete checkpoint, else a :class:`ArtifactError` naming it (and the newest
    complete checkpoint beside it, if any)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    reason = damage(path)
    if reason is None:
        return path
    other = newest_complete([path.parent, *roots], warn=lambda _: None)
    hint = f"; the newest complete one is {other}: pass it, or --ckpt_path last" if other else ""
    raise ArtifactError(f"checkpoint {path} is {reason}{hint}")


# ---------------------------------------------------------------------------------------------------- resuming
DATA_CONFIG_KEY = "embedlab_data_config"
#: Where a checkpoint names the LightningModule class that wrote it (``base.RecordsClassPath``).
CLASS_PATH_KEY = "embedlab_class_path"
LOGGERS_KEY = "embedlab_loggers"

#: Options a resumed run may change: they change how fast a step runs or how often it is checked, not what it
#: computes (GradCache and gradient checkpointing are exact). Every other model or data option must be the
#: checkpoint's, or the run would be a different run under the old run's name.
MODEL_SWITCHES = {"compile", "gradient_checkpointing", "attn_implementation", "mini_batch_size",
                  "check_finite_every_n_steps"}
DATA_SWITCHES = {"num_workers", "pin_memory", "persistent_workers", "pad_to_multiple_of", "encode_batch_size",
                 "encode_device"}


def config_entries(value) -> list:
    """A config's logger / callbacks value as a list of ``class_path`` namespaces."""
    if value is None or isinstance(value, bool):
        return []
    items = value if isinstance(value, list) else [value]
    return [v for v in items if hasattr(v, "class_path")]


def _plain(value):
    """A config or checkpoint value as comparable plain data (namespaces as dicts, numbers as floats)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _shown(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def search_roots(cfg) -> list[Path]:
    """Where a fit config's checkpoints can be: the trainer's root, the loggers' save_dir, ModelCheckpoint dirpaths."""
    trainer = cfg.trainer
    roots = [trainer.get("default_root_dir")]
    roots += [lg.init_args.get("save_dir") for lg in config_entries(trainer.get("logger")) if hasattr(lg, "init_args")]
    roots += [cb.init_args.get("dirpath") for cb in config_entries(trainer.get("callbacks"))
              if cb.class_path.endswith("ModelCheckpoint")]
    unique = list(dict.fromkeys(Path(r) for r in roots if r))
    return unique or [Path.cwd() / "lightning_logs"]


def changed_options(cfg, ckpt: dict) -> list[str]:
    """``name (checkpoint X, now Y)`` for each model or data option that differs from what ``ckpt`` was trained
    with, except :data:`MODEL_SWITCHES` / :data:`DATA_SWITCHES` and options left null (filled from the checkpoint)."""
    out = []
    for part, recorded, switches in (("model", ckpt.get("hyper_parameters"), MODEL_SWITCHES),
                                     ("data", (ckpt.get(DATA_CONFIG_KEY) or {}), DATA_SWITCHES)):
        if not recorded or cfg.get(part) is None:
            continue
        if part == "model":
            recorded = {"class_path": recorded.get("_class_path"), "init_args": recorded}
        now, then = _plain(cfg[part]), _plain(recorded)
        if then.get("class_path") and now.get("class_path") != then.get("class_path"):
            out.append(f"{part}.class_path (checkpoint {then['class_path']}, now {now.get('class_path')})")
            continue
        now_args, then_args = now.get("init_args") or {}, then.get("init_args") or {}
        for key in sorted(set(then_args) & set(now_args) - switches):
            out.extend(_differences(f"{part}.init_args.{key}", now_args[key], then_args[key]))
    return out


def _differences(name: str, now, then) -> list[str]:
    """``name (checkpoint X, now Y)`` where ``now`` is set and differs; nested configs (an SAE's ``sae``) are
    compared field by field, so a field left null (``d_in``, taken from the data) is not a change."""
    if isinstance(now, dict) and isinstance(then, dict):
        return [d for key in sorted(set(now) & set(then)) for d in _differences(f"{name}.{key}", now[key], then[key])]
    if now is not None and now != then:
        return [f"{name} (checkpoint {_shown(then)}, now {_shown(now)})"]
    return []


def checkpoint_class(ckpt: dict) -> type | None:
    """The class a checkpoint names (:data:`CLASS_PATH_KEY`, else LightningCLI's ``_class_path``), imported; None
    when it names none."""
    class_path = ckpt.get(CLASS_PATH_KEY) or (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if not class_path:
        return None
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def recorded_hparams(ckpt: dict) -> dict:
    """A checkpoint's hyper-parameters as its module takes them now: its class's ``upgrade_hparams`` (options an
    older version kept elsewhere, e.g. an SAE's flat config fields, now nested under ``sae``) applied. Resuming and
    loading both read them here, so an older checkpoint resumes with the settings it was trained with."""
    recorded = dict(ckpt.get("hyper_parameters") or {})
    try:
        upgrade = getattr(checkpoint_class(ckpt), "upgrade_hparams", None)
    except (ImportError, AttributeError):  # a class that no longer exists: whoever builds it names it
        upgrade = None
    return {**recorded, **upgrade(recorded)} if upgrade is not None else recorded


def _fill_unset(args, recorded: dict) -> None:
    """Options left null in ``args`` (a config namespace) take the checkpoint's recorded value, nested ones too."""
    for key, value in recorded.items():
        if key not in args or value is None:
            continue
        if args[key] is None:
            args[key] = value
        elif isinstance(value, dict) and hasattr(args[key], "items"):
            _fill_unset(args[key], value)


def resume_config(cfg, warn=print) -> Path | None:
    """Resolve a fit config's ``ckpt_path`` before anything is built, in place, and return the checkpoint.

    - ``last``: the newest complete checkpoint under :func:`search_roots`, damaged newer ones skipped with a
      warning; none at all: a warning, and training starts at step 0 (as a first SLURM job must).
    - a path: it must be a complete checkpoint (else a :class:`ArtifactError` naming it).
    - model and data options that differ from the checkpoint's are refused (:func:`changed_options`); options
      left null take the checkpoint's value, so the recorded config is what runs.
    - the run continues where it was: W&B loggers without an id take the checkpoint's run id, and
      ModelCheckpoint callbacks without a dirpath write beside the resumed checkpoint (so its best-k state is
      restored, and the end-of-fit export goes to the same run folder), unless that folder cannot be written
      (a shared read-only store): then into the run's own folder, with a warning saying so.
    ``best``, ``hpc``, ``registry`` and null are Lightning's to resolve and are left alone.
    """
    given = cfg.get("ckpt_path")
    if given is None or given in ("best", "hpc", "registry"):
        return None
    roots = search_roots(cfg)
    if given == "last":
        path = newest_complete(roots, warn)
        if path is None:
            warn(f"--ckpt_path last: no complete checkpoint under {', '.join(map(str, roots))}; training starts "
                 "at step 0")
            cfg.ckpt_path = None
            return None
    else:
        path = check_complete(given, roots)
    ckpt = {**read_checkpoint(path).content}
    ckpt["hyper_parameters"] = recorded_hparams(ckpt)
    changed = changed_options(cfg, ckpt)
    if changed:
        raise DataError(f"--ckpt_path {path} resumes a run with the settings it was trained with, and these "
                        f"differ from them: {'; '.join(changed)}. Drop them to resume, or start a new run without "
                        "--ckpt_path")
    cfg.ckpt_path = str(path)
    recorded = ckpt.get("hyper_parameters") or {}
    init_args = cfg.model.get("init_args") if cfg.get("model") is not None else None
    if init_args is not None:
        _fill_unset(init_args, recorded)
    wandb_ids = [r["version"] for r in ckpt.get(LOGGERS_KEY, []) if r["class"] == "WandbLogger" and r["version"]]
    for logger in config_entries(cfg.trainer.get("logger")):
        args = logger.init_args
        if logger.class_path.endswith("WandbLogger") and wandb_ids and not (args.get("id") or args.get("version")) \
                and not os.environ.get("WANDB_RUN_ID"):
            args.id = wandb_ids.pop(0)
    unset = [cb for cb in config_entries(cfg.trainer.get("callbacks"))
             if cb.class_path.endswith("ModelCheckpoint") and not cb.init_args.get("dirpath")]
    if unset and not path.name.startswith("hpc_ckpt"):
        reason = unwritable(path.parent)
        if reason is None:
            for callback in unset:
                callback.init_args.dirpath = os.path.realpath(path.parent)
        else:  # a shared read-only store: the steps must not be lost at the first save
            warn(f"the checkpoint folder {path.parent} cannot be written ({reason}): this run writes its new "
                 "checkpoints into its own run folder")
    warn(f"resuming from {path} (global step {ckpt.get('global_step')})")
    return path


# ------------------------------------------------------------------------------------------- the one reader
#: Training-speed switches turned off when a checkpoint is rebuilt for export or evaluation (a run compiled on a
#: GPU must not spend minutes compiling on the CPU that exports it).
INFERENCE_OVERRIDES = {"compile": False, "gradient_checkpointing": False}


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A Lightning checkpoint as :func:`read_checkpoint` opened it: what every reader of a checkpoint (export, the
    cards, evaluate, the end-of-fit callbacks, resuming) takes, so that a file is unpickled once and handed on.

    Attributes:
        path: the file.
        content: the checkpoint's dict, memory-mapped (tensors are read from disk only when used); not to be
            modified (the same object is handed to every reader of this file).
    """

    path: Path
    content: dict

    @property
    def step(self) -> int:
        """The optimiser steps the checkpoint was written at."""
        return int(self.content.get("global_step", 0))

    @property
    def hparams(self) -> dict:
        """The module's hyper-parameters as its class takes them now (:func:`recorded_hparams`)."""
        return recorded_hparams(self.content)

    @property
    def callback_states(self) -> list[dict]:
        """The callbacks' saved states (ModelCheckpoint's best-k scores, STSEvaluator's history, ...)."""
        return [s for s in (self.content.get("callbacks") or {}).values() if isinstance(s, dict)]

    def module_class(self) -> type:
        """The LightningModule class that wrote the checkpoint (``RecordsClassPath``; LightningCLI's
        ``_class_path``)."""
        cls = checkpoint_class(self.content)
        if cls is None:
            raise ValueError(f"{self.path}: the checkpoint does not say which LightningModule wrote it (written by "
                             "another framework?); load it with YourModule.load_from_checkpoint instead")
        return cls

    def module(self):
        """The trained module rebuilt on CPU from this content (no second read of the file), without its
        training-speed switches (:data:`INFERENCE_OVERRIDES`), with options an older version kept elsewhere put
        where the class takes them (:func:`recorded_hparams`)."""
        cls = self.module_class()
        accepted = inspect.signature(cls.__init__).parameters
        overrides = {k: v for k, v in INFERENCE_OVERRIDES.items() if k in accepted}
        before = self.content.get("hyper_parameters") or {}
        overrides.update({k: v for k, v in self.hparams.items() if k in accepted and k not in before})
        # Lightning's load_from_checkpoint minus its torch.load, through its private _load_state and migration
        # (no public call takes an opened checkpoint; .ci/floors runs this at the pytorch-lightning floor). They
        # update the dict they are given, hence the copy
        content = _pl_migrate_checkpoint({**self.content, "hyper_parameters": {**before, **overrides}},
                                         checkpoint_path=self.path)
        return _load_state(cls, content, **overrides)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open the Lightning checkpoint at ``path`` (memory-mapped) once: hand the :class:`Checkpoint` on rather than
    the path. Nothing is kept between calls: a kept memory map would hold a replaced ``last.ckpt``'s disk space for
    the rest of the run.

    Raises:
        FileNotFoundError: ``path`` is missing or a folder.
        DataError: the file is not a readable torch file (a text file, a truncated download).
        ValueError: it is one, but not a Lightning checkpoint (no ``state_dict``).
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} is a folder; give the .ckpt file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        with pl_legacy_patch():
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a text file, a truncated download, a pickle of something else: torch's errors vary
        raise DataError(f"{path}: not a readable Lightning checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(content, dict) or "state_dict" not in content:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict in it)")
    return Checkpoint(path, content)
