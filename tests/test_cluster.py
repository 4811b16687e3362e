"""The cluster around a run (issue: runs that survive it): rank variables, distributed start-up, W&B without a
network, folders checked before the work. Real faults: real processes, real ports, real read-only folders."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import fit_args

import train
from commands.run_environment import ClusterError, check_rank_variables

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")},
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **env}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("env, devices, nodes, slurm", [
    ({}, 1, 1, False),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, 1, 1, False),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0"}, 2, 1, False),  # what Lightning's launcher sets
    ({"RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, 4, 2, False),
    ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "4"}, 2, 2, True),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, 2, 1, False),  # an interactive allocation: Lightning launches
])
def test_consistent_rank_variables_are_used(env, devices, nodes, slurm):
    check_rank_variables(devices, nodes, slurm, env)


@pytest.mark.parametrize("env, devices, nodes, slurm, named", [
    ({"RANK": "1"}, 1, 1, False, ["RANK=1 is outside 0..0"]),  # leftover: rank-zero work would silently skip
    ({"WORLD_SIZE": "2", "RANK": "3"}, 2, 1, False, ["RANK=3 is outside 0..1"]),
    ({"WORLD_SIZE": "4"}, 2, 1, False, ["WORLD_SIZE=4, but the trainer runs 2 processes"]),
    ({"LOCAL_RANK": "x"}, 1, 1, False, ["LOCAL_RANK='x' is not a whole number"]),
    ({"RANK": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}, 2, 2, False, ["RANK=2, but node 0 x 2 devices + "
                                                                      "LOCAL_RANK=1 is rank 1"]),
    ({"LOCAL_WORLD_SIZE": "8"}, 4, 2, False, ["LOCAL_WORLD_SIZE=8, but the trainer runs 4 processes per node"]),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, 8, 1, True, ["SLURM_NTASKS=16, but the trainer runs 8 processes"]),
    ({"SLURM_PROCID": "1", "NODE_RANK": "2"}, 1, 1, False, ["NODE_RANK=2 is outside 0..0",
                                                            "SLURM_PROCID=1 is outside 0..0"]),
])
def test_inconsistent_rank_variables_are_named(env, devices, nodes, slurm, named):
    with pytest.raises(ClusterError) as raised:
        check_rank_variables(devices, nodes, slurm, env)
    for part in named:
        assert part in str(raised.value)
    assert f"(devices {devices}, num_nodes {nodes})" in str(raised.value)


def test_a_leftover_rank_is_refused_before_anything_runs(tmp_path, tiny_model, sample_data, monkeypatch):
    """A one-process fit with RANK=1 left in the environment: Lightning took it as rank 1, so the loggers, the
    checkpoints' log folder and the export were skipped without a word and the run exited 0."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ClusterError, match=r"RANK=1 is outside 0\.\.0\. Left over from another job\?"):
        train.main(fit_args(tmp_path, tiny_model, sample_data))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_rank_that_never_starts_ends_the_start_up_within_the_timeout_naming_it(tmp_path, tiny_model, sample_data):
    """Rank 0 of a 2-process gloo run started alone (as a launcher that lost a node would): torch waits 30
    minutes in silence; here it gives up after --startup_timeout with the missing rank and the address."""
    port = free_port()
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--startup_timeout", "3")
    start = time.monotonic()
    proc = run_train(args, tmp_path, env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 90
    assert error_lines(proc.stderr) == [
        f"error: distributed start-up: rank 1 of 2 never joined within 3 s (MASTER_ADDR=127.0.0.1, MASTER_PORT={port}; "
        "this is rank 0). Start every process (the launcher, srun's tasks), check that they reach "
        "MASTER_ADDR:MASTER_PORT, or give them longer with --startup_timeout"]
    assert "Traceback" not in proc.stderr


def test_a_rank_whose_master_never_starts_names_the_address(tmp_path, tiny_model, sample_data):
    port = free_port()
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--startup_timeout", "3")
    proc = run_train(args, tmp_path, env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"error: distributed start-up: rank 1 could not reach rank 0 at 127.0.0.1:{port} within "
                           f"3 s (MASTER_ADDR=127.0.0.1, MASTER_PORT={port})")


def test_two_ranks_started_by_hand_meet_and_train(tmp_path, tiny_model, sample_data):
    """Both ranks started from outside, as srun or a hand-written launcher does: they meet through the bounded
    rendezvous and train to the end; only rank 0 writes the checkpoints."""
    port = free_port()
    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--startup_timeout", "60", "--trainer.max_steps", "2")
    base = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")},
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert list(tmp_path.rglob("*.ckpt"))


def test_wandb_online_without_a_reachable_server_falls_back_to_offline_and_the_run_goes_on(
        tmp_path, tiny_model, sample_data):
    """WANDB_MODE=online with a key and the server at a closed local port (a compute node without outbound network):
    wandb stalled ~140 s and raised CommError, so the run never started. Now, within wandb's init timeout, one
    warning line, an offline run folder, and the fit ends normally."""
    port = free_port()  # nothing listens there
    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.logger", "pytorch_lightning.loggers.WandbLogger",
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.project", "embedlab-test",
                    "--trainer.max_steps", "2")
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
           "WANDB_INIT_TIMEOUT": "2", "WANDB_SILENT": "false"}
    start = time.monotonic()
    proc = run_train(args, tmp_path, env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 120
    warnings = [line for line in proc.stderr.splitlines() if "W&B could not reach its server" in line]
    assert len(warnings) == 1, proc.stderr[-3000:]
    [offline] = list((tmp_path / "wandb").glob("offline-run-*"))
    shown = offline.relative_to(tmp_path)  # as typed from the run's working directory
    assert f"this run logs offline to {shown}: `wandb sync {shown}` uploads it later" in warnings[0]
    assert list(offline.glob("run-*.wandb"))
    assert list(tmp_path.rglob("*.ckpt"))


@pytest.fixture
def read_only(tmp_path):
    """Makes a folder read-only for real: a read-only bind mount of it onto itself (root only; skipped otherwise,
    since permission bits do not stop root and a read-only mount is what shared checkpoint stores are)."""
    mounted = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a read-only bind mount")
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
        mounted.append(folder)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=False)


