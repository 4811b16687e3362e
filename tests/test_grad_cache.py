"""GradCache (ContrastiveModule(mini_batch_size=...)): the chunked step computes exactly the unchunked one.

With dropout ON the reference is plain autograd over the same chunked forward passes (chunking changes which
dropout masks are drawn, not what is computed from them): equality there proves the per-chunk RNG replay, and the
negative control without the replay is measurably wrong. With dropout OFF the reference is the plain one-pass step.
"""

import traceback
from contextlib import nullcontext
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_modules import ContrastiveModule
from lightning_modules.losses import HardNegativeMixing, InBatchNegatives, PositiveMixing
from lightning_modules.losses import grad_cache as gc

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["a man is playing a guitar .", "the dog", "a lady is reading the daily paper in the park .",
             "two students cooking pasta", "an old farmer carries a heavy box", "hello world",
             "a child paints the wall in the garden", "the car is in the city centre downtown ."]
BUILDERS = {"simcse": InBatchNegatives, "hncse_pm": lambda: PositiveMixing(margin=0.5, w1=0.7, w2=0.3),
            "hncse_hnm": lambda: HardNegativeMixing(k=3, s=4)}


def make_batch(module: ContrastiveModule, setting: str) -> dict[str, torch.Tensor]:
    """(8, V, L): V = 1 (unsupervised) or 3 (supervised triplets: the next and the one after as pos / hard neg)."""
    views = [SENTENCES] if setting == "unsup" else [SENTENCES, SENTENCES[1:] + SENTENCES[:1],
                                                    SENTENCES[2:] + SENTENCES[:2]]
    enc = module.encoder
    padded = [enc.collate(enc.tokenize(v)) for v in views]
    L = max(p["input_ids"].shape[1] for p in padded)
    pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))  # noqa: E731
    return {k: torch.stack([pad(p[k]) for p in padded], dim=1) for k in ("input_ids", "attention_mask")}


def make_module(model_dir: str, builder: str, **kw) -> ContrastiveModule:
    torch.manual_seed(0)  # the MLP head
    return ContrastiveModule(model_dir, **{"pooler": "cls", "mlp": "train_only", **kw}, candidates=BUILDERS[builder]())


def step_grads(module: ContrastiveModule, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def chunked_autograd(module: ContrastiveModule, batch: dict, mini: int) -> torch.Tensor:
    """The reference with dropout: the same chunk-by-chunk forward passes, kept in one autograd graph."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    z = torch.cat([module.embed_views(ids[s : s + mini], mask[s : s + mini]) for s in range(0, len(ids), mini)])
    return module.views_loss(z)


def assert_same(a: tuple, b: tuple, tol: float = 1e-5) -> None:
    """Same loss and every parameter gradient to ``tol``, absolute AND relative to the largest gradient entry
    (the randomly initialised tiny BERT without dropout gives near-identical embeddings, so gradients ~1e-3)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=tol)
    worst = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
    scale = max(g.abs().max().item() for g in grads_b.values())
    assert scale > 1e-4  # a real gradient
    assert worst < tol and worst / scale < 10 * tol, (worst, scale)


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("setting", ["unsup", "sup"])
def test_chunked_step_equals_autograd_over_the_same_chunks_with_dropout_on(tiny_model, setting, builder):
    module = make_module(tiny_model, builder, mini_batch_size=3)  # chunks of 3, 3, 2 rows
    batch = make_batch(module, setting)
    cached = step_grads(module, lambda: module.training_step(batch, 0))
    reference = step_grads(module, lambda: chunked_autograd(module, batch, 3))
    assert_same(cached, reference)
    assert module.encoder.model.training  # dropout really was on


