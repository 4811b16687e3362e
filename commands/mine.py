"""``train.py mine``: (anchor, positive) pairs to SimCSE triplets with hard negatives mined by
sentence-transformers' ``mine_hard_negatives``."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from datamodules.mining import (
    SAMPLING_STRATEGIES,
    MiningReport,
    check_output,
    check_sentence_transformers,
    mine_triplets,
    read_corpus,
    read_pairs,
    write_triplets,
)
from evaluation.evaluate import load_sentence_transformer


def mine_main(argv: list[str]) -> MiningReport:
    """``mine --model M --pairs FILE --output FILE``: give (anchor, positive) pairs hard negatives mined by
    sentence-transformers' ``mine_hard_negatives`` (its options, under its names) and write SimCSE-style triplets,
    the CSV ``sent0,sent1,hard_neg`` that ``datamodules.NLIDataModule`` trains on (``datamodules/mining.py``). Pairs
    that get no negative are not written; the last line printed counts them."""

    parser = ArgumentParser(prog="train.py mine", description=mine_main.__doc__)
    parser.add_argument("--model", type=str, required=True,
                        help="a sentence-transformers or Hugging Face folder, a hub name, or a .ckpt written by "
                             "`train.py fit` (exported into a temporary folder first)")
    parser.add_argument("--pairs", type=str, required=True, help="CSV/TSV with a header (or a hub dataset)")
    parser.add_argument("--output", type=str, required=True, help="the .csv to write (sent0,sent1,hard_neg)")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace an existing --output")
    parser.add_argument("--anchor_column", type=str, default="sent0", help="column of --pairs holding the anchors")
    parser.add_argument("--positive_column", type=str, default="sent1", help="column holding the positives")
    parser.add_argument("--corpus", type=str | None, default=None,
                        help="more candidate negatives: .txt (one per line), .csv/.tsv with --corpus_column, or a "
                             "dataset (default: only the positives of all pairs, which stay candidates anyway)")
    parser.add_argument("--corpus_column", type=str, default="text", help="column of a .csv/.tsv --corpus")
    parser.add_argument("--num_negatives", type=int, default=1,
                        help="negatives per pair; each is written as its own triplet row")
    parser.add_argument("--range_min", type=int, default=0,
                        help="skip this many most similar candidates (ranked by cosine to the anchor)")
    parser.add_argument("--range_max", type=int | None, default=None,
                        help="consider only the this many most similar candidates (default: sentence-transformers')")
    parser.add_argument("--margin", "--absolute_margin", dest="absolute_margin", type=float | None, default=None,
                        help="keep a candidate only if its cosine is at least this much below the positive's")
    parser.add_argument("--relative_margin", type=float | None, default=None,
                        help="keep a candidate only if its cosine <= positive's - |positive's| x this (e.g. 0.05)")
    parser.add_argument("--max_score", type=float | None, default=None, help="drop candidates with a higher cosine")
    parser.add_argument("--min_score", type=float | None, default=None, help="drop candidates with a lower cosine")
    parser.add_argument("--sampling_strategy", type=str, default="top", choices=SAMPLING_STRATEGIES,
                        help="top: the most similar valid candidates; random: drawn among the valid ones (--seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sampling_strategy random")
    parser.add_argument("--batch_size", type=int, default=32, help="sentences per forward pass")
    parser.add_argument("--device", type=str, default="auto", help="cpu, cuda, ... or auto (CUDA when available)")
    parser.add_argument("--verbose", type=bool, default=True,
                        help="let sentence-transformers print its score statistics (its encoding progress bars show "
                             "either way: it turns them on itself)")
    args = parser.parse_args(argv)
    check_sentence_transformers()
    check_output(args.output, args.overwrite)  # before the minutes of mining, not after
    pairs = read_pairs(args.pairs, args.anchor_column, args.positive_column)
    corpus = read_corpus(args.corpus, args.corpus_column) if args.corpus is not None else None
    model = load_sentence_transformer(args.model, args.device, args.batch_size)
    rows, report = mine_triplets(
        pairs, model, corpus, num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin, max_score=args.max_score,
        min_score=args.min_score, sampling_strategy=args.sampling_strategy, batch_size=args.batch_size,
        seed=args.seed, verbose=args.verbose)
    out = write_triplets(args.output, rows, overwrite=args.overwrite)
    print(f"{report.summary()} -> {out}")
    return report
