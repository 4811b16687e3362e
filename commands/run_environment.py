"""The cluster around a run, checked before it trains: rank variables, distributed start-up, W&B's network.

Environment left over from another job or machine is either consistent and used, or an error naming it:

- :func:`check_rank_variables`: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``NODE_RANK`` (torchrun's
  ``GROUP_RANK`` / ``LOCAL_WORLD_SIZE``, SLURM's ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID`` /
  ``SLURM_NTASKS``) must fit the trainer's devices and nodes. Lightning reads some of them and ignores others: a
  leftover ``RANK=1`` in a one-process run makes every rank-zero-only step (loggers, export, evaluation) silently
  skip, and a ``WORLD_SIZE=2`` with one process started waits for a peer forever.
- :func:`bound_startup`: the processes of a DDP run meet in a rendezvous that gives up after ``--startup_timeout``
  seconds, naming the ranks that never joined and ``MASTER_ADDR`` / ``MASTER_PORT`` (torch waits 30 minutes and
  says nothing). Under torchrun its own rendezvous does this, and this one stands aside.
- :func:`check_run_folders`: every folder a fit will write (run folder, logger folders, checkpoint and export
  folders, the activation cache) is written to once before the first step, so a read-only or full mount is named
  then, not after the steps it would lose (and W&B never falls back to /tmp on its own).
- :func:`start_wandb`: a W&B logger in online mode that cannot reach its server within wandb's ``init_timeout``
  goes offline with one warning line (``wandb sync`` uploads the run later) instead of ending the run.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Mapping
from datetime import timedelta

import torch
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning_fabric.utilities.distributed import _destroy_dist_connection
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only

from core.errors import DataError, StorageError, unwritable
from core.files import shown
from datamodules.activation_cache import default_cache_dir
from lightning_modules.checkpoints import config_entries
from lightning_modules.family import entry_name

#: Rank variables and what bounds each: the number of processes (``world``), processes per node (``devices``),
#: a global rank (``rank``), a rank within the node (``local``) or a node's rank (``node``).
RANK_VARIABLES = {
    "WORLD_SIZE": "world", "LOCAL_WORLD_SIZE": "devices", "RANK": "rank", "LOCAL_RANK": "local",
    "NODE_RANK": "node", "GROUP_RANK": "node", "SLURM_PROCID": "rank", "SLURM_LOCALID": "local",
    "SLURM_NODEID": "node",
}


class ClusterError(DataError):
    """The processes or the network around a run are not as the run's options say; the message names them."""