def test_chunked_step_with_gradient_checkpointing_too(tiny_model):
    """Checkpointing replays the RNG inside GradCache's replay: still the same dropout masks and gradients."""
    module = make_module(tiny_model, "hncse_pm", mini_batch_size=3, gradient_checkpointing=True)
    batch = make_batch(module, "sup")
    assert_same(step_grads(module, lambda: module.training_step(batch, 0)),
                step_grads(module, lambda: chunked_autograd(module, batch, 3)))


@pytest.mark.slow
def test_chunked_step_with_a_compiled_encoder(tiny_model):
    """torch.compile (inductor) draws its dropout masks from the global RNG too: the replay reproduces them.
    About 40 s on one CPU thread (three graphs: no-grad, forward and backward)."""
    module = make_module(tiny_model, "simcse", mini_batch_size=3, compile=True)
    batch = make_batch(module, "unsup")
    assert_same(step_grads(module, lambda: module.training_step(batch, 0)),
                step_grads(module, lambda: chunked_autograd(module, batch, 3)))


def test_without_the_rng_replay_the_gradient_is_wrong(tiny_model, monkeypatch):
    """Negative control: re-embedding with fresh dropout masks gives a measurably different gradient."""
    module = make_module(tiny_model, "simcse", mini_batch_size=3)
    batch = make_batch(module, "unsup")
    reference = step_grads(module, lambda: chunked_autograd(module, batch, 3))
    monkeypatch.setattr(gc.RNGState, "replay", lambda self: nullcontext())
    _, grads = step_grads(module, lambda: module.training_step(batch, 0))
    assert max((grads[k] - reference[1][k]).abs().max().item() for k in grads) > 1e-3


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("setting", ["unsup", "sup"])
def test_chunked_step_equals_the_one_pass_step_without_dropout(tiny_model_no_dropout, setting, builder):
    """In float64: chunks of 3 rows and one pass of 8 round differently, and the near-identical embeddings of the
    untrained tiny BERT amplify that in float32 (up to 2e-3 of the largest gradient on some CPUs). In float64 the
    two agree to ~1e-12 of it, so any real difference stands out."""
    module = make_module(tiny_model_no_dropout, builder).double()
    batch = make_batch(module, setting)
    plain = step_grads(module, lambda: module.training_step(batch, 0))
    module.mini_batch_size = 3
    cached = step_grads(module, lambda: module.training_step(batch, 0))
    assert_same(cached, plain, tol=1e-10)


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_matryoshka_chunked_step_equals_autograd_and_the_one_pass_step(tiny_model, tiny_model_no_dropout, builder):
    """Prefix losses through GradCache: the cached embedding gradient carries every prefix's term."""
    mat = dict(mlp="always", matryoshka_dims=[4, 16, 32], matryoshka_weights=[1.0, 0.5, 2.0])
    module = make_module(tiny_model, builder, mini_batch_size=3, **mat)
    batch = make_batch(module, "sup")
    assert_same(step_grads(module, lambda: module.training_step(batch, 0)),
                step_grads(module, lambda: chunked_autograd(module, batch, 3)))
    module = make_module(tiny_model_no_dropout, builder, **mat).double()
    plain = step_grads(module, lambda: module.training_step(batch, 0))
    module.mini_batch_size = 3
    assert_same(step_grads(module, lambda: module.training_step(batch, 0)), plain, tol=1e-10)


def test_single_backward_mode_for_ddp_gives_the_same_gradients(tiny_model):
    """``params=...`` (what DDP uses: one final backward) equals per-chunk backward, dropout on."""
    module = make_module(tiny_model, "simcse")
    batch = make_batch(module, "sup")
    params = [p for p in module.encoder.parameters() if p.requires_grad]

    def run(ps):
        return gc.grad_cached_loss(module.embed_views, module.views_loss, batch["input_ids"],
                                   batch["attention_mask"], 3, params=ps)

    assert_same(step_grads(module, lambda: run(params)), step_grads(module, lambda: run(None)))


