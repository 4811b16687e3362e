"""Feature density (SAELens' log10 firing frequency): the histogram logged at validation, what it measures, and
sparsity.safetensors in both export layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.metrics import DENSITY_BINS, density_histogram, log10_density
from lightning_modules.export import SPARSITY_FILE, export_sae, load_sae


def test_density_and_its_histogram_against_a_loop():
    freq = torch.tensor([0.0, 1e-12, 1e-9, 5e-9, 1e-3, 0.02, 0.5, 1.0, 0.1, 9.9e-2])
    log10 = log10_density(freq)
    assert log10[0] == -10 and log10[7] == pytest.approx(0.0, abs=1e-9)
    hist = density_histogram(log10)
    want = {b: 0 for b in DENSITY_BINS}
    for v in log10.tolist():  # each decade [b, b + 1); below -10 into the first, 0 into the last
        b = min(max(int(v // 1), DENSITY_BINS[0]), DENSITY_BINS[-1])
        want[b] += 1
    assert {b: int(n) for b, n in hist.items()} == want
    assert want[-10] == 2 and want[-9] == 2 and want[-1] == 3


def test_a_fit_logs_the_density_of_the_held_out_split_and_exports_it(tiny_model_no_dropout, sample_data, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from datamodules import ActivationsDataModule
    from lightning_modules import SAEModule

    dm = ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, source=str(sample_data / "sentences.txt"),
                               cache_dir=str(tmp_path / "cache"), max_length=32, batch_size=64, val_fraction=0.2)
    pl.seed_everything(0)
    model = SAEModule(sae=dict(expansion_factor=2, k=4, threshold_start=2), lr=3e-3, init_samples=256)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, val_check_interval=6, logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    sae = model.sae.eval()
    codes = sae.encode(dm.cache.gather(dm.val_rows))  # the whole held-out split, inference threshold
    expect = torch.log10((codes > 0).double().mean(0) + 1e-10).float()
    torch.testing.assert_close(sae.log10_density, expect)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    last = [r for r in rows if r.get("val/sae/log10_density_hist/-10")][-1]
    logged = {b: float(last[f"val/sae/log10_density_hist/{b}"]) for b in DENSITY_BINS}
    assert logged == {b: float(n) for b, n in density_histogram(expect).items()}
    assert sum(logged.values()) == sae.num_latents
    # the density travels with the SAE: checkpoint, both export layouts
    trainer.save_checkpoint(tmp_path / "sae.ckpt")
    assert torch.equal(SAEModule.load_from_checkpoint(tmp_path / "sae.ckpt").sae.log10_density, sae.log10_density)
    for fmt in ("sparsify", "saelens"):
        folder = export_sae(model, tmp_path / fmt, format=fmt)
        assert torch.equal(load_file(str(folder / SPARSITY_FILE))["sparsity"], sae.log10_density)
        assert torch.equal(load_sae(folder).log10_density, sae.log10_density)


def test_no_density_measured_means_no_sparsity_file(tmp_path):
    from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE

    sae = BatchTopKSAE(BatchTopKConfig(d_in=6, num_latents=12, k=2))
    sae.threshold.fill_(0.1)
    assert not (export_sae(sae, tmp_path / "s") / SPARSITY_FILE).exists()
    assert load_sae(tmp_path / "s").log10_density is None
