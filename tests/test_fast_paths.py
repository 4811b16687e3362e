"""GPU speed switches, checked on CPU: gradient checkpointing, SDPA vs eager attention, torch.compile,
padding to a multiple, length-grouped batching (deterministic, each row once, resumable)."""

import time

import pytest
import pytorch_lightning as pl
import torch

from datamodules import SentencesDataModule
from datamodules.base import PadCollator, TokenizedRows
from datamodules.samplers import LengthGroupedSampler, ResumableSampler
from lightning_modules import ContrastiveModule
from lightning_modules.components.encoder import Encoder, is_checkpointing

SENTENCES = ["a man is playing a guitar .", "the dog", "a lady is reading the daily paper in the park .",
             "two students cooking pasta", "hello world"]


def batch(enc: Encoder, sentences=SENTENCES) -> dict[str, torch.Tensor]:
    return enc.collate(enc.tokenize(sentences))


# ------------------------------------------------------------------------------------------ encoder switches
def test_gradient_checkpointing_recomputes_and_leaves_loss_and_gradients_unchanged(tiny_model):
    """Dropout on: non-reentrant checkpointing replays the RNG, so even the dropout masks are the same."""
    encoders = {flag: Encoder(tiny_model, pooler="mean", gradient_checkpointing=flag) for flag in (False, True)}
    assert is_checkpointing(encoders[True].model) and not is_checkpointing(encoders[False].model)
    out = {}
    for flag, enc in encoders.items():
        calls = []
        enc.model.encoder.layer[0].attention.self.query.register_forward_hook(lambda *a: calls.append(1))
        torch.manual_seed(0)
        loss = enc(**batch(enc)).pow(2).sum()
        forward_calls = len(calls)
        loss.backward()
        out[flag] = (loss.detach(), {n: p.grad for n, p in enc.named_parameters()}, forward_calls, len(calls))
    (loss0, grads0, fwd0, total0), (loss1, grads1, fwd1, total1) = out[False], out[True]
    assert (fwd0, total0) == (1, 1) and (fwd1, total1) == (1, 2)  # the layer ran again in the backward pass
    torch.testing.assert_close(loss1, loss0)
    assert max((grads1[k] - grads0[k]).abs().max().item() for k in grads0) < 1e-6


def test_module_passes_the_switches_to_its_encoder(tiny_model):
    module = ContrastiveModule(tiny_model, gradient_checkpointing=True, attn_implementation="eager",
                               mini_batch_size=4)
    assert is_checkpointing(module.encoder.model)
    assert module.encoder.model.config._attn_implementation == "eager"
    assert module.hparams.mini_batch_size == 4


def test_sdpa_and_eager_attention_give_the_same_embeddings(tiny_model):
    sdpa = Encoder(tiny_model, pooler="mean", attn_implementation="sdpa").eval()
    eager = Encoder(tiny_model, pooler="mean", attn_implementation="eager").eval()
    assert sdpa.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    b = batch(sdpa)
    assert (b["attention_mask"] == 0).any()  # padding is masked the same way by both
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**b), eager(**b), rtol=0, atol=1e-5)


def test_compile_switch_compiles_in_place_and_keeps_parameter_names(tiny_model):
    enc = Encoder(tiny_model, pooler="mean", compile=True)
    assert enc.model._compiled_call_impl is not None
    assert list(enc.state_dict()) == list(Encoder(tiny_model, pooler="mean").state_dict())


def test_a_checkpoint_trained_with_compile_is_rebuilt_without_it(tmp_path, tiny_model):
    from lightning_modules.base import CLASS_PATH_KEY
    from lightning_modules.export import load_module

    module = ContrastiveModule(tiny_model, pooler="mean", compile=True, gradient_checkpointing=True)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__, CLASS_PATH_KEY: "lightning_modules.ContrastiveModule"}
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded = load_module(tmp_path / "m.ckpt")
    assert loaded.encoder.model._compiled_call_impl is None
    assert not is_checkpointing(loaded.encoder.model)


