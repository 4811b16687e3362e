"""No host sync in a steady training step of any module family, as users run them: progress bar, W&B and CSV
loggers, LR monitor, throughput and the divergence guard on (a sync drains the GPU's queue, so the CPU cannot
prepare step k+1 while step k runs). Counted on the CPU, where the same calls stand (cli_probes.CountSyncs)."""

import collections

import cli_probes
import pytest
from test_faults import recipe_args

import train

#: Syncs the model's own library makes: transformers' SDPA mask (``masking_utils``) tests a tensor once a forward.
#: Any other call fails the test.
ALLOWED = {"masking_utils.py": "contrastive hncse_pm hncse_hnm mcr2 sae"}


#: The hard-negative builders of the HNCSE recipes, as extra arguments of the contrastive fit
BUILDERS = {"hncse_pm": ["--model.candidates", "lightning_modules.losses.PositiveMixing"],
            "hncse_hnm": ["--model.candidates", "lightning_modules.losses.HardNegativeMixing",
                          "--model.candidates.k", "4", "--model.candidates.s", "8"]}


@pytest.mark.parametrize("kind", ["contrastive", "hncse_pm", "hncse_hnm", "mcr2", "sae"])
def test_steady_training_steps_make_no_host_sync(kind, tmp_path, tiny_model_no_dropout, sample_data, monkeypatch):
    import functools

    from lightning_modules import mcr2

    # MCR2's groups as an accelerator lays them out (masked blocks, no sync): on the CPU the sorted layout is cheaper
    # and its one read of the group sizes waits for nothing
    monkeypatch.setattr(mcr2, "group_layout", functools.partial(mcr2.group_layout, on_host=False))
    # and the SAE as on an accelerator: without the CPU's shortcuts (the candidate top-k's exactness check, AuxK's
    # count of dead latents), which read a value on the host
    from lightning_modules.components import batch_topk

    monkeypatch.setattr(batch_topk, "host_reads_are_free", lambda t: False)
    args = recipe_args("contrastive" if kind in BUILDERS else kind, tmp_path, tiny_model_no_dropout, sample_data)
    args += BUILDERS.get(kind, [])
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
    assert len(cli_probes.SYNCS) <= steps  # the allowed ones, at most once a step
    if kind not in ("mcr2", "sae"):  # those read cached teacher embeddings / activations: no transformers forward
        assert cli_probes.SYNCS  # the counting works inside a fit


def test_the_sync_counter_sees_each_kind_of_sync_and_nothing_else():
    import torch

    x = torch.arange(6.0)
    found: list = []
    originals = (torch.Tensor.item, torch.Tensor.__getitem__, torch.nonzero, torch.tensor)
    with cli_probes.SyncCounter(found):
        assert torch.Tensor.item is not originals[0]  # patched while counting
        x[1:3], x[torch.tensor([0, 2])], x.sum(), torch.tensor([1.0]), x.reshape(2, 3)  # none of these syncs
        assert not found, found
        x[0].item(), bool(x[0]), float(x[0]), x.tolist(), x.cpu(), x.numpy(), x[x > 2], x.nonzero()
        torch.nonzero(x), torch.masked_select(x, x > 2), x.unique(), torch.unique_consecutive(x)
        torch.bincount(x.long(), minlength=9), torch.tensor([1.0], device="cpu")
    names = {name for name, _ in found}
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.__float__", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy",
            "Tensor.__getitem__", "Tensor.nonzero", "torch.nonzero", "torch.masked_select", "Tensor.unique",
            "torch.unique_consecutive", "torch.bincount", "torch.tensor"} <= names, names
    assert all(where.startswith("test_host_syncs.py:") for _, where in found)
    restored = (torch.Tensor.item, torch.Tensor.__getitem__, torch.nonzero, torch.tensor)
    assert all(a is b for a, b in zip(restored, originals))  # put back on exit
