"""`train.py mine`: hard negatives mined by sentence-transformers' mine_hard_negatives, written as SimCSE triplets.

The expectations are computed here from the model's own cosines (a plain loop over the embeddings), not read from
sentence-transformers: which candidate is hardest, which ranks range_min skips, which candidates max_score and the
margin remove, and which pairs are left without any.
"""

from __future__ import annotations

import csv
import math
import random

import pytest

import train
from commands.mine import mine_main
from core.errors import DataError
from datamodules import NLIDataModule
from datamodules.mining import (
    MINING_NEEDS,
    MiningReport,
    check_sentence_transformers,
    mine_triplets,
    read_pairs,
    sentence_transformers_release,
    write_triplets,
)
from datamodules.sample import random_meaning, sentence

#: Mining needs a newer sentence-transformers than the project's floor (the floors job runs these tests there)
INSTALLED = sentence_transformers_release()
needs_mining = pytest.mark.skipif(INSTALLED < MINING_NEEDS, reason=f"mine_hard_negatives needs "
                                  f"sentence-transformers >= {MINING_NEEDS} (installed {INSTALLED})")


def test_the_release_is_read_from_any_version_form():
    assert [sentence_transformers_release(v) for v in ("5.7rc1", "5.10.0", "6.0.dev3", "5.2", "1!5.7")] == [
        (5, 7), (5, 10), (6, 0), (5, 2), (5, 7)]  # an epoch prefix is not the major version


