import pytest
import torch
from transformers import AutoTokenizer

from datamodules import DataError, NLIDataModule, SentencesDataModule, load_sts
from datamodules.base import PadCollator
from datamodules.sentences import read_sentences


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_sentences_txt_with_data_root(tmp_path, tokenizer):
    (tmp_path / "corpus.txt").write_text("a man .\nthe dog is playing .\na lady reads .\n")
    dm = SentencesDataModule("corpus.txt", data_root=str(tmp_path), batch_size=2, shuffle=False)
    dm.connect(tokenizer, 8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[:2] == (2, 1)
    assert len(dm.train_dataloader()) == 1  # drop_last: 3 rows -> one batch of 2
    ids = tokenizer(["a man .", "the dog is playing ."])["input_ids"]
    assert batch["input_ids"][0, 0, : len(ids[0])].tolist() == ids[0]
    assert batch["attention_mask"][0, 0].sum().item() == len(ids[0])


def test_tokenises_once(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("a man .\nthe dog .\n")
    calls = []

    class Counting:
        pad_token_id = tokenizer.pad_token_id

        def __call__(self, *a, **k):
            calls.append(1)
            return tokenizer(*a, **k)

    dm = SentencesDataModule(str(tmp_path / "c.txt"), batch_size=1)
    dm.connect(Counting(), 8)
    dm.train_dataloader(), dm.train_dataloader()
    assert len(calls) == 1


def test_pad_collator_shapes():
    out = PadCollator(0)([([5, 6, 7], [8]), ([9], [1, 2])])
    assert out["input_ids"].tolist() == [[[5, 6, 7], [8, 0, 0]], [[9, 0, 0], [1, 2, 0]]]
    assert out["attention_mask"].sum().item() == 7


def test_empty_sentence_names_the_row(tmp_path):
    (tmp_path / "c.txt").write_text("one\n\nthree\n")
    with pytest.raises(DataError, match=r"c.txt: line 2 is an empty sentence"):
        read_sentences(str(tmp_path / "c.txt"))
    with pytest.warns(UserWarning, match="skipped 1 empty"):
        assert read_sentences(str(tmp_path / "c.txt"), skip_empty=True) == ["one", "three"]


def test_missing_file_and_wrong_column(tmp_path):
    with pytest.raises(DataError, match="sentence file 'nope.txt' not found"):
        read_sentences("nope.txt", data_root=str(tmp_path))
    (tmp_path / "c.csv").write_text("sentence,label\nhello,1\n")
    with pytest.raises(DataError, match=r"\['sentence', 'label'\] lacks column\(s\) \['text'\] \(set data.column"):
        read_sentences(str(tmp_path / "c.csv"))
    assert read_sentences(str(tmp_path / "c.csv"), column="sentence") == ["hello"]


def test_tables_never_merge_or_cut_rows_silently(tmp_path):
    """A stray quote must not swallow the following lines, an unquoted comma must not cut a sentence, a file type
    the readers do not know must not be read as plain text: each is an error naming the file and line."""
    from datamodules.base import read_table
    from datamodules.nli import read_rows

    rows = ["text", '"Twelve inch pizza is big.', 'He said "no" twice.', "plain one"]
    (tmp_path / "q.tsv").write_text("\n".join(rows) + "\n")  # TSV: quotes are text, one row per line
    assert read_sentences(str(tmp_path / "q.tsv")) == [r.strip() for r in rows[1:]]
    (tmp_path / "q.csv").write_text("\n".join(rows) + "\n")  # CSV: the open quote would run to the end
    with pytest.raises(DataError, match=r"q.csv: line 2: .* \(an unclosed or stray quote\?"):
        read_sentences(str(tmp_path / "q.csv"))
    (tmp_path / "open.csv").write_text('text\nfine\n"never closed\nmore\n')
    with pytest.raises(DataError, match=r"open.csv: line 3: unexpected end of data"):
        read_sentences(str(tmp_path / "open.csv"))
    (tmp_path / "multi.csv").write_text('sent0,sent1\n"two\nlines",b\n"x\u2028y",z\n')  # pandas/Excel write these
    assert read_rows(str(tmp_path / "multi.csv"), ["sent0", "sent1"]) == [("two\nlines", "b"), ("x\u2028y", "z")]
    (tmp_path / "short.csv").write_text('sent0,sent1\n"x\ny"\n')
    with pytest.raises(DataError, match=r"short.csv: lines 2-3 \(one quoted record\) has 1 field\(s\), the header"):
        read_rows(str(tmp_path / "short.csv"), ["sent0", "sent1"])
    (tmp_path / "pandas.tsv").write_text('text\n"""Quoted"" start"\n')
    with pytest.raises(DataError, match=r"pandas.tsv: line 2 holds a CSV-quoted field"):
        read_sentences(str(tmp_path / "pandas.tsv"))
    (tmp_path / "sep.tsv").write_text("text\nhello\u2028world\nsecond\n")  # only line ends end a row
    assert read_sentences(str(tmp_path / "sep.tsv")) == ["hello\u2028world", "second"]
    (tmp_path / "ok.csv").write_text('text\n"a, quoted ""comma"" row"\nplain\n')
    assert read_sentences(str(tmp_path / "ok.csv")) == ['a, quoted "comma" row', "plain"]
    (tmp_path / "commas.csv").write_text("text\nthe puppy plays by, the sea.\nok\n")
    with pytest.raises(DataError, match=r"commas.csv: line 2 has 2 field\(s\), the header has 1 \(quote fields"):
        read_sentences(str(tmp_path / "commas.csv"))
    (tmp_path / "nli.tsv").write_text('sent0\tsent1\thard_neg\n"Stop" he said\tb\tc\n\nx\ty\t\n')
    with pytest.raises(DataError, match=r"nli.tsv: line 4 has an empty 'hard_neg'"):  # the file's line, not a count
        read_rows(str(tmp_path / "nli.tsv"), ["sent0", "sent1", "hard_neg"])
    assert read_table(tmp_path / "nli.tsv", ["sent0"])[0][0] == ('"Stop" he said',)
    (tmp_path / "UP.TSV").write_text("text\tlabel\nhello\t0\n")
    assert read_sentences(str(tmp_path / "UP.TSV")) == ["hello"]  # the suffix in any case
    (tmp_path / "train.en").write_text("a line of text\n")  # any other suffix: one sentence per line
    assert read_sentences(str(tmp_path / "train.en")) == ["a line of text"]
    (tmp_path / "s.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=r"s.jsonl: unsupported file type '.jsonl'"):
        read_sentences(str(tmp_path / "s.jsonl"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 text"):
        read_sentences(str(tmp_path / "latin.txt"))
    (tmp_path / "bom.csv").write_text("\ufefftext\nhello\n", encoding="utf-8")
    assert read_sentences(str(tmp_path / "bom.csv")) == ["hello"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder is a folder but not a dataset written by datasets' save_to_disk"):
        read_sentences(str(tmp_path / "folder"))


def test_offline_hub_name_says_how_to_use_local_files():
    with pytest.raises(DataError, match="could not load 'someone/no-such-corpus'.*local .txt file"):
        read_sentences("someone/no-such-corpus")


def test_nli_triplets_and_pairs(tmp_path, tokenizer):
    f = tmp_path / "nli.csv"
    f.write_text('sent0,sent1,hard_neg\n"a man , playing .",a guy plays .,a dog sleeps .\nx,y,z\n')
    dm = NLIDataModule(str(f), batch_size=2)
    dm.connect(tokenizer, 16)
    assert dm.texts[0] == ("a man , playing .", "a guy plays .", "a dog sleeps .")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[:2] == (2, 3)
    pairs = NLIDataModule(str(f), columns=["sent0", "sent1"], batch_size=1)
    assert pairs.texts[1] == ("x", "y")


@pytest.mark.parametrize(
    "content,match",
    [
        ("sent0,sent1,hard_neg\na,b,c\nd,e\n", r"nli.csv: line 3 has 2 field\(s\), the header has 3"),
        ("sent0,sent1,hard_neg\na,,c\n", r"nli.csv: line 2 has an empty 'sent1'"),
        ("premise,hypothesis\na,b\n", r"lacks column\(s\) \['sent0', 'sent1', 'hard_neg'\]"),
        ("", "the file is empty"),
    ],
)
def test_nli_bad_rows(tmp_path, content, match):
    (tmp_path / "nli.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        NLIDataModule(str(tmp_path / "nli.csv")).setup()


def test_batch_larger_than_data(tmp_path, tokenizer):
    (tmp_path / "c.txt").write_text("a\nb\nc\n")
    dm = SentencesDataModule(str(tmp_path / "c.txt"), batch_size=64)
    dm.connect(tokenizer, 8)
    with pytest.raises(DataError, match="batch_size 64 is larger than the 3 rows"):
        dm.train_dataloader()
    with pytest.raises(DataError, match=r"max_rows must be >= 1 or null \(all rows\), got -1"):
        SentencesDataModule(str(tmp_path / "c.txt"), max_rows=-1)


def test_sts_tsv_and_bad_scores(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_text("sentence1\tsentence2\tscore\na man\ta guy\t4.5\nthe dog\ta cat\t1\n")
    pairs = load_sts(str(f))
    assert pairs.name == "pairs" and pairs.scores == [4.5, 1.0] and pairs.sentences2 == ["a guy", "a cat"]
    f.write_text("sentence1\tsentence2\tscore\na man\ta guy\thigh\n")
    with pytest.raises(DataError, match=r"pairs.tsv:2: score 'high' is not a number"):
        load_sts(str(f))
    f.write_text("sentence1\tsentence2\tscore\na man\ta guy\t7\n")
    with pytest.raises(DataError, match=r"pairs.tsv:2: score 7.0 is outside \[0.0, 5.0\]"):
        load_sts(str(f))
    f.write_text("sentence1\tsentence2\tscore\na man\t\t3\n")
    with pytest.raises(DataError, match=r"pairs.tsv:2: empty sentence"):
        load_sts(str(f))
    f.write_text("sentence1\tsentence2\tscore\n\n")
    with pytest.raises(DataError, match=r"pairs.tsv: no pairs after the header"):
        load_sts(str(f))
    f.write_text("sentence1\tsentence2\tscore\na\tb\t3\nc\td\t3\n")
    from callbacks import STSEvaluator

    with pytest.raises(DataError, match=r"every gold score is the same, so Spearman's correlation is undefined"):
        STSEvaluator(str(f)).setup(None, None, "fit")
    with pytest.raises(DataError, match=r"STS file 'nope.tsv' not found \(looked in"):
        load_sts("nope.tsv", data_root=str(tmp_path))


def test_sts_unknown_task_and_split():
    with pytest.raises(DataError, match="unknown STS task 'sts17'.*sts12, sts13"):
        load_sts("sts17")
    with pytest.raises(DataError, match="sts12 has no split 'dev'"):
        load_sts("sts12", "dev")


def test_stsb_original_format(tmp_path):
    d = tmp_path / "stsb"
    d.mkdir()
    (d / "sts-dev.csv").write_text(
        "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane.\tAn air plane.\n"
        "main-news\theadlines\t2013\t0002\t0.5\tOne \"quoted\t'x'\textra1\textra2\n"
    )
    pairs = load_sts("stsb", "dev", str(tmp_path))
    assert pairs.scores == [5.0, 0.5] and pairs.sentences1[1] == 'One "quoted'
    (d / "sts-dev.csv").write_text("main\tMSRvid\t2012\t1\t5.0\tonly one sentence\n")
    with pytest.raises(DataError, match=r"sts-dev.csv:1: expected at least 7"):
        load_sts("stsb", "dev", str(tmp_path))


@pytest.mark.data
def test_real_sts_files_have_the_documented_sizes(shared_data):
    sizes = {("stsb", "dev"): 1500, ("stsb", "test"): 1379, ("sickr", "test"): 4927, ("sts12", "test"): 3108,
             ("sts13", "test"): 1500, ("sts14", "test"): 3750, ("sts15", "test"): 3000, ("sts16", "test"): 1186}
    for (task, split), n in sizes.items():
        assert len(load_sts(task, split, str(shared_data))) == n, task


@pytest.mark.data
def test_real_nli_and_wiki(shared_data):
    nli = NLIDataModule("nli/snli_devtest_for_simcse.csv", data_root=str(shared_data))
    assert len(nli.texts) == 6503 and len(nli.texts[0]) == 3
    wiki = SentencesDataModule("wiki/wiki1m_for_simcse.head.txt", data_root=str(shared_data))
    assert len(wiki.texts) == 11914
    assert torch.tensor([len(t[0]) > 0 for t in wiki.texts]).all()
