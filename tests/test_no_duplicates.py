"""data.no_duplicates: batches in which no text appears twice, checked on the DataLoader's own batches (decoded back
to rows through their token ids), per rank and across ranks, with resume, drop_last and length grouping."""

import logging
import random
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import WORDS
from pytorch_lightning import Callback
from transformers import AutoTokenizer

from datamodules import DataError, NLIDataModule, SentencesDataModule
from datamodules.no_duplicates import NoDuplicatesSampler, duplicate_rate, pack, text_keys
from datamodules.samplers import LengthGroupedSampler, ResumableSampler

VOCAB = sorted(set(WORDS) - {".", ","})


def text(n: int) -> str:
    """A distinct text for each n < len(VOCAB)**2, made of words the tiny tokenizer knows (so ids decode back)."""
    return f"{VOCAB[n // len(VOCAB)]} {VOCAB[n % len(VOCAB)]}"


def nli_rows(premises: int = 40, seed: int = 0) -> list[tuple[str, str, str]]:
    """Triplets whose premises repeat 3-5 times, whose hard negatives come from a small shared pool, and some of
    whose hard negatives are another row's premise: texts collide within and across columns."""
    rng = random.Random(seed)
    rows, n = [], premises
    for p in range(premises):
        for _ in range(rng.randint(3, 5)):
            negative = text(rng.randrange(premises)) if rng.random() < 0.2 else text(5000 + rng.randrange(25))
            rows.append((text(p), text(n) + " a" * (n % 9), negative))  # positives of 2 to 10 words
            n += 1
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def nli_csv(tmp_path):
    f = tmp_path / "nli.csv"
    f.write_text("sent0,sent1,hard_neg\n" + "".join(",".join(row) + "\n" for row in nli_rows()))
    return f


def datamodule(path, tokenizer, cls=NLIDataModule, **kw):
    kw.setdefault("batch_size", 8)
    dm = cls(str(path), **kw)
    dm.connect(tokenizer, 16)
    return dm


def decoded(dm, loader) -> list[list[int]]:
    """The loader's batches as lists of row indices, read back from their token ids."""
    row_of = {tuple(map(tuple, ids)): i for i, ids in enumerate(dm.tokenized().rows)}
    assert len(row_of) == len(dm.tokenized().rows)  # every row decodes to one index
    out = []
    for batch in loader:
        rows = []
        for ids_VL, mask_VL in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            rows.append(row_of[tuple(tuple(t for t, m in zip(ids, mask) if m) for ids, mask in zip(ids_VL, mask_VL))])
        out.append(rows)
    return out


def repeated_texts(dm, batch: list[int]) -> list[str]:
    counts = Counter(t for i in batch for t in set(dm.texts[i]))
    return [t for t, c in counts.items() if c > 1]


def as_rank(dm, world: int, rank: int):
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm


def test_no_batch_holds_a_text_twice_where_a_plain_shuffle_would(nli_csv, tokenizer):
    dm = datamodule(nli_csv, tokenizer, drop_last=False)
    before = duplicate_rate(dm.texts, 8)
    assert before["with_duplicate"] > 0.3  # the data collide: the check below can fail
    for seed in (0, 1):
        dm.seed = seed
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, NoDuplicatesSampler)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches = decoded(dm, loader)
            assert [b for b in batches if repeated_texts(dm, b)] == []
            assert sorted(i for b in batches for i in b) == list(range(len(dm.texts)))  # each row once
            assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_without_collisions_the_order_is_the_plain_samplers(world, drop_last):
    """No text repeats: nothing is deferred, and every rank sees exactly what ResumableSampler gives it (the DDP
    equivalence tests rely on DistributedSampler's dealing of rows)."""
    keys = text_keys([(text(i), text(1000 + i)) for i in range(53)])
    for shuffle in (True, False):
        kw = dict(num_replicas=world, shuffle=shuffle, seed=4, drop_last=drop_last)
        for rank in range(world):
            plain, nodup = ResumableSampler(keys, rank=rank, **kw), NoDuplicatesSampler(keys, keys, 4, rank=rank, **kw)
            plain.set_epoch(1), nodup.set_epoch(1)
            assert list(nodup) == list(plain) and len(nodup) == len(plain)
            assert nodup.deferred == 0


