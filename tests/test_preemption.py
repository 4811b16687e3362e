"""Preemption under SLURM, simulated on CPU: SIGUSR1 mid-epoch -> Lightning's hpc checkpoint + requeue -> the
requeued run resumes by itself at the same sample.

What is real here: configs/trainer/slurm.yaml's SLURMEnvironment(auto_requeue, SIGUSR1) plugin, Lightning's own
signal handler (it saves ``hpc_ckpt_1.ckpt`` in default_root_dir and calls ``scontrol requeue $SLURM_JOB_ID``),
and its automatic resume from that checkpoint when a job starts under SLURM with no ``--ckpt_path``. What is
simulated: SLURM's variables (set in the environment), ``scontrol`` (a script on PATH recording its arguments),
the signal (sent by the process to itself mid-epoch), and the kill that follows a requeue (an exception raised
right after the handler ran, so nothing but the checkpoint survives).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli_probes
import pytest
import torch
from pytorch_lightning import Callback
from test_train_cli import fit_args

import train

# The requeued run logs to a new version folder, and Lightning cannot tell that our datamodule resumes mid-epoch.
pytestmark = [pytest.mark.filterwarnings("ignore:The dirpath has changed"),
              pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")]
SLURM_YAML = Path(__file__).resolve().parents[1] / "configs" / "trainer" / "slurm.yaml"
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
       "--trainer.precision=32-true"]


class Killed(Exception):
    """Stands for SLURM's SIGTERM / SIGKILL after the requeue."""