def test_an_older_sentence_transformers_is_named_in_one_line():
    with pytest.raises(DataError, match=r"^train.py mine needs sentence-transformers >= 5.7 \(installed: 5.2.0;") as e:
        check_sentence_transformers("5.2.0")
    assert "\n" not in str(e.value)
    check_sentence_transformers("5.7.0")
    check_sentence_transformers("6.3.0.dev0")


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` pairs of two wordings of one meaning (the sample corpus' paraphrases; every word is in the tiny
    model's vocabulary), all sentences distinct."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < n:
        meaning = random_meaning(rng)
        a, p = sentence(meaning, rng), sentence(meaning, rng)
        if a != p and not {a, p} & seen:
            seen |= {a, p}
            pairs.append((a, p))
    return pairs


PAIRS = make_pairs(12)


@pytest.fixture(scope="module")
def st_folder(tiny_model, tmp_path_factory):
    """The tiny BERT as a sentence-transformers folder (mean pooling, normalised), written by the project's export."""
    from lightning_modules import ContrastiveModule
    from lightning_modules.export import export_sentence_transformer

    return export_sentence_transformer(ContrastiveModule(tiny_model, pooler="mean", max_length=16),
                                       tmp_path_factory.mktemp("mine") / "st")


@pytest.fixture(scope="module")
def st(st_folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(st_folder), device="cpu")


def cosine(u, v) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def cosines(st, anchors, candidates) -> dict[tuple[str, str], float]:
    vectors = dict(zip(list(anchors) + list(candidates),
                       st.encode(list(anchors) + list(candidates), convert_to_numpy=True).tolist()))
    return {(a, c): cosine(vectors[a], vectors[c]) for a in anchors for c in candidates}


def ranked(pairs, corpus, cos) -> dict[str, list[str]]:
    """Each anchor's candidates, most similar first: the corpus (and every positive) minus the anchor's own
    positives and its own text, as sentence-transformers defines them."""
    positives = {}
    for a, p in pairs:
        positives.setdefault(a, set()).add(p)
    pool = list(dict.fromkeys(list(corpus) + [p for _, p in pairs]))
    return {a: sorted((c for c in pool if c not in own and c != a), key=lambda c: -cos[a, c])
            for a, own in positives.items()}


def read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@needs_mining
def test_triplets_are_the_hardest_candidates_written_as_nli_rows(st, tmp_path):
    rows, report = mine_triplets(PAIRS, st)
    cos = cosines(st, [a for a, _ in PAIRS], [p for _, p in PAIRS])
    order = ranked(PAIRS, [], cos)
    assert [r[:2] for r in rows] == PAIRS  # every pair, in the input order, one negative each
    for a, p, n in rows:
        assert n in {q for _, q in PAIRS} and n != p
        assert n == order[a][0]  # "top": the candidate the model finds most similar to the anchor
    assert report == MiningReport(pairs=12, distinct_pairs=12, triplets=12, num_negatives=1,
                                  seconds=report.seconds)

    out = write_triplets(tmp_path / "mined.csv", rows)
    table = read_csv(out)
    assert table[0] == ["sent0", "sent1", "hard_neg"]
    assert [tuple(r) for r in table[1:]] == rows
    data = NLIDataModule(str(out), batch_size=4)
    assert data.texts == rows  # what a recipe trains on


@needs_mining
def test_range_min_skips_the_most_similar_candidates(st):
    cos = cosines(st, [a for a, _ in PAIRS], [p for _, p in PAIRS])
    order = ranked(PAIRS, [], cos)
    for k in (1, 3):
        rows, report = mine_triplets(PAIRS, st, range_min=k, range_max=k + 4)
        assert report.triplets == 12 and not report.unmined
        for a, _, n in rows:
            assert n not in order[a][:k]
            assert n == order[a][k]  # the next one down ("top" after the skipped ranks)


@needs_mining
def test_max_score_and_margin_remove_candidates_and_the_pairs_left_without_any_are_counted(st, capsys):
    cos = cosines(st, [a for a, _ in PAIRS], [p for _, p in PAIRS])
    order = ranked(PAIRS, [], cos)
    # a threshold between the anchors' least similar candidates: some anchors keep none at or below it
    lows = sorted(cos[a, order[a][-1]] for a in order)
    threshold = (lows[7] + lows[8]) / 2  # the four anchors whose least similar candidate is above it
    want_unmined = [i for i, (a, _) in enumerate(PAIRS) if all(cos[a, c] > threshold for c in order[a])]
    assert len(want_unmined) == 4
    rows, report = mine_triplets(PAIRS, st, max_score=threshold, range_max=len(PAIRS))
    assert report.unmined == want_unmined
    assert report.triplets == len(rows) == len(PAIRS) - 4
    for a, _, n in rows:
        assert cos[a, n] <= threshold
        assert n == next(c for c in order[a] if cos[a, c] <= threshold)  # the hardest one left
    assert "8 triplets from 12 pairs" in report.summary() and "4 pairs had no candidate" in report.summary()

    margin = 0.02
    rows, report = mine_triplets(PAIRS, st, absolute_margin=margin, range_max=len(PAIRS))
    positive = dict(PAIRS)
    for a, _, n in rows:
        assert cos[a, n] <= cos[a, positive[a]] - margin
    assert report.unmined == [i for i, (a, p) in enumerate(PAIRS)
                              if all(cos[a, c] > cos[a, p] - margin for c in order[a])]
    capsys.readouterr()


@needs_mining
def test_several_negatives_a_corpus_and_repeated_pairs(st):
    corpus = [s for pair in make_pairs(6, seed=1) for s in pair]
    pairs = PAIRS[:6] + [PAIRS[0]]  # the first pair twice
    rows, report = mine_triplets(pairs, st, corpus=corpus, num_negatives=3)
    cos = cosines(st, [a for a, _ in pairs], corpus + [p for _, p in pairs])
    order = ranked(pairs, corpus, cos)
    assert report.pairs == 7 and report.distinct_pairs == 6 and report.triplets == 21 == len(rows)
    for i, (a, p) in enumerate(pairs):
        mine = rows[3 * i: 3 * i + 3]
        assert {r[:2] for r in mine} == {(a, p)}
        assert [r[2] for r in mine] == order[a][:3]  # one row per negative, hardest first
    assert "1 repeated pairs" in report.summary()


@needs_mining
def test_random_sampling_follows_the_seed_and_stays_within_the_range(st):
    cos = cosines(st, [a for a, _ in PAIRS], [p for _, p in PAIRS])
    order = ranked(PAIRS, [], cos)
    first, _ = mine_triplets(PAIRS, st, sampling_strategy="random", range_max=6, seed=3)
    again, _ = mine_triplets(PAIRS, st, sampling_strategy="random", range_max=6, seed=3)
    assert first == again
    assert all(n in order[a][:6] for a, _, n in first)
    others = [mine_triplets(PAIRS, st, sampling_strategy="random", range_max=6, seed=s)[0] for s in (4, 5)]
    assert any(o != first for o in others)
    state = random.getstate()
    mine_triplets(PAIRS, st, sampling_strategy="random", range_max=6, seed=3)
    assert random.getstate() == state  # the caller's random stream is left alone


@needs_mining
def test_options_sentence_transformers_refuses_are_data_errors(st):
    with pytest.raises(DataError, match="range_min must be smaller than range_max"):
        mine_triplets(PAIRS, st, range_min=5, range_max=5)
    with pytest.raises(DataError, match="num_negatives must be at least 1"):
        mine_triplets(PAIRS, st, num_negatives=0)
    with pytest.raises(DataError, match="none of the 12 pairs got a negative"):
        mine_triplets(PAIRS, st, max_score=-2.0)


def write_pairs(path, pairs, header=("sent0", "sent1")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(pairs)
    return path


@needs_mining
def test_mine_command_writes_the_triplets_and_reports(st, st_folder, tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.csv", PAIRS, header=("premise", "hypothesis"))
    out = tmp_path / "out" / "mined.csv"
    train.main(["mine", "--model", str(st_folder), "--pairs", str(pairs), "--output", str(out), "--anchor_column",
                "premise", "--positive_column", "hypothesis", "--num_negatives", "2", "--range_min", "1",
                "--verbose", "false"])
    printed = capsys.readouterr().out
    assert "mined 24 triplets from 12 pairs" in printed and str(out) in printed
    assert NLIDataModule(str(out)).texts == mine_triplets(PAIRS, st, num_negatives=2, range_min=1)[0]

    # an existing output is replaced only with --overwrite
    before = out.read_text()
    with pytest.raises(FileExistsError, match="exists: pass --overwrite") as err:
        train.main(["mine", "--model", str(st_folder), "--pairs", str(pairs), "--output", str(out),
                    "--anchor_column", "premise", "--positive_column", "hypothesis", "--verbose", "false"])
    assert out.read_text() == before and "\n" not in train.user_error(err.value)
    train.main(["mine", "--model", str(st_folder), "--pairs", str(pairs), "--output", str(out), "--anchor_column",
                "premise", "--positive_column", "hypothesis", "--overwrite", "true", "--verbose", "false"])
    assert len(read_csv(out)) == 13


@needs_mining
def test_unmined_pairs_are_printed_not_dropped_silently(st, st_folder, tmp_path, capsys):
    cos = cosines(st, [a for a, _ in PAIRS], [p for _, p in PAIRS])
    order = ranked(PAIRS, [], cos)
    lows = sorted(cos[a, order[a][-1]] for a in order)
    threshold = (lows[9] + lows[10]) / 2  # two anchors have no candidate at or below it
    pairs = write_pairs(tmp_path / "pairs.csv", PAIRS)
    out = tmp_path / "mined.csv"
    train.main(["mine", "--model", str(st_folder), "--pairs", str(pairs), "--output", str(out),
                "--max_score", repr(threshold), "--range_max", "12", "--verbose", "false"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("mined 10 triplets from 12 pairs")
    assert "; 2 pairs had no candidate within the range/margin/score limits and are not in the output" in printed
    assert len(read_csv(out)) - 1 == 10


@needs_mining
@pytest.mark.parametrize("case", ["missing_pairs", "wrong_column", "empty_sentence", "not_csv", "no_model",
                                  "same_columns", "bad_range"])
def test_bad_inputs_are_one_line_errors(case, st_folder, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.csv", PAIRS)
    args = {"--model": str(st_folder), "--pairs": str(pairs), "--output": str(tmp_path / "out.csv")}
    extra, want = [], None
    if case == "missing_pairs":
        args["--pairs"], want = str(tmp_path / "nope.csv"), "nope.csv' not found"
    elif case == "wrong_column":
        extra, want = ["--anchor_column", "premise"], "lacks column(s) ['premise'] (set --anchor_column"
    elif case == "empty_sentence":
        (tmp_path / "pairs.csv").write_text("sent0,sent1\na man plays,a guy plays\n  ,the dog\n")
        want = "pairs.csv: line 3 has an empty 'sent0'"
    elif case == "not_csv":
        args["--output"], want = str(tmp_path / "out.json"), "give a .csv file"
    elif case == "no_model":
        args["--model"], want = str(tmp_path / "no_model"), "could not load model"
    elif case == "same_columns":
        extra, want = ["--positive_column", "sent0"], "are both 'sent0'"
    elif case == "bad_range":
        extra, want = ["--range_min", "3", "--range_max", "2"], "range_min must be smaller than range_max"
    argv = ["mine", *[x for kv in args.items() for x in kv], *extra, "--verbose", "false"]
    with pytest.raises((DataError, FileNotFoundError, FileExistsError)) as err:
        train.main(argv)
    message = train.user_error(err.value)
    assert message is not None and "\n" not in message and want in message, message
    assert not (tmp_path / "out.csv").exists()


@needs_mining
def test_the_shell_gets_one_error_line_and_exit_1(tmp_path):
    import os
    import subprocess
    import sys

    pairs = write_pairs(tmp_path / "pairs.csv", PAIRS)
    (tmp_path / "out.csv").write_text("sent0,sent1,hard_neg\na,b,c\n")
    proc = subprocess.run([sys.executable, train.__file__, "mine", "--model", "unused", "--pairs", str(pairs),
                           "--output", str(tmp_path / "out.csv")],
                          capture_output=True, text=True, env={**os.environ, "EMBEDLAB_TRACEBACK": ""}, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (f"error: {tmp_path / 'out.csv'} exists: pass --overwrite to replace it, or give another --output"
            in proc.stderr.splitlines())


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["mine", "--help"])
    assert exit_info.value.code == 0
    said = capsys.readouterr().out
    for option in ("--range_min", "--range_max", "--absolute_margin", "--relative_margin", "--max_score",
                   "--min_score", "--num_negatives", "--sampling_strategy", "--corpus", "--seed", "--overwrite"):
        assert option in said


@needs_mining
def test_a_checkpoint_mines_like_its_export(tiny_model, sample_data, tmp_path):
    """A .ckpt is exported into a temporary folder and mined with; the same triplets as its `train.py export`."""
    import pytorch_lightning as pl

    from datamodules import SentencesDataModule
    from lightning_modules import ContrastiveModule
    from lightning_modules.export import export_sentence_transformer

    pl.seed_everything(0)
    module = ContrastiveModule(tiny_model, pooler="mean", max_length=16, lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    folder = export_sentence_transformer(module, tmp_path / "export")
    pairs = write_pairs(tmp_path / "pairs.csv", PAIRS)
    for model, out in ((tmp_path / "model.ckpt", "from_ckpt.csv"), (folder, "from_export.csv")):
        train.main(["mine", "--model", str(model), "--pairs", str(pairs), "--output", str(tmp_path / out),
                    "--num_negatives", "2", "--verbose", "false"])
    assert read_csv(tmp_path / "from_ckpt.csv") == read_csv(tmp_path / "from_export.csv")
    assert len(read_csv(tmp_path / "from_ckpt.csv")) == 25


def test_written_triplets_with_commas_quotes_and_line_breaks_read_back_unchanged(tmp_path):
    rows = [("A man , a plan .", 'He said "hi" .', "two\nlines"), ("plain", "text", "here, too")]
    out = write_triplets(tmp_path / "t.csv", rows)
    assert NLIDataModule(str(out)).texts == rows
    with pytest.raises(FileExistsError):
        write_triplets(out, rows[:1])
    assert NLIDataModule(str(write_triplets(out, rows[:1], overwrite=True))).texts == rows[:1]


def test_read_pairs_reads_tsv_too(tmp_path):
    (tmp_path / "pairs.tsv").write_text("sent0\tsent1\nA man , a plan .\tA \"plan\" .\n")
    assert read_pairs(str(tmp_path / "pairs.tsv")) == [("A man , a plan .", 'A "plan" .')]


@pytest.mark.data
@needs_mining
def test_real_pairs_with_minilm_read_back_as_nli_triplets(shared_data, minilm, tmp_path, capsys):
    source = shared_data / "nli" / "snli_devtest_for_simcse.csv"
    if not source.is_file():
        pytest.skip(f"needs {source}")
    pairs = read_pairs(str(source))[:200]
    write_pairs(tmp_path / "pairs.csv", pairs)
    out = tmp_path / "mined.csv"
    report = mine_main(["--model", minilm, "--pairs", str(tmp_path / "pairs.csv"), "--output", str(out),
                              "--relative_margin", "0.05", "--device", "cpu", "--verbose", "false"])
    assert "from 200 pairs" in capsys.readouterr().out
    rows = NLIDataModule(str(out), columns=["sent0", "sent1", "hard_neg"]).texts
    assert len(rows) == report.triplets == 200 - len(report.unmined) > 150
    positives = {p for _, p in pairs}
    own = {}
    for a, p in pairs:
        own.setdefault(a, set()).add(p)
    for a, p, n in rows:
        assert (a, p) in set(pairs) and n in positives and n not in own[a]