def test_drop_last_loses_at_most_the_incomplete_tail(nli_csv, tokenizer):
    dm = datamodule(nli_csv, tokenizer, drop_last=True)
    n = len(dm.texts)
    loader = dm.train_dataloader()
    seen = [i for b in decoded(dm, loader) for i in b]
    assert len(seen) == len(set(seen)) == n - n % 8
    assert loader.sampler.tail == n % 8  # the rows the DataLoader dropped, as counted


def test_same_seed_and_epoch_same_batches_else_different(nli_csv, tokenizer):
    def order(seed, epoch):
        loader = datamodule(nli_csv, tokenizer, seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(4, 1)
    assert order(3, 1) != order(3, 2)


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "length_grouped"])
def test_resumed_mid_epoch_gives_the_remaining_batches_of_the_uninterrupted_epoch(nli_csv, tokenizer, group):
    kw = dict(group_by_length=group, length_group_batches=3)
    straight = datamodule(nli_csv, tokenizer, seed=5, **kw)
    loader = straight.train_dataloader()
    loader.sampler.set_epoch(2)
    full = decoded(straight, loader)
    resumed = datamodule(nli_csv, tokenizer, seed=0, **kw)
    resumed.load_state_dict({"epoch": 2, "batches": 7, "seed": 5, "no_duplicates": True})
    again = resumed.train_dataloader()
    assert decoded(resumed, again) == full[7:]
    assert len(again) == len(loader)  # Lightning sizes epochs from the full length
    assert decoded(resumed, again) == full  # the skip applies once


def test_a_checkpoint_records_the_setting_and_an_older_one_resumes_without_it(nli_csv, tokenizer):
    """The resumed epoch must be rebuilt as it was: a checkpoint from before the option (no "no_duplicates" in the
    datamodule's state) trained on the plain order, so the default resumes with the plain order."""
    dm = datamodule(nli_csv, tokenizer)
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))
    dm.trainer = SimpleNamespace(
        current_epoch=1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        world_size=1,
        global_rank=0,
    )
    assert dm.state_dict() == {"epoch": 1, "batches": 3, "seed": 0, "no_duplicates": True}
    old = datamodule(nli_csv, tokenizer)
    old.load_state_dict({"epoch": 1, "batches": 3, "seed": 0})
    sampler = old.train_dataloader().sampler
    plain = ResumableSampler(old.tokenized(), num_replicas=1, rank=0, seed=0, drop_last=True)
    plain.set_epoch(1)
    assert type(sampler) is ResumableSampler and list(sampler) == list(plain)[3 * 8 :]
    forced = datamodule(nli_csv, tokenizer, no_duplicates=True)
    forced.load_state_dict({"epoch": 1, "batches": 3, "seed": 0})
    with pytest.raises(
        DataError,
        match=r"^data.no_duplicates is true but the checkpoint's run had it off: .*"
        r"resume with data.no_duplicates=false \(or null\)$",
    ):
        forced.train_dataloader()


