"""What every benchmark script shares: its command line's ``--threads`` option, writing its JSON result, and a
random-weight BERT written on the spot (the GPU machines receive no pretrained weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def add_threads(ap: argparse.ArgumentParser, default: int = 0) -> None:
    """``--threads N``: torch's intra-op threads for the run (0 keeps torch's default); :func:`parse` applies it."""
    ap.add_argument("--threads", type=int, default=default, help="torch threads; 0 keeps torch's default")


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line and apply ``--threads`` (when the script has it and it is not 0)."""
    args = ap.parse_args()
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return args


def write_json(path: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def write_random_bert(folder: Path, layers: int | None, hidden: int | None, words: list[str] | None = None):
    """A random-weight BERT (``BertConfig`` defaults unless shrunk) and a synthetic tokenizer; returns its config.
    The tokenizer's vocabulary is ``words`` (each text word is a token, and the embedding has one row per word) or,
    without them, BERT's 30,522 placeholder tokens (every real word is then [UNK]; the shapes are BERT's)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    config = BertConfig()
    if layers:
        config.num_hidden_layers = layers
    if hidden:
        config.hidden_size, config.intermediate_size = hidden, 4 * hidden
        config.num_attention_heads = max(1, hidden // 64)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if words is not None:
        vocab = specials + sorted(set(words) - set(specials))
        config.vocab_size = len(vocab)
    else:
        vocab = specials + [f"w{i}" for i in range(config.vocab_size - 5)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return config


def text_words(*paths: Path) -> list[str]:
    """The words BERT's pre-tokeniser (lower-cased, punctuation apart) finds in text files (``write_random_bert``)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalize, split = BertNormalizer(lowercase=True).normalize_str, BertPreTokenizer().pre_tokenize_str
    return sorted({word for path in paths for line in Path(path).read_text().splitlines()
                   for word, _ in split(normalize(line))})
