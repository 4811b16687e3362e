import pytest
import torch
import torch.nn.functional as F
from conftest import modes

from lightning_modules import ContrastiveModule
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE
from lightning_modules.export import export_sae, export_sentence_transformer

SENTENCES = [f"{a} {v} {o} ." for a in ("a man", "the dog", "a lady", "two students")
             for v in ("is playing", "reads", "carries", "is cleaning") for o in ("a guitar", "the car")]


@pytest.mark.parametrize(
    "pooler,mlp", [("cls", "train_only"), ("cls", "always"), ("mean", "none"), ("first_last_avg", "none"),
                   ("mean", "always")]
)
def test_exported_folder_encodes_like_the_module(tiny_model, tmp_path, pooler, mlp):
    from sentence_transformers import SentenceTransformer

    assert len(SENTENCES) == 32
    module = ContrastiveModule(tiny_model, pooler=pooler, mlp=mlp, max_length=16)
    with torch.no_grad():  # move away from the saved weights so a stale export would be caught
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_sentence_transformer(module, tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(SENTENCES, convert_to_tensor=True, batch_size=7)
    want = F.normalize(module.encode(SENTENCES), dim=-1)
    assert (got - want).abs().max().item() < 1e-5
    assert module.encoder.training  # export leaves the training mode alone


def test_every_exported_file_is_readable_as_the_umask_allows(tiny_model, tmp_path, umask_022):
    # safetensors' save_file writes its file 0600 whatever the umask: a teammate could read the export but its weights
    st = export_sentence_transformer(ContrastiveModule(tiny_model, pooler="mean", max_length=16), tmp_path / "st")
    sae = export_sae(BatchTopKSAE(BatchTopKConfig(d_in=4, num_latents=8, k=2)), tmp_path / "sae")
    got = {**modes(st), **modes(sae)}
    assert {"model.safetensors", "sae.safetensors", "config.json"} <= set(got)
    assert set(got.values()) == {"644"}, got
    assert oct(st.stat().st_mode & 0o777) == oct(sae.stat().st_mode & 0o777) == "0o755"