def check_rank_variables(devices: int, num_nodes: int, slurm: bool, env: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`ClusterError` naming each rank variable in ``env`` that does not fit a run of ``num_nodes``
    nodes x ``devices`` processes (``SLURM_NTASKS`` counts only when Lightning runs under SLURM, ``slurm``)."""
    world = devices * num_nodes
    size = {"world": world, "devices": devices}
    count = {"rank": world, "local": devices, "node": num_nodes}
    names = dict(RANK_VARIABLES, **({"SLURM_NTASKS": "world"} if slurm else {}))
    values, problems = {}, []
    for name, kind in names.items():
        raw = env.get(name)
        if raw is None:
            continue
        try:
            values[name] = value = int(raw)
        except ValueError:
            problems.append(f"{name}={raw!r} is not a whole number")
            continue
        if kind in size and value != size[kind]:
            problems.append(f"{name}={value}, but the trainer runs {size[kind]} process{'es' * (size[kind] != 1)}"
                            + (" per node" if kind == "devices" else ""))
        elif kind in count and not 0 <= value < count[kind]:
            problems.append(f"{name}={value} is outside 0..{count[kind] - 1}")
    node = values.get("NODE_RANK", values.get("GROUP_RANK"))
    rank, local = values.get("RANK"), values.get("LOCAL_RANK")
    if not problems and None not in (node, rank, local) and rank != node * devices + local:
        problems.append(f"RANK={rank}, but node {node} x {devices} devices + LOCAL_RANK={local} is rank "
                        f"{node * devices + local}")
    if problems:
        raise ClusterError(f"rank variables do not fit this run (devices {devices}, num_nodes {num_nodes}): "
                           f"{'; '.join(problems)}. Left over from another job? Unset them, or set --trainer.devices "
                           "and --trainer.num_nodes to what the launcher started")


def check_trainer_environment(trainer) -> None:
    """:func:`check_rank_variables` for a built trainer (its devices, nodes and cluster environment)."""
    environment = trainer._accelerator_connector.cluster_environment
    check_rank_variables(trainer.num_devices, trainer.num_nodes, isinstance(environment, SLURMEnvironment))


# ------------------------------------------------------------------------------------------ distributed start-up
#: The rendezvous store of this process, kept for the life of its process group (gloo reads it for new groups).
_STORE: list = []


def join(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> torch.distributed.Store:
    """Meet the other ranks at ``address:port`` (rank 0 hosts a ``TCPStore`` there) within ``timeout_s``; return the
    store, or raise :class:`ClusterError` naming the ranks that never joined. torch's own start-up counts the
    processes that connected but cannot say which are missing, and waits 30 minutes by default."""
    where = f"MASTER_ADDR={address}, MASTER_PORT={port}"
    deadline = time.monotonic() + timeout_s
    try:
        store = torch.distributed.TCPStore(address, port, is_master=rank == 0, wait_for_workers=False,
                                           timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError) as err:  # DistNetworkError / DistStoreError are RuntimeErrors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"distributed start-up: rank {rank} could not "
                           f"{'open' if rank == 0 else 'reach rank 0 at'} {address}:{port} within {timeout_s:g} s "
                           f"({where}): {first}") from None
    store.set(f"embedlab/joined/{rank}", str(os.getpid()))
    keys = [f"embedlab/joined/{r}" for r in range(world_size)]
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise ClusterError(f"distributed start-up: rank{'s' * (len(missing) > 1)} {shown} of {world_size} never "
                               f"joined within {timeout_s:g} s ({where}; this is rank {rank}). Start every process "
                               "(the launcher, srun's tasks), check that they reach MASTER_ADDR:MASTER_PORT, or give "
                               "them longer with --startup_timeout")
        time.sleep(0.2)
    return store


def bound_startup(strategy, timeout_s: float) -> None:
    """Make a DDP strategy's ranks meet through :func:`join` (bounded by ``timeout_s``) before torch's process group
    is made over the same store; Lightning then finds the group initialised and goes on. Not under torchrun, whose
    agent runs the rendezvous, nor for other strategies."""
    if not isinstance(strategy, DDPStrategy) or isinstance(strategy.cluster_environment, TorchElasticEnvironment):
        return
    setup_distributed = strategy.setup_distributed

    def setup_with_rendezvous() -> None:
        if strategy.num_nodes * strategy.num_processes > 1 and not torch.distributed.is_initialized():
            strategy.set_world_ranks()
            environment, backend = strategy.cluster_environment, strategy._get_process_group_backend()
            store = join(environment.main_address, environment.main_port, strategy.global_rank,
                         strategy.world_size, timeout_s)
            _STORE[:] = [store]
            device = strategy.root_device
            torch.distributed.init_process_group(backend, store=store, rank=strategy.global_rank,
                                                 world_size=strategy.world_size, timeout=strategy._timeout,
                                                 device_id=device if device.type != "cpu" else None)
            if backend == "nccl":  # as Lightning does for the groups it makes
                atexit.register(_destroy_dist_connection)
        setup_distributed()

    strategy.setup_distributed = setup_with_rendezvous


# ------------------------------------------------------------------------------------------------------ folders
def run_folders(cfg) -> list[tuple[str, str]]:
    """``(option, folder)`` for each folder a parsed ``fit`` config writes: the trainer's root, the loggers'
    folders, callbacks' ``dirpath`` / ``output_dir``, and a datamodule's activation cache folder."""
    trainer = cfg.trainer
    out = [("trainer.default_root_dir", trainer.get("default_root_dir"))]
    for part, entries, keys in (("trainer.logger", trainer.get("logger"), ("save_dir", "dir")),
                                ("trainer.callbacks", trainer.get("callbacks"), ("dirpath", "output_dir"))):
        for item in config_entries(entries):
            args = item.get("init_args") or {}
            out += [(f"{part} {entry_name(item)} {key}", args[key]) for key in keys if args.get(key)]
    data = cfg.get("data")
    data_args = (data.get("init_args") if hasattr(data, "get") else None) or {}
    if "cache_dir" in data_args:
        env = os.environ.get("EMBEDLAB_CACHE")
        option = "data.init_args.cache_dir" if data_args["cache_dir"] else (
            f"EMBEDLAB_CACHE={env}" if env else "the activation cache folder")
        out.append((option, data_args["cache_dir"] or default_cache_dir()))
    return [(option, str(folder)) for option, folder in out if folder]


def check_run_folders(cfg) -> None:
    """Write to each of :func:`run_folders` once, before anything is built; raise :class:`StorageError` naming the
    first that cannot be written."""
    for option, folder in dict.fromkeys(run_folders(cfg)):
        reason = unwritable(folder)
        if reason is not None:
            raise StorageError(f"{option}: cannot write in {folder} ({reason}); nothing was run. Give a writable "
                               "folder")


# ------------------------------------------------------------------------------------------------------- W&B
#: wandb.init's wait for its server when neither WANDB_INIT_TIMEOUT nor the logger's settings say otherwise.
WANDB_INIT_TIMEOUT_S = 60.0


#: ids of the W&B runs that fits in this process logged to (see :func:`start_wandb`)
FIT_RUNS: set[str] = set()


def remember_wandb_runs(loggers: list) -> None:
    """Note the W&B runs a finished fit logged to, so that the next fit in this process starts its own."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            FIT_RUNS.add(logger._experiment.id)


def start_wandb(loggers: list) -> None:
    """Start each W&B logger's run now, before training; one that cannot reach its server within wandb's
    ``init_timeout`` (``WANDB_INIT_TIMEOUT``, else 60 s) starts offline instead, with one warning line.

    ``WandbLogger`` logs into ``wandb.run`` when one is open: a run that an earlier fit in this process left open (a
    notebook, a sweep loop) is finished first, so each fit gets its own run and checkpoint folder. A run the user
    opened with ``wandb.init`` is still reused, as Lightning intends."""
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers) and FIT_RUNS:
        import wandb

        if wandb.run is not None and wandb.run.id in FIT_RUNS:
            wandb.finish()
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger" or getattr(logger, "_experiment", None) is not None:
            continue
        init = logger._wandb_init  # the keyword arguments WandbLogger passes to wandb.init
        mode = init.get("mode") or os.environ.get("WANDB_MODE")
        if mode == "disabled":  # often left over from another job: say so, since nothing will reach W&B
            source = "the logger's mode: disabled" if init.get("mode") else "WANDB_MODE=disabled"
            warn_line(f"W&B is disabled ({source}): nothing of this run is logged to W&B; unset it to log (offline "
                      "without a key)")
        if mode in ("offline", "dryrun", "disabled"):
            continue  # nothing to wait for: Lightning starts it
        import wandb

        if "WANDB_INIT_TIMEOUT" not in os.environ and init.get("settings") is None:
            init["settings"] = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S)
        try:
            logger.experiment  # noqa: B018
        except (wandb.errors.CommError, wandb.errors.UsageError, TimeoutError, ConnectionError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logger._experiment = None
            init["mode"] = "offline"
            run = logger.experiment
            folder = shown(os.path.dirname(run.dir))
            warn_line(f"W&B could not reach its server ({reason}); this run logs offline to {folder}: "
                      f"`wandb sync {folder}` uploads it later")


@rank_zero_only
def warn_line(text: str) -> None:
    """One ``warning:`` line on stderr (a Python warning takes two: the text and the source line)."""
    sys.stderr.write(f"warning: {text}\n")
