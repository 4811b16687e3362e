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
from pathlib import Path

import cli_probes
import pytest
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
