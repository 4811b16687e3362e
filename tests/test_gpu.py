"""The GPU paths, each against its CPU or float32 reference, on CUDA (``pytest -m gpu``; skipped without CUDA).

What only a GPU exercises: bf16-mixed autocast with fused AdamW, SDPA attention kernels, ``torch.compile`` with
dynamic shapes (inductor's Triton code), GradCache's RNG replay of CUDA dropout masks, the SAE's sparse kernels
(``sampled_addmm`` on CSR, ``embedding_bag`` backward), activation caching, pinned-memory loaders, and the export of
a bf16-trained module. Sizes are small (a whole file runs in about a minute on one GPU, compile included).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

# EMBEDLAB_GPU_TESTS_DEVICE=cpu runs these same tests on the CPU: a check of the tests themselves (their setup and
# references) on a machine without a GPU, before device time is spent on them. It proves nothing about CUDA.
CUDA = os.environ.get("EMBEDLAB_GPU_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device (pytest -m gpu on a GPU)")]
ACCELERATOR = "gpu" if CUDA == "cuda" else "cpu"
SENTENCES = ["a man is playing a guitar .", "the dog", "a lady is reading the daily paper in the park .",
             "two students cooking pasta", "an old farmer carries a heavy box", "hello world",
             "a child paints the wall in the garden", "the car is in the city centre downtown ."]


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest entry-wise difference of each tensor relative to that tensor's largest reference entry, worst of all
    tensors (so a wrong small tensor, a bias or the threshold, cannot hide under a large one)."""
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-12)

    return max(rel(got[k].cpu(), want[k].cpu()) for k in want)


# ------------------------------------------------------------------------------------ GradCache on CUDA
@pytest.mark.parametrize("setting", ["unsup", "sup"])
def test_grad_cache_replays_cuda_dropout_masks_under_bf16(tiny_model, setting):
    """Chunks of 3 rows with CUDA dropout on, under bf16 autocast: the same loss and gradients as autograd over the
    same chunked forward passes (the masks are replayed from the CUDA generator); without the replay they differ."""
    from test_grad_cache import chunked_autograd, make_batch, make_module, step_grads

    module = make_module(tiny_model, "simcse", mini_batch_size=3).to(CUDA)
    batch = {k: v.to(CUDA) for k, v in make_batch(module, setting).items()}

    def under_bf16(fn):
        def run():
            with torch.autocast(CUDA, dtype=torch.bfloat16):
                return fn()
        return run

    cached = step_grads(module, under_bf16(lambda: module.training_step(batch, 0)))
    reference = step_grads(module, under_bf16(lambda: chunked_autograd(module, batch, 3)))
    torch.testing.assert_close(cached[0], reference[0], rtol=0, atol=1e-3)
    assert relative_error(cached[1], reference[1]) < 2e-2
    assert module.encoder.model.training


# ------------------------------------------------------------------------------------ SAE kernels on CUDA
@pytest.mark.parametrize("widths", [[], [128, 512, 1024]], ids=["plain", "matryoshka"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sae_sparse_backward_on_cuda_equals_dense_autograd(dtype, widths):
    """``sampled_addmm`` on CSR and ``embedding_bag`` backward on CUDA against the dense formula (test_sae's
    reference), with dead latents so AuxK runs too, at a size where the CUDA kernels really tile."""
    from test_sae import dense_reference

    from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE

    torch.manual_seed(0)
    cfg = BatchTopKConfig(d_in=64, num_latents=1024, k=8, k_aux=32, dead_after=5, aux_coef=0.25,
                          normalize_input=False, matryoshka_widths=widths)
    sae = BatchTopKSAE(cfg).to(CUDA, dtype).train()
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.1)
    sae.tokens_since_fired[::7] = 5  # every 7th latent dead
    x = torch.randn(256, 64, device=CUDA, dtype=dtype)
    out = sae(x)
    out.loss.backward()
    loss, grads = dense_reference(sae, x)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.loss, loss, rtol=tol, atol=tol)
    got = {n: p.grad for n, p in sae.named_parameters()}
    assert relative_error(got, grads) < tol * 10


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adam"])
def test_sae_trains_on_cuda_like_on_cpu(tiny_cache_vectors, optimizer):
    """Five SAE steps (sparse kernels, decoder projection and renormalisation, threshold EMA) on CUDA and on CPU
    from the same start: the same weights to float32 rounding.

    With SGD every tensor must agree. Adam divides each gradient by its own running magnitude, so an encoder bias
    entry whose gradient is a rounding-level near-zero moves by +-lr on one device and -+lr on the other: on the CPU
    alone, float32 against float64 gives b_enc a relative difference of 8e-2 after 5 steps, every other tensor
    under 3e-4. Under Adam b_enc is therefore left out, and the others are held to 1e-2.
    """
    from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE

    def train(device: str) -> BatchTopKSAE:
        torch.manual_seed(0)
        sae = BatchTopKSAE(BatchTopKConfig(d_in=32, num_latents=256, k=4, threshold_start=1)).to(device)
        x = tiny_cache_vectors.to(device)
        sae.initialize(x[:128])
        opt = (torch.optim.SGD(sae.parameters(), lr=1e-2) if optimizer == "sgd"
               else torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True))
        for step in range(5):
            batch = x[step * 64 : (step + 1) * 64]
            out = sae(batch)
            out.loss.backward()
            sae.project_decoder_grad()
            opt.step()
            opt.zero_grad()
            sae.normalize_decoder()
            sae.update_stats(out.fired, len(batch), out.acts.min() / sae.input_scale)
        return sae

    gpu, cpu = train(CUDA), train("cpu")
    skip = {"b_enc"} if optimizer == "fused_adam" else set()
    got = {k: v.cpu() for k, v in gpu.state_dict().items() if v.is_floating_point() and k not in skip}
    want = {k: v for k, v in cpu.state_dict().items() if v.is_floating_point() and k not in skip}
    assert relative_error(got, want) < (1e-4 if optimizer == "sgd" else 1e-2)
    if optimizer == "sgd":  # the same latents fired (under Adam a +-lr bias step may move one across the cut)
        assert torch.equal(gpu.tokens_since_fired.cpu(), cpu.tokens_since_fired)


