"""A small synthetic corpus written by the project itself (no third-party text): sentences for unsupervised
training and graded STS pairs, so the quickstart and tests run on a fresh machine with no network.

Sentences follow ``<subject> <verb> <object> <place>``; each slot has a few paraphrases. A pair's gold score is
5 x (the share of the four slots whose meaning the two sentences share), so paraphrases score 5 and unrelated
sentences 0.

    python -m datamodules.sample OUTPUT_DIR      # writes sentences.txt and sts_dev.tsv
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SLOTS = [
    [["a man", "a guy", "a gentleman"], ["a woman", "a lady"], ["a child", "a kid", "a little boy"],
     ["the dog", "the puppy"], ["an old farmer", "an elderly farmer"], ["two students", "a pair of students"]],
    [["is playing", "plays"], ["is cooking", "is preparing"], ["is reading", "reads"], ["is painting", "paints"],
     ["is carrying", "carries"], ["is cleaning", "is washing"]],
    [["a guitar", "an acoustic guitar"], ["some pasta", "a bowl of noodles"], ["a newspaper", "the daily paper"],
     ["a large wall", "a big wall"], ["a heavy box", "a weighty crate"], ["the car", "the automobile"]],
    [["in the park", "at the park"], ["in the kitchen", "inside the kitchen"], ["on the beach", "by the sea"],
     ["at school", "in the classroom"], ["in the garden", "in the yard"], ["downtown", "in the city centre"]],
]


def sentence(meaning: tuple[int, ...], rng: random.Random) -> str:
    words = [rng.choice(SLOTS[s][m]) for s, m in enumerate(meaning)]
    return (" ".join(words) + ".").capitalize()


def random_meaning(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randrange(len(slot)) for slot in SLOTS)


def write_sample(output_dir: str | Path, n_sentences: int = 600, n_pairs: int = 200, seed: int = 0) -> Path:
    """Write ``sentences.txt`` (one per line) and ``sts_dev.tsv`` (sentence1, sentence2, score in [0, 5])."""
    rng = random.Random(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sentences = [sentence(random_meaning(rng), rng) for _ in range(n_sentences)]
    (out / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    rows = ["sentence1\tsentence2\tscore"]
    for i in range(n_pairs):
        a = random_meaning(rng)
        shared = i % (len(SLOTS) + 1)  # 0..4 slots in common, evenly spread
        keep = set(rng.sample(range(len(SLOTS)), shared))
        b = tuple(a[s] if s in keep else rng.choice([m for m in range(len(SLOTS[s])) if m != a[s]])
                  for s in range(len(SLOTS)))
        rows.append(f"{sentence(a, rng)}\t{sentence(b, rng)}\t{5.0 * shared / len(SLOTS):.2f}")
    (out / "sts_dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    print(write_sample(sys.argv[1] if len(sys.argv) > 1 else "configs/quickstart_data"))