@pytest.mark.slow
def test_compiled_encoder_matches_eager_and_does_not_recompile_per_length(tiny_model):
    """One tiny compile on CPU (about 20 s on one thread here): the same embeddings, and a second padded length
    reuses the dynamic-shape graph instead of compiling again."""
    enc = Encoder(tiny_model, pooler="mean", compile=True).eval()
    ref = Encoder(tiny_model, pooler="mean").eval()
    with torch.no_grad():
        start = time.perf_counter()
        z = enc(**batch(enc, SENTENCES[:2]))
        first = time.perf_counter() - start
        torch.testing.assert_close(z, ref(**batch(ref, SENTENCES[:2])), rtol=0, atol=1e-5)
        start = time.perf_counter()
        enc(**batch(enc, SENTENCES))  # another batch size and padded length
        second = time.perf_counter() - start
    assert first < 300
    assert second < 2.0, f"recompiled for a new shape ({second:.1f} s)"


# ------------------------------------------------------------------------------------------ padding
def test_pad_collator_rounds_the_length_up_to_the_multiple():
    rows = [([1, 2, 3],), ([1, 2, 3, 4, 5],)]
    assert PadCollator(0)(rows)["input_ids"].shape == (2, 1, 5)
    assert PadCollator(0, 8)(rows)["input_ids"].shape == (2, 1, 8)
    out = PadCollator(0, 4)([([1] * 9, [1] * 2)])
    assert out["input_ids"].shape == (1, 2, 12)
    assert out["attention_mask"].sum().item() == 11


def test_datamodule_batches_respect_pad_to_multiple_of(sample_data, tiny_model):
    enc = Encoder(tiny_model)
    dm = SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16, pad_to_multiple_of=8)
    dm.connect(enc.tokenizer, 32)
    lengths = set()
    for b in dm.train_dataloader():
        L = b["input_ids"].shape[-1]
        longest = b["attention_mask"].sum(-1).max().item()
        assert L % 8 == 0 and longest <= L < longest + 8
        lengths.add(L)
    assert len(lengths) <= 4  # max_length 32: at most 8, 16, 24, 32


# ------------------------------------------------------------------------------------------ length grouping
def grouped(lengths, batch_size=4, window=3, epoch=0, seed=0, **kw) -> LengthGroupedSampler:
    data = TokenizedRows([([0] * n,) for n in lengths])
    kw.setdefault("num_replicas", 1)
    kw.setdefault("rank", 0)
    s = LengthGroupedSampler(data, lengths, batch_size, window, seed=seed, **kw)
    s.set_epoch(epoch)
    return s


LENGTHS = [int(x) for x in torch.randint(3, 33, (101,), generator=torch.Generator().manual_seed(0))]


def padded_tokens(order: list[int], batch_size: int = 4) -> int:
    return sum(len(b) * max(LENGTHS[i] for i in b) for b in (order[i : i + batch_size]
                                                           for i in range(0, len(order), batch_size)))


def test_length_grouped_sampler_yields_every_row_once_and_groups_lengths():
    order = list(grouped(LENGTHS, drop_last=False))
    assert sorted(order) == list(range(len(LENGTHS)))
    plain = list(ResumableSampler(TokenizedRows(LENGTHS), num_replicas=1, rank=0, seed=0))
    assert padded_tokens(order) < 0.8 * padded_tokens(plain)
    # within each window of 3 batches, each batch is a run of the window's rows sorted by length
    for start in range(0, 96, 12):
        window = order[start : start + 12]
        batches = [window[i : i + 4] for i in range(0, 12, 4)]
        spans = sorted((min(LENGTHS[i] for i in b), max(LENGTHS[i] for i in b)) for b in batches)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))


def test_length_grouped_sampler_is_deterministic_per_seed_and_epoch():
    assert list(grouped(LENGTHS)) == list(grouped(LENGTHS))
    assert list(grouped(LENGTHS)) != list(grouped(LENGTHS, seed=1))
    assert list(grouped(LENGTHS)) != list(grouped(LENGTHS, epoch=1))


def test_length_grouped_sampler_incomplete_batch_stays_last():
    order = list(grouped(LENGTHS, drop_last=False))  # 101 rows: 25 batches of 4, then 1
    assert len(order) == 101
    assert order[-1] not in order[:100]
    last_window = order[96:]  # rows 96..100 are the 9th window: one full batch, then the 1 left over
    assert len(last_window) == 5