@pytest.fixture(scope="module")
def tiny_cache_vectors() -> torch.Tensor:
    return torch.randn(512, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------ encoder kernels
def test_sdpa_on_cuda_equals_eager_with_padding(tiny_model):
    from lightning_modules.components.encoder import Encoder

    sdpa = Encoder(tiny_model, pooler="mean", attn_implementation="sdpa").eval().to(CUDA)
    eager = Encoder(tiny_model, pooler="mean", attn_implementation="eager").eval().to(CUDA)
    batch = {k: v.to(CUDA) for k, v in sdpa.collate(sdpa.tokenize(SENTENCES)).items()}
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(**batch), eager(**batch), rtol=0, atol=1e-5)


def test_compiled_encoder_on_cuda_matches_eager_and_keeps_one_graph_across_lengths(tiny_model):
    import torch._dynamo

    from lightning_modules.components.encoder import Encoder

    torch._dynamo.reset()
    compiled = Encoder(tiny_model, pooler="mean", compile=True).eval().to(CUDA)
    eager = Encoder(tiny_model, pooler="mean").eval().to(CUDA)
    frames = []
    with torch.no_grad():
        for sentences in (SENTENCES[:2], SENTENCES, SENTENCES[3:]):  # three batch sizes and padded lengths
            batch = {k: v.to(CUDA) for k, v in compiled.collate(compiled.tokenize(sentences)).items()}
            torch.testing.assert_close(compiled(**batch), eager(**batch), rtol=1e-4, atol=1e-5)
            frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[-1] <= 2, f"recompiled per shape: {frames}"  # the static first graph, then one dynamic one


# ------------------------------------------------------------------------------------ a whole bf16 run
def test_bf16_fit_on_cuda_uses_fused_adamw_pinned_workers_and_exports_what_it_trained(tiny_model, sample_data,
                                                                                        tmp_path):
    """train.py fit on one GPU with gpu_fast's switches (bf16-mixed, SDPA, compile, pad-to-8, length grouping,
    pinned memory, workers), then train.py export: SentenceTransformer(folder) encodes like the trained module."""
    from sentence_transformers import SentenceTransformer
    from test_train_cli import fit_args

    import train

    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.accelerator", ACCELERATOR, "--trainer.devices", "1",
                    "--trainer.precision", "bf16-mixed", "--model.attn_implementation", "sdpa",
                    "--model.compile", "true", "--model.pooler", "mean", "--data.pad_to_multiple_of", "8",
                    "--data.group_by_length", "true", "--data.pin_memory", "true", "--data.num_workers", "2",
                    "--trainer.max_steps", "6")
    cli = train.main(args)
    assert cli.trainer.global_step == 6
    optimizer = cli.trainer.optimizers[0]
    # Lightning moves the module back to the CPU when fit ends: the strategy's device says where it trained
    assert optimizer.defaults["fused"] is True and cli.trainer.strategy.root_device.type == CUDA
    assert cli.trainer.train_dataloader.pin_memory or CUDA == "cpu"
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    train.main(["export", "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "st")])
    st = SentenceTransformer(str(tmp_path / "st"), device=CUDA)
    got = st.encode(SENTENCES, convert_to_tensor=True)
    module = cli.model.eval()
    want = F.normalize(module.encode(SENTENCES), dim=-1).to(got.device)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # both float32 at inference


# ------------------------------------------------------------------------------------ activation caching
@pytest.mark.parametrize("level", ["token", "sentence"])
def test_activation_caching_on_cuda_equals_cpu(level, tiny_model_no_dropout, sample_data, tmp_path):
    from datamodules.activation_cache import ActivationCache
    from datamodules.activations import ActivationsDataModule

    def build(device: str) -> ActivationCache:
        dm = ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, source=str(sample_data / "sentences.txt"),
                                   cache_dir=str(tmp_path / device), level=level, max_length=32,
                                   encode_device=device, cache_dtype="float32")
        dm.prepare_data()
        return ActivationCache(dm.cache_folder())

    gpu, cpu = build(CUDA), build("cpu")
    assert len(gpu) == len(cpu) > 0
    import numpy as np

    rows = np.arange(len(cpu))
    torch.testing.assert_close(torch.as_tensor(gpu.gather(rows)), torch.as_tensor(cpu.gather(rows)),
                               rtol=1e-4, atol=1e-4)