@pytest.mark.parametrize("drop_last,group", [(False, False), (True, False), (False, True)])
def test_two_ranks_each_step_is_duplicate_free_across_ranks(nli_csv, tokenizer, drop_last, group):
    kw = dict(batch_size=4, drop_last=drop_last, seed=2, group_by_length=group, length_group_batches=3)
    ranks = [as_rank(datamodule(nli_csv, tokenizer, **kw), 2, r) for r in (0, 1)]
    batches = [decoded(dm, dm.train_dataloader()) for dm in ranks]
    assert len(batches[0]) == len(batches[1])  # every rank takes the same number of steps
    texts = ranks[0].texts
    for mine, theirs in zip(*batches):
        assert repeated_texts(ranks[0], mine + theirs) == [], [texts[i] for i in mine + theirs]
    rows = Counter(i for b in batches for batch in b for i in batch)
    n = len(texts)
    if drop_last:
        assert max(rows.values()) == 1 and n - len(rows) < 2 * 4
    else:  # DistributedSampler's padding: n odd repeats one row so that both ranks get ceil(n / 2)
        assert set(rows) == set(range(n)) and sum(rows.values()) == 2 * -(-n // 2)


def test_default_is_on_for_nli_off_for_sentences_and_the_deferred_rows_are_logged(nli_csv, tokenizer, tmp_path, caplog):
    (tmp_path / "s.txt").write_text("".join(text(i % 7) + "\n" for i in range(40)))  # 7 sentences, repeated
    plain = datamodule(tmp_path / "s.txt", tokenizer, cls=SentencesDataModule)
    assert not plain.avoids_duplicates and type(plain.train_dataloader().sampler) is ResumableSampler
    forced = datamodule(tmp_path / "s.txt", tokenizer, cls=SentencesDataModule, no_duplicates=True, batch_size=7)
    batches = [[tuple(ids[0]) for ids in b["input_ids"].tolist()] for b in forced.train_dataloader()]
    assert len(batches) == 5 and all(len(set(b)) == 7 for b in batches)  # 7 distinct sentences in each batch
    off = datamodule(nli_csv, tokenizer, no_duplicates=False)
    assert type(off.train_dataloader().sampler) is ResumableSampler
    dm = datamodule(nli_csv, tokenizer)
    assert dm.avoids_duplicates
    loader = dm.train_dataloader()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        list(loader)
    s = loader.sampler
    assert s.deferred > 0
    [line] = [r.getMessage() for r in caplog.records if "no_duplicates" in r.getMessage()]
    assert line.startswith(
        f"no_duplicates: epoch 0 deferred {s.deferred} of {len(dm.texts)} rows; "
        f"{len(dm.texts) % 8} left for the final incomplete batch (dropped)"
    )


def test_length_grouping_composes(nli_csv, tokenizer):
    dm = datamodule(nli_csv, tokenizer, group_by_length=True, length_group_batches=8, drop_last=False)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, NoDuplicatesSampler) and not isinstance(loader.sampler, LengthGroupedSampler)
    batches = decoded(dm, loader)
    assert [b for b in batches if repeated_texts(dm, b)] == []
    assert sorted(i for b in batches for i in b) == list(range(len(dm.texts)))
    plain = datamodule(nli_csv, tokenizer, drop_last=False).train_dataloader()
    padded = [sum(b["input_ids"].numel() for b in loader_) for loader_ in (loader, plain)]
    assert padded[0] < 0.85 * padded[1]  # the grouping still saves padding (a third of these rows are deferred)
    again = datamodule(nli_csv, tokenizer, group_by_length=True, length_group_batches=8, drop_last=False)
    assert decoded(again, again.train_dataloader()) == batches  # deterministic


@pytest.mark.parametrize("bad", ["yes", 1])
def test_a_bad_option_is_one_line_naming_it(nli_csv, bad):
    with pytest.raises(DataError, match=r"^no_duplicates must be true, false or null .*got") as err:
        NLIDataModule(str(nli_csv), no_duplicates=bad)
    assert "\n" not in str(err.value)