def test_resuming_from_a_read_only_checkpoint_store_writes_the_new_checkpoints_into_the_run_folder(
        tmp_path, tiny_model, sample_data, read_only):
    """--ckpt_path in a read-only folder: every step trained, then an OSError at the first save (the steps lost).
    Now the new checkpoints go to the run's own folder, said in one warning, and the run ends normally."""
    train.main(fit_args(tmp_path / "store", tiny_model, sample_data))
    [last] = list((tmp_path / "store").rglob("last.ckpt"))
    read_only(tmp_path / "store")
    said = f"the checkpoint folder {last.parent} cannot be written (Read-only file system): this run writes its " \
           "new checkpoints into its own run folder"
    with pytest.warns(UserWarning, match=re.escape(said)):
        cli = train.main(fit_args(tmp_path / "run", tiny_model, sample_data, "--ckpt_path", str(last),
                                  "--trainer.max_steps", "6"))
    assert cli.trainer.global_step == 6
    [new] = list((tmp_path / "run").rglob("last.ckpt"))
    import torch

    assert torch.load(new, weights_only=False)["global_step"] == 6


def test_a_read_only_run_folder_is_named_before_the_first_step(tmp_path, tiny_model, sample_data, read_only):
    root = read_only(tmp_path / "ro")
    with pytest.raises(OSError) as raised:
        train.main(fit_args(root, tiny_model, sample_data))
    assert train.user_error(raised.value) == (f"trainer.default_root_dir: cannot write in {root} (Read-only file "
                                              "system); nothing was run. Give a writable folder")


def test_a_read_only_wandb_folder_is_named_not_swapped_for_tmp(tmp_path, tiny_model, sample_data, read_only):
    """W&B given an unwritable save_dir wrote its run to /tmp/wandb without a word."""
    root = read_only(tmp_path / "ro")
    args = fit_args(tmp_path / "run", tiny_model, sample_data, "--trainer.logger",
                    "pytorch_lightning.loggers.WandbLogger", "--trainer.logger.save_dir", str(root))
    with pytest.raises(OSError) as raised:
        train.main(args)
    assert train.user_error(raised.value).startswith(f"trainer.logger WandbLogger save_dir: cannot write in {root} "
                                                     "(Read-only file system)")


def test_a_leftover_disabled_wandb_mode_is_said_and_the_summary_lists_no_run_folder(tmp_path, tiny_model,
                                                                                   sample_data):
    """WANDB_MODE=disabled left in the environment: nothing reached W&B and the end-of-fit lines listed a
    /tmp/wandb/run-... folder that was never written. (In a subprocess: wandb keeps a disabled mode for the rest of
    the process that set it, which would turn off the W&B runs of later tests.)"""
    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.logger", "pytorch_lightning.loggers.WandbLogger",
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.max_steps", "2",
                    "--trainer.callbacks+=callbacks.ExportOnFitEnd", "--trainer.callbacks.sts_tasks=[]")
    proc = run_train(args, tmp_path, {"WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("warning:")] == [
        "warning: W&B is disabled (WANDB_MODE=disabled): nothing of this run is logged to W&B; unset it to log "
        "(offline without a key)"]
    assert "W&B run:        none (WANDB_MODE=disabled: nothing was logged to W&B)" in proc.stdout