def test_the_replay_runs_under_the_forward_passes_autocast(tiny_model_no_dropout):
    """Backward runs outside the step's autocast context: the replay re-enters it (bf16 as in the first pass)."""
    module = make_module(tiny_model_no_dropout, "simcse", mini_batch_size=4)
    batch = make_batch(module, "unsup")
    dtypes = []
    query = module.encoder.model.encoder.layer[0].attention.self.query
    query.register_forward_hook(lambda mod, args, out: dtypes.append((torch.is_grad_enabled(), out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    assert [d for g, d in dtypes] == [torch.bfloat16] * 2 and not any(g for g, _ in dtypes)
    loss.backward()
    assert dtypes[2:] == [(True, torch.bfloat16)] * 2  # the two replayed chunks


def test_no_grad_gives_the_loss_without_caching(tiny_model_no_dropout):
    module = make_module(tiny_model_no_dropout, "simcse", mini_batch_size=3)
    batch = make_batch(module, "unsup")
    with torch.no_grad():
        chunked = module.training_step(batch, 0)
        module.mini_batch_size = None
        plain = module.training_step(batch, 0)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-6)


def test_bad_mini_batch_size_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="mini_batch_size"):
        ContrastiveModule(tiny_model, mini_batch_size=0)


class CaptureGrads(pl.Callback):
    """Gradients before clipping (on_before_optimizer_step) and after the optimiser step (clipped, in place)."""

    def __init__(self) -> None:
        self.before: dict = {}
        self.after: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.after = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_in_lightning_accumulation_and_clipping_see_the_same_gradients(tmp_path, tiny_model_no_dropout, sample_data):
    """Automatic optimisation, 2 accumulated batches, clipping: the hook gets 1/2 and clipping acts after it.
    In float64 (precision="64-true"), for the reason given on the one-pass test above."""
    from datamodules import SentencesDataModule

    def fit(mini):
        module = make_module(tiny_model_no_dropout, "simcse", mini_batch_size=mini, lr=1e-3)
        capture = CaptureGrads()
        trainer = pl.Trainer(accelerator="cpu", precision="64-true", max_steps=1, accumulate_grad_batches=2,
                             gradient_clip_val=1e-3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[capture],
                             default_root_dir=tmp_path)
        trainer.fit(module, SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=8, shuffle=False))
        assert trainer.global_step == 1
        return capture

    plain, cached = fit(None), fit(3)
    for key in ("before", "after"):
        a, b = getattr(plain, key), getattr(cached, key)
        assert a.keys() == b.keys() and len(a) > 10
        scale = max(g.abs().max().item() for g in a.values())
        assert all(v.dtype == torch.float64 for v in a.values())
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-9 * scale
    norm = lambda g: torch.linalg.vector_norm(torch.stack([v.norm() for v in g.values()])).item()  # noqa: E731
    assert norm(cached.before) > 2e-3  # so clipping to 1e-3 acts
    assert norm(cached.after) == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------------------------------ no host sync
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default}


class RecordSyncs(TorchDispatchMode):
    """Records the calling frame of every op that makes the host wait for the device (.item(), bool(t),
    nonzero, boolean-mask indexing, unique): the innermost frame outside torch itself."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/torch/" not in f.filename and f.filename != __file__]
            self.callers.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mini", [None, 3])
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_no_host_sync_from_our_code_in_the_training_step(tiny_model, builder, mini):
    """Nothing in lightning_modules/ reads a tensor value on the host during a step (forward + backward).
    transformers itself makes one per forward pass (``padding_mask.all()`` in masking_utils, to drop the mask of
    an unpadded batch); it skips that check under torch.compile."""
    module = make_module(tiny_model, builder, mini_batch_size=mini)
    batch = make_batch(module, "sup")
    with RecordSyncs() as rec:
        module.training_step(batch, 0).backward()
    ours = [c for c in rec.callers if c.startswith(str(ROOT)) and "site-packages" not in c]
    assert ours == []
    assert all("transformers" in c for c in rec.callers), rec.callers
