"""No host sync in a steady training step of any module family, as users run them: progress bar, W&B and CSV
loggers, LR monitor, throughput and the divergence guard on (a sync drains the GPU's queue, so the CPU cannot
prepare step k+1 while step k runs). Counted on the CPU, where the same calls stand (cli_probes.CountSyncs)."""

import collections

import cli_probes
import pytest
from test_faults import recipe_args

import train

#: Syncs the model's own library makes: transformers' SDPA mask (``masking_utils``) tests a tensor once a forward.
#: And two of our own that remain (open work): MCR2's group sizes, read once a step for the block shapes of
#: ragged k-means / label groups (``losses/mcr2.py`` ``group_layout``), and the batch top-k's check that its
#: candidate shortcut was exact (``components/batch_topk.py`` ``batch_topk``). Any other call fails the test.
ALLOWED = {"masking_utils.py": "contrastive mcr2 sae", "mcr2.py:group_layout": "mcr2",
           "batch_topk.py:batch_topk": "sae"}


@pytest.mark.parametrize("kind", ["contrastive", "mcr2", "sae"])
def test_steady_training_steps_make_no_host_sync(kind, tmp_path, tiny_model_no_dropout, sample_data):
    args = recipe_args(kind, tmp_path, tiny_model_no_dropout, sample_data)
    at = args.index("--trainer.logger")
    del args[at:at + 4]  # the run defaults' loggers: W&B (offline) and CSV, with the LR monitor
    at = args.index("--trainer.enable_progress_bar")
    del args[at:at + 2]  # the bar on
    at = args.index("--trainer.callbacks+=ModelCheckpoint")
    del args[at:at + 4]  # the run defaults' checkpoint: saves are periodic work, not steps (every 2 steps here)
    cli_probes.SYNCS.clear()
    batch = ["--data.batch_size", "8"] if kind == "mcr2" else []  # 25 batches an epoch: no epoch end in the window
    train.main([*args, *batch, "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "50",
                "--trainer.callbacks+=callbacks.Throughput", "--trainer.callbacks+=cli_probes.CountSyncs",
                "--trainer.callbacks.start=3", "--trainer.callbacks.stop=8"])
    steps = 8 - 3
    def allowed(where: str) -> bool:
        site = where.split(" < ")[0]
        return any(site.startswith(f"{name}:") or site == name for name, kinds in ALLOWED.items()
                   if kind in kinds.split())

    found = collections.Counter(where for _, where in cli_probes.SYNCS if not allowed(where))
    assert not found, f"host syncs in {steps} steady steps: {found}"
    assert 0 < len(cli_probes.SYNCS) <= steps  # the allowed ones, once a step (and the counting works)