def test_rows_that_never_fit_are_placed_not_lost():
    keys = text_keys([("same", f"other {i}") for i in range(10)] + [(f"free {i}",) for i in range(6)])
    batches, counts = pack(list(range(16)), keys, [4, 4, 4, 4])
    assert sorted(i for b in batches for i in b) == list(range(16))
    # 10 rows share "same": 4 batches hold one each without a repeat, the other 6 cannot avoid one
    assert counts["forced"] == 6 and counts["unused"] == 0
    assert all(len(b) == 4 for b in batches)
    assert sum(sum(i < 10 for i in b) - 1 for b in batches) == 6  # exactly the forced rows sit beside a copy
    assert all(
        len({k for i in b for k in keys[i]}) == 4 * 2 - sum(i >= 10 for i in b) - (sum(i < 10 for i in b) - 1)
        for b in batches
    )  # and nothing else repeats


def test_a_late_collision_trades_places_with_an_earlier_batch():
    # rows 0-3 fill batch 0; rows 4 and 5 share "x" and are the only rows left for batch 1, so row 5 swaps with a
    # row of batch 0 instead of sitting beside row 4
    keys = text_keys([("a",), ("b",), ("c",), ("d",), ("x", "e"), ("x", "f")])
    batches, counts = pack(list(range(6)), keys, [4, 2])
    assert counts["forced"] == 0
    for b in batches:
        assert len([k for i in b for k in keys[i]]) == len({k for i in b for k in keys[i]})
    assert sorted(i for b in batches for i in b) == list(range(6))


def test_duplicate_rate_matches_a_plain_count():
    rows = [(text(i % 5), text(100 + i)) for i in range(23)] + [(text(7), text(7))]  # last: its own repeat only
    got = duplicate_rate(rows, 4, seed=9)
    order = ResumableSampler(rows, num_replicas=1, rank=0, seed=9)  # the plain shuffled order, epoch 0
    order = list(order)
    per_batch = []
    for start in range(0, len(order), 4):
        seen, dup = set(), 0
        for i in order[start : start + 4]:
            for t in set(rows[i]):
                dup += t in seen
                seen.add(t)
        per_batch.append(dup)
    assert got["batches"] == 6
    assert got["with_duplicate"] == sum(d > 0 for d in per_batch) / 6 > 0
    assert got["mean_duplicates"] == pytest.approx(sum(per_batch) / 6)


class StopAfter(Callback):
    """Raises at the end of training step ``step``: the run dies there, its checkpoints of earlier steps remain."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # Lightning's own interrupt handling saves nothing more


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_a_fit_resumed_mid_epoch_trains_on_the_batches_of_an_uninterrupted_one(nli_csv, tiny_model, tmp_path):
    """Through train.py: the datamodule's state in the checkpoint brings the resumed run to the same sample of the
    same duplicate-free order (8-row batches of the colliding triplets, checkpoints every 2 steps)."""
    import cli_probes

    import train

    def run(root, *extra):
        cli_probes.BATCHES.clear()
        train.main(
            [
                "fit",
                "--seed_everything",
                "0",
                "--trainer.accelerator",
                "cpu",
                "--trainer.max_steps",
                "7",
                "--trainer.default_root_dir",
                str(root),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--trainer.logger",
                "false",
                "--trainer.callbacks+=ModelCheckpoint",
                "--trainer.callbacks.save_last=true",
                "--trainer.callbacks.every_n_train_steps=2",
                f"--trainer.callbacks.dirpath={root / 'ckpt'}",
                "--trainer.callbacks+=cli_probes.RecordBatches",
                "--model",
                "lightning_modules.ContrastiveModule",
                "--model.model_name_or_path",
                tiny_model,
                "--model.pooler",
                "cls",
                "--data",
                "datamodules.NLIDataModule",
                "--data.source",
                str(nli_csv),
                "--data.batch_size",
                "8",
                *extra,
            ]
        )
        return list(cli_probes.BATCHES)

    straight = run(tmp_path / "straight")
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(tmp_path / "stopped", "--trainer.callbacks+=test_no_duplicates.StopAfter", "--trainer.callbacks.step=5")
    resumed = run(tmp_path / "stopped", "--ckpt_path", "last")
    assert resumed[0][:3] == (4, 0, 4)
    assert resumed == straight[4:]