def test_length_grouped_sampler_resumes_at_the_same_sample():
    full = list(grouped(LENGTHS, epoch=2))
    resumed = grouped(LENGTHS, epoch=2)
    resumed.skip = 3 * 4
    assert list(resumed) == full[12:]
    assert list(resumed) == full  # skip applies once


def test_length_grouped_sampler_splits_rows_between_ranks():
    ranks = [list(grouped(LENGTHS, num_replicas=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 50
    assert not set(ranks[0]) & set(ranks[1])


def test_datamodule_option_selects_the_length_grouped_sampler(sample_data, tiny_model):
    enc = Encoder(tiny_model)
    kw = dict(source=str(sample_data / "sentences.txt"), batch_size=8, seed=3)
    dm = SentencesDataModule(**kw, group_by_length=True, length_group_batches=4)
    dm.connect(enc.tokenizer, 32)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    first = [b["input_ids"].clone() for b in loader]
    again = SentencesDataModule(**kw, group_by_length=True, length_group_batches=4)
    again.connect(enc.tokenizer, 32)
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(first, again.train_dataloader()))


def test_optimizers_use_the_fused_kernel_and_it_steps_like_foreach(tiny_model):
    """Fused AdamW (what transformers' Trainer uses) for float parameters on CPU/CUDA; same update as foreach."""
    from types import SimpleNamespace

    from lightning_modules.base import can_fuse

    assert can_fuse([torch.zeros(2)]) and not can_fuse([torch.zeros(2, dtype=torch.long)])
    assert not can_fuse([torch.zeros(2, device="meta")])
    module = ContrastiveModule(tiny_model, pooler="mean")
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, fused=True)
    foreach = torch.optim.AdamW(twins, lr=1e-2, foreach=True)
    for step in range(3):
        for p, q in zip(params, twins):
            p.grad = q.grad = torch.full_like(p, float(step + 1)) * p.detach().sign()
        fused.step(), foreach.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


def test_mixed_precision_with_clipping_takes_foreach_and_fits(tiny_model, sample_data, tmp_path):
    """Lightning refuses to clip gradients for an optimiser that unscales them itself (the fused kernels) under
    bf16-mixed/16-mixed: such runs take foreach and train; without clipping they stay fused."""
    from types import SimpleNamespace

    from pytorch_lightning.plugins.precision import MixedPrecision

    from lightning_modules.sae import SAEModule

    def fit(clip: float) -> torch.optim.Optimizer:
        module = ContrastiveModule(tiny_model, pooler="mean")
        trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=clip, max_steps=2,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=8))
        assert trainer.global_step == 2
        return trainer.optimizers[0]

    assert fit(clip=1.0).defaults["fused"] is False
    assert fit(clip=0.0).defaults["fused"] is True
    sae = SAEModule(sae=dict(d_in=8, expansion_factor=2, k=2))
    for clip, fused in [(1.0, False), (None, True)]:
        sae._trainer = SimpleNamespace(gradient_clip_val=clip, precision_plugin=MixedPrecision("bf16-mixed", "cpu"),
                                       estimated_stepping_batches=10)
        assert sae.configure_optimizers()["optimizer"].defaults["fused"] is fused


def test_pad_collator_equals_padding_each_sequence_by_hand():
    """The vectorised collator against a plain loop written from its definition: each sequence left-aligned in a
    row of the batch's longest length (rounded up), pad ids after it, mask 1 on its tokens only."""
    import random

    rng = random.Random(0)
    for views, multiple in ((1, None), (2, None), (3, 8)):
        rows = [tuple([rng.randrange(5, 99) for _ in range(rng.randint(1, 17))] for _ in range(views))
                for _ in range(13)]
        out = PadCollator(1, multiple)(rows)
        L = max(len(ids) for row in rows for ids in row)
        L = -(-L // multiple) * multiple if multiple else L
        assert out["input_ids"].shape == out["attention_mask"].shape == (13, views, L)
        for b, row in enumerate(rows):
            for v, ids in enumerate(row):
                assert out["input_ids"][b, v].tolist() == ids + [1] * (L - len(ids))
                assert out["attention_mask"][b, v].tolist() == [1] * len(ids) + [0] * (L - len(ids))
        assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