class PreemptAt(Callback):
    """At the end of training step ``step``, the process receives SIGUSR1 (as from ``--signal=SIGUSR1@90``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            handler = signal.getsignal(signal.SIGUSR1)
            assert callable(handler), "Lightning registered no SIGUSR1 handler: SIGUSR1 would kill pytest"
            os.kill(os.getpid(), signal.SIGUSR1)  # the Python-level handler runs before os.kill returns
            raise Killed


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "embedlab",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return calls


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length_grouped"])
def test_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_requeued_run_resumes_at_the_same_sample(
        tmp_path, tiny_model, fake_slurm, grouped):
    """Preempted after step 3 of 5-batch epochs, requeued, run to step 8: the batches equal a straight run's
    (also with length-grouped batching, whose order the resumed sampler must rebuild identically)."""
    from datamodules.sample import write_sample

    data = write_sample(tmp_path / "d", n_sentences=40, n_pairs=5)
    grouping = ["--data.group_by_length", "true", "--data.length_group_batches", "2"] if grouped else []

    def run(root: Path, *extra) -> list:
        cli_probes.BATCHES.clear()
        args = fit_args(root, tiny_model, data, "--config", str(SLURM_YAML), *CPU, "--trainer.max_steps", "8",
                        "--data.batch_size", "8", "--trainer.callbacks+=cli_probes.RecordBatches", *grouping,
                        *extra)
        train.main(args)
        return list(cli_probes.BATCHES)

    straight = run(tmp_path / "straight")
    job = tmp_path / "job"  # the same default_root_dir for the job and its requeued restart
    with pytest.raises(Killed):
        run(job, "--trainer.callbacks+=test_preemption.PreemptAt", "--trainer.callbacks.step=3")
    interrupted = list(cli_probes.BATCHES)
    assert (job / "hpc_ckpt_1.ckpt").is_file()
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    resumed = run(job)  # no --ckpt_path: Lightning finds hpc_ckpt_1.ckpt because it runs under SLURM
    assert [b[:3] for b in interrupted] == [(s, s // 5, s % 5) for s in range(3)]
    assert resumed[0][:3] == (3, 0, 3)
    assert interrupted + resumed == straight
    assert not (job / "hpc_ckpt_2.ckpt").exists()


ROOT = Path(__file__).resolve().parents[1]


def sigterm_at(args: list[str], step: int, cwd: Path, signum: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Run ``train.py`` with ``args`` as a subprocess and send it a real ``signum`` from here once it has finished
    training step ``step`` (it waits there, cli_probes.WaitAt); return the finished process."""
    marker = cwd / f"at_step_{step}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--trainer.callbacks+=cli_probes.WaitAt",
                             f"--trainer.callbacks.step={step}", f"--trainer.callbacks.marker={marker}"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), f"the run never reached step {step}: {proc.communicate(timeout=60)[1][-3000:]}"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_sigterm_saves_the_step_reached_exits_143_and_the_resumed_run_ends_with_the_uninterrupted_weights(
        tmp_path, tiny_model_no_dropout, sample_data):
    """As `scancel` or a Kubernetes eviction: SIGTERM after step 5 of 8. Lightning alone exits 0 with the last
    periodic checkpoint (step 4 here); now last.ckpt holds step 5, the exit code is 143 with one line naming it."""
    from test_faults import recipe_args

    from lightning_modules.checkpoints import newest_complete

    straight = train.main(recipe_args("contrastive", tmp_path / "straight", tiny_model_no_dropout, sample_data))
    args = recipe_args("contrastive", tmp_path / "stopped", tiny_model_no_dropout, sample_data)
    proc = sigterm_at(args, 5, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    saved = tmp_path / "stopped" / "ckpt" / "last.ckpt"
    assert line == ("error: stopped by SIGTERM at step 5: checkpoint stopped/ckpt/last.ckpt holds that step; "
                    "`--ckpt_path last` resumes it")  # the path as typed from the run's working directory
    assert "Traceback" not in proc.stderr
    assert newest_complete([tmp_path / "stopped"]) == saved.resolve()
    assert torch.load(saved, weights_only=False)["global_step"] == 5
    resumed = train.main([*args, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    want, got = straight.model.state_dict(), resumed.model.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sigusr1_outside_slurm_stops_like_sigterm_instead_of_killing_the_run(tmp_path, tiny_model, sample_data):
    """`--signal=SIGUSR1@90` without SLURM's auto-requeue (or any scheduler sending it): its default action
    killed the process with nothing saved. Now it stops like SIGTERM, with exit 128 + 10."""
    args = fit_args(tmp_path / "run", tiny_model, sample_data, "--trainer.max_steps", "8")
    proc = sigterm_at(args, 2, tmp_path, signal.SIGUSR1)
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert line.startswith("error: stopped by SIGUSR1 at step 2: checkpoint run/lightning_logs/version_0/"
                           "checkpoints/last.ckpt holds that step")
    assert torch.load(tmp_path / "run/lightning_logs/version_0/checkpoints/last.ckpt",
                      weights_only=False)["global_step"] == 2


def test_sigterm_under_slurm_without_sigusr1_requeues_and_the_requeued_job_resumes_by_itself(
        tmp_path, tiny_model, sample_data, fake_slurm):
    """SLURM preempting with SIGTERM alone (no --signal=SIGUSR1): Lightning only prints "Bypassing SIGTERM" and
    exits 0. Now the step reached is saved as Lightning's hpc checkpoint, the job is requeued once (scontrol,
    replaced here by a script recording its arguments), and the requeued run resumes from it with no --ckpt_path."""
    from datamodules.sample import write_sample

    data = write_sample(tmp_path / "d", n_sentences=40, n_pairs=5)
    job = tmp_path / "job"
    args = fit_args(job, tiny_model, data, "--config", str(SLURM_YAML), *CPU, "--trainer.max_steps", "8",
                    "--data.batch_size", "8")
    proc = sigterm_at(args, 3, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    assert torch.load(job / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 3
    [line] = error_lines(proc.stderr)
    assert line == ("error: stopped by SIGTERM at step 3: checkpoint job/hpc_ckpt_1.ckpt; SLURM job 4242 was "
                    "requeued and resumes from it by itself")
    cli = train.main(args)  # the requeued job: same command, same environment
    assert cli.trainer.global_step == 8
    assert cli.config.fit.ckpt_path is None  # Lightning resumed from hpc_ckpt_1.ckpt itself
    assert fake_slurm.read_text().split() == ["requeue", "4242"]  # requeued once


def test_sigterm_while_the_activation_cache_is_built_keeps_whole_shards_that_the_rerun_reuses(
        tmp_path, tiny_model_no_dropout):
    """SIGTERM lands while an SAE run caches its activations (before Lightning's loop owns the signal): the run
    stops between writes with exit 143 and one line, every shard on disk loads whole, and the rerun encodes only
    the sentences that were missing."""
    import json

    import numpy as np
    from test_faults import recipe_args

    from datamodules.sample import write_sample

    data = write_sample(tmp_path / "d", n_sentences=3000, n_pairs=5)
    args = [*recipe_args("sae", tmp_path / "run", tiny_model_no_dropout, data), "--data.shard_sentences", "8"]
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(cache.glob("*/shard_00002.meta.npy")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert error_lines(err) == ["error: stopped by SIGTERM before training started (nothing trained yet; an "
                                "activation cache being built keeps its finished shards, which a rerun reuses)"]
    [folder] = [p.parent for p in cache.glob("*/identity.json")]
    assert not (folder / "meta.json").exists()  # not marked complete
    done = sorted(folder.glob("shard_*.meta.npy"))
    assert 3 <= len(done) < 3000 // 8
    for meta in done:  # every shard the stopped run left is whole
        vectors = np.load(meta.with_name(meta.name.replace(".meta.", ".vectors.")))
        assert len(vectors) == len(np.load(meta)) > 0
    cli = train.main(args)
    assert cli.trainer.global_step == 8
    built = json.loads((folder / "meta.json").read_text())
    assert built["complete"] and built["n_sentences"] == 3000
    kept = sum(len(np.load(meta)) for meta in done)
    assert built["build"]["new_vectors"] == built["n_vectors"] - kept


def test_sigterm_with_checkpointing_off_still_exits_143_and_says_nothing_was_saved(tmp_path, tiny_model, sample_data):
    """With checkpointing off the handler that names a stop before training must still leave when training starts:
    SIGTERM mid-training stops the loop and says that no checkpoint was saved (it raised mid-step, saying "before
    training started")."""
    args = fit_args(tmp_path / "run", tiny_model, sample_data, "--trainer.max_steps", "8",
                    "--trainer.enable_checkpointing", "false")
    proc = sigterm_at(args, 2, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == ["error: stopped by SIGTERM at step 2; no checkpoint was saved (checkpointing "
                                        "is off)"]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_failed_requeue_is_named_not_reported_as_done(tmp_path, tiny_model, sample_data, fake_slurm):
    """`scontrol requeue` refused (Lightning only logs a warning): the line says so, and how the job resumes."""
    (fake_slurm.parent / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Requested operation is presently "
                                                        "disabled' >&2\nexit 1\n")
    data = sample_data
    job = tmp_path / "job"
    args = fit_args(job, tiny_model, data, "--config", str(SLURM_YAML), *CPU, "--trainer.max_steps", "8",
                    "--data.batch_size", "8")
    proc = sigterm_at(args, 2, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        "error: stopped by SIGTERM at step 2: checkpoint job/hpc_ckpt_1.ckpt; requeueing SLURM job 4242 failed "
        "(Requested operation is presently disabled): submit it again with the same default_root_dir and it resumes "
        "from that checkpoint by itself"]
    assert torch.load(job / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 2
