"""Runs that go wrong say so: real faults (truncated files, diverging learning rates, a killed process), not mocks."""

import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_cli import fit_args

import train
from core.errors import DataError, StorageError
from core.metrics import spearman100
from datamodules.base import read_text
from lightning_modules.checkpoints import ArtifactError, damage, newest_complete
from lightning_modules.components.guard import DivergenceError, DivergenceGuard, describe

ROOT = Path(__file__).resolve().parents[1]
CKPT = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=2"]


def test_spearman_of_non_finite_similarities_is_nan_not_a_number():
    assert spearman100([0.1, 0.2, 0.3], [1, 2, 3]) == pytest.approx(100)
    assert math.isnan(spearman100([float("nan"), 0.2, 0.3], [1, 2, 3]))  # torchmetrics' ranking gave a number


def rows_with_mean_cosine(c: float, n: int = 8) -> torch.Tensor:
    """n unit rows whose pairwise cosines are all c: a shared direction plus orthogonal parts."""
    return math.sqrt(c) * torch.eye(n + 1)[0] + math.sqrt(1 - c) * torch.eye(n + 1)[1:]


def test_guard_keeps_the_first_failure_and_collapse_only_after_a_spread_start():
    guard = DivergenceGuard(max_mean_cosine=0.99)
    guard.note_loss(torch.tensor(1.0), step=0)
    spread = torch.eye(4)
    guard.note_embeddings(spread, step=0)  # mean cosine 0: spread out
    assert guard.first() is None
    guard.note_loss(torch.tensor(float("nan")), step=3)
    guard.note_loss(torch.tensor(float("inf")), step=4)
    guard.note_embeddings(torch.ones(4, 4), step=5)  # every row the same direction: mean cosine 1
    event = guard.first()
    assert (event.kind, event.step) == ("loss", 3) and math.isnan(event.value)
    late = DivergenceGuard(max_mean_cosine=0.99)
    late.note_embeddings(torch.ones(4, 4) + 1e-3 * torch.eye(4), step=0)  # starts collapsed (an untrained model)
    late.note_embeddings(torch.ones(4, 4), step=1)
    assert late.first() is None
    near_bound = DivergenceGuard(max_mean_cosine=0.99)  # a random encoder on unknown words: alike from the start
    near_bound.note_embeddings(rows_with_mean_cosine(0.985), step=0)
    near_bound.note_embeddings(rows_with_mean_cosine(0.993), step=1)  # over the bound, spread only halved
    assert near_bound.first() is None
    near_bound.note_embeddings(rows_with_mean_cosine(0.9990), step=2)  # spread 0.015 -> 0.001: collapsed
    assert near_bound.first().step == 2
    spread_then_collapsed = DivergenceGuard(max_mean_cosine=0.99)
    spread_then_collapsed.note_embeddings(spread, step=0)
    spread_then_collapsed.note_embeddings(torch.ones(4, 4), step=7)
    assert spread_then_collapsed.first().kind == "collapse" and spread_then_collapsed.first().step == 7


def test_a_diverging_learning_rate_stops_with_the_step_and_no_checkpoint_of_it(tmp_path, tiny_model, sample_data):
    args = fit_args(tmp_path, tiny_model, sample_data, "--model.lr", "1e300", "--model.pooler", "mean",
                    "--trainer.max_steps", "8", *CKPT, f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}")
    with pytest.raises(DivergenceError, match=r"training diverged at step \d+: .*learning rate \(1e\+300"):
        train.main(args)
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):  # whatever was written holds finite weights
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_resume_skips_a_truncated_newest_checkpoint_and_refuses_changed_options(tmp_path, tiny_model, sample_data):
    ckpt_dir = tmp_path / "ckpt"
    train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT, f"--trainer.callbacks.dirpath={ckpt_dir}"))
    last = ckpt_dir / "last.ckpt"
    step_ckpt = next(p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
    last.write_bytes(last.read_bytes()[:5000])  # what a full disk left at the final path before this change
    os.utime(last, (time.time() + 10, time.time() + 10))  # and it is the newest
    assert "truncated" in damage(last) and damage(step_ckpt) is None
    assert newest_complete([tmp_path], warn=lambda _: None) == step_ckpt.resolve()
    for command in (["export", "--ckpt_path", str(last), "--output_dir", str(tmp_path / "out")],
                    ["evaluate", "--model", str(last), "--tasks", "stsb"]):  # named, not torch's unpickling traceback
        assert re.search(r"last.ckpt: not a readable Lightning checkpoint", one_line_error(command))
    with pytest.raises(ArtifactError, match=r"last.ckpt is truncated .*the newest complete one is"):
        train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT, f"--trainer.callbacks.dirpath={ckpt_dir}",
                            "--ckpt_path", str(last)))
    with pytest.raises(DataError, match=r"model.init_args.temperature \(checkpoint 0.05, now 0.5\)"):
        train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT, f"--trainer.callbacks.dirpath={ckpt_dir}",
                            "--ckpt_path", "last", "--model.temperature", "0.5"))
    with pytest.raises(DataError, match=r"data.init_args.batch_size \(checkpoint 8, now 4\)"):
        train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT, f"--trainer.callbacks.dirpath={ckpt_dir}",
                            "--ckpt_path", "last", "--data.batch_size", "4"))
    cli = train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT, f"--trainer.callbacks.dirpath={ckpt_dir}",
                              "--ckpt_path", "last", "--trainer.max_steps", "6"))
    saved = torch.load(step_ckpt, weights_only=False)["global_step"]
    assert cli.config.fit.ckpt_path == str(step_ckpt.resolve()) and saved == 4
    assert cli.trainer.global_step == 6


def test_resume_last_finds_checkpoints_in_the_logger_run_folder(tmp_path, tiny_model, sample_data):
    """The checkpoint folder is named after the logger's run (CSV version_N): `last` must still find it."""
    train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT))
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt"))
    cli = train.main(fit_args(tmp_path, tiny_model, sample_data, *CKPT, "--ckpt_path", "last",
                              "--trainer.max_steps", "6"))
    assert cli.trainer.global_step == 6
    assert Path(cli.config.fit.ckpt_path).parent == (tmp_path / "lightning_logs/version_0/checkpoints").resolve()


def test_fit_killed_with_sigkill_resumes_at_the_saved_step(tmp_path, tiny_model, sample_data):
    ckpt_dir = tmp_path / "ckpt"
    args = fit_args(tmp_path, tiny_model, sample_data, "--trainer.max_steps", "4000", *CKPT,
                    f"--trainer.callbacks.dirpath={ckpt_dir}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckpt_dir.glob("*step=*.ckpt")) and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    found = newest_complete([tmp_path], warn=lambda _: None)
    assert found is not None
    saved = torch.load(found, weights_only=False)["global_step"]
    cli = train.main([*args[:args.index("4000") - 1], "--trainer.max_steps", str(saved + 2),
                      *args[args.index("4000") + 1:], "--ckpt_path", "last"])
    assert cli.trainer.global_step == saved + 2
    assert not list(ckpt_dir.glob(".*.tmp"))  # no temporary file of a killed write is left for resume to pick


def recipe_args(kind: str, tmp_path: Path, model: str, sample_data: Path) -> list[str]:
    """A small fit of each module family, checkpointing every 2 steps, deterministic (no dropout, seeded)."""
    common = ["fit", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.max_steps", "8",
              "--trainer.max_epochs", "-1", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
              *CKPT, f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]
    sentences = str(sample_data / "sentences.txt")
    if kind == "contrastive":
        return [*common, "--model", "lightning_modules.ContrastiveModule", "--model.model_name_or_path", model,
                "--model.pooler", "cls", "--model.lr", "1e-3", "--data", "datamodules.SentencesDataModule",
                "--data.source", sentences, "--data.batch_size", "16"]
    if kind == "mcr2":
        return [*common, "--model", "lightning_modules.MCR2Module", "--model.model_name_or_path", model,
                "--model.pooler", "mean", "--model.max_length", "16", "--model.out_dim", "8",
                "--model.grouping", "kmeans", "--model.num_clusters", "3", "--model.lr", "1e-2",
                "--data", "datamodules.GroupedTextDataModule", "--data.source", sentences, "--data.batch_size", "32"]
    return [*common, "--model", "lightning_modules.SAEModule", "--model.sae.expansion_factor", "2",
            "--model.sae.k", "4", "--model.sae.threshold_start", "1", "--model.init_samples", "64",
            "--model.sae.dead_after", "64",
            "--data", "datamodules.ActivationsDataModule", "--data.model_name_or_path", model,
            "--data.source", sentences, "--data.cache_dir", str(tmp_path.parent / "cache"), "--data.max_length", "32",
            "--data.batch_size", "32", "--data.val_fraction", "0.1", "--data.encode_device", "cpu"]


@pytest.mark.parametrize("kind", ["contrastive", "mcr2", "sae"])
def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(
        kind, tmp_path, tiny_model_no_dropout, sample_data):
    straight = train.main(recipe_args(kind, tmp_path / "straight", tiny_model_no_dropout, sample_data))
    args = recipe_args(kind, tmp_path / "killed", tiny_model_no_dropout, sample_data)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--trainer.callbacks+=cli_probes.KillAt",
                           "--trainer.callbacks.step=5"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(newest_complete([tmp_path / "killed"]), weights_only=False)["global_step"] == 4
    resumed = train.main([*args, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_folder_without_tokenizer_files_is_refused(tmp_path, tiny_model, sample_data):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, bare / name)
    with pytest.raises(ValueError) as raised:  # jsonargparse wraps what the module raised; the CLI unwraps it
        train.main(fit_args(tmp_path, str(bare), sample_data))
    assert "bare has no tokenizer files" in train.user_error(raised.value)
    from evaluation.evaluate import load_embedder

    with pytest.raises(DataError, match=r"bare has no tokenizer files"):
        load_embedder(str(bare))


@pytest.mark.parametrize("damaged", ["model.safetensors", "tokenizer.json"])
def test_a_model_folder_copied_in_half_names_the_file_and_says_copy_it_again(damaged, tmp_path, tiny_model,
                                                                             sample_data):
    from datamodules.activations import ActivationsDataModule

    folder = tmp_path / "half"
    shutil.copytree(tiny_model, folder)
    os.truncate(folder / damaged, (folder / damaged).stat().st_size // 2)
    expected = (rf"{re.escape(str(folder / damaged))}: a file of the model folder is (damaged or )?incomplete.*; "
                rf"copy the folder {re.escape(str(folder))} again$")
    for args in (["evaluate", "--model", str(folder), "--tasks", "stsb"], fit_args(tmp_path, str(folder), sample_data)):
        message = one_line_error(args)
        assert re.search(expected, message), message
    builder = ActivationsDataModule(model_name_or_path=str(folder), source=str(sample_data / "sentences.txt"),
                                    cache_dir=str(tmp_path / "cache"), encode_device="cpu")
    with pytest.raises(DataError, match=expected):
        builder.prepare_data()


def test_a_data_source_that_is_a_broken_symbolic_link_is_named_so(tmp_path, tiny_model, sample_data):
    loop, dangling = tmp_path / "loop", tmp_path / "dangling"
    loop.symlink_to("loop")
    dangling.symlink_to(tmp_path / "moved" / "sentences.txt")  # a data folder moved away
    message = one_line_error(fit_args(tmp_path, tiny_model, sample_data, "--data.source", str(loop)))
    assert message.startswith(f"{loop} is a symbolic link loop"), message
    message = one_line_error(fit_args(tmp_path, tiny_model, sample_data, "--data.source", str(dangling)))
    target = tmp_path / "moved" / "sentences.txt"
    assert message == f"{dangling} is a dangling symbolic link: it points to {target}, which does not exist"


@pytest.mark.parametrize("switch, match", [
    (["--model", "lightning_modules.MCR2Module"],  # the recipe's data: one sentence per row
     r"^model.grouping 'pairs' needs rows of at least 2 sentences, but SentencesDataModule gives rows of 1: "),
    (["--model", "lightning_modules.MCR2Module", "--model.grouping", "kmeans"],
     r"^model grouping 'kmeans' needs every training sentence up front: use datamodules.GroupedTextDataModule "
     r"\(got SentencesDataModule\)$"),
    (["--model", "lightning_modules.MCR2Module", "--model.grouping", "labels", "--data",
      "datamodules.GroupedTextDataModule"],
     r"^model.grouping 'labels' needs labelled rows, and the rows of GroupedTextDataModule carry no label: set "
     r"data.label_column"),
])
def test_a_model_switched_to_data_it_cannot_group_is_refused_before_training(switch, match, tmp_path, tiny_model,
                                                                             sample_data):
    args = fit_args(tmp_path, tiny_model, sample_data, *switch, "--model.out_dim", "8", "--model.max_length", "32")
    message = one_line_error(args)
    assert re.search(match, message), message
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before the first step


def test_embedlab_cache_naming_a_file_is_one_line_naming_it(tmp_path, tiny_model_no_dropout, sample_data,
                                                           monkeypatch):
    args = recipe_args("sae", tmp_path, tiny_model_no_dropout, sample_data)
    at = args.index("--data.cache_dir")
    del args[at:at + 2]  # the default: $EMBEDLAB_CACHE
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    monkeypatch.setenv("EMBEDLAB_CACHE", str(a_file))
    assert one_line_error(args) == (f"EMBEDLAB_CACHE={a_file}: cannot write in {a_file} (it is a file, not a "
                                    "folder); nothing was run. Give a writable folder")  # before anything is built
    monkeypatch.setenv("EMBEDLAB_CACHE", str(a_file / "caches"))
    assert f"EMBEDLAB_CACHE={a_file / 'caches'}: cannot write in {a_file / 'caches'} ({a_file} is a file, not a " \
           "folder)" in one_line_error(args)
    assert a_file.read_text() == "mine"


def test_damaged_cache_files_are_named(tmp_path):
    from core.files import write_atomic
    from datamodules.activation_builder import model_fingerprint
    from datamodules.activation_cache import ActivationCache

    memo = tmp_path / "file_hashes.json"
    memo.write_text("")  # a full disk, or a reader mid-write before writes were atomic
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="file_hashes.json is damaged"):
        first = model_fingerprint(model, memo)
    assert model_fingerprint(model, memo) == first and json.loads(memo.read_text())
    cache = tmp_path / "cache"
    cache.mkdir()
    write_atomic(cache / "shard_00000.vectors.npy", lambda f: np.save(f, torch.randn(10, 4).numpy()))
    write_atomic(cache / "shard_00000.meta.npy", lambda f: np.save(f, np.zeros((10, 6), dtype=np.int32)))
    (cache / "meta.json").write_text(json.dumps({"shards": [{"name": "shard_00000", "n_vectors": 10}], "dim": 4}))
    assert len(ActivationCache(cache)) == 10
    shard = cache / "shard_00000.vectors.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(DataError, match=r"shard_00000.vectors.npy: missing, truncated or damaged shard.*rebuild"):
        ActivationCache(cache)
    (cache / "meta.json").write_text('{"shards": [')
    with pytest.raises(DataError, match=r"meta.json: the cache's meta.json is damaged or incomplete"):
        ActivationCache(cache)


def test_an_invalid_identity_json_is_named_with_what_to_do(tmp_path, tiny_model_no_dropout, sample_data):
    from datamodules.activations import ActivationsDataModule

    def module() -> ActivationsDataModule:
        return ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, cache_dir=str(tmp_path / "cache"),
                                     source=str(sample_data / "sentences.txt"), max_length=32, encode_device="cpu")

    built = module()
    built.prepare_data()
    identity = built.cache_folder() / "identity.json"
    identity.write_text(identity.read_text()[:40])  # cut short
    with pytest.raises(DataError, match=r"identity.json: the cache's identity.json is damaged or incomplete .*"
                                        r"delete .* to rebuild"):
        module().prepare_data()


def test_compressed_text_is_named_as_such(tmp_path):
    import gzip

    path = tmp_path / "corpus.txt"
    path.write_bytes(gzip.compress(b"a sentence\n"))
    with pytest.raises(DataError, match=r"corpus.txt: not text but gzip-compressed"):
        read_text(path)


BUILD = """
import sys
from datamodules.activations import ActivationsDataModule
dm = ActivationsDataModule(model_name_or_path=sys.argv[1], source=sys.argv[2], cache_dir=sys.argv[3], level="token",
                           max_length=32, encode_batch_size=8, shard_sentences=20, encode_device="cpu")
dm.prepare_data()
print("built" if dm.built_here else "reused", flush=True)
"""


def test_two_processes_building_one_cache_at_once_build_it_once(tmp_path, tiny_model, sample_data):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", BUILD, tiny_model, str(sample_data / "sentences.txt"), str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    said = sorted(p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert said == ["built", "reused"]
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    from datamodules.activation_cache import ActivationCache, build_lock

    assert len(ActivationCache(folder)) > 0
    # The same with the overlap forced (two racing processes may just as well run one after the other): while this
    # process holds the lock a builder waits, writing nothing, and builds once the lock is released.
    fresh = tmp_path / "cache2"
    cmd[-1] = str(fresh)
    with build_lock(fresh / folder.name):
        waiting = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(8)  # well past its imports and identity check, on to the lock
        assert waiting.poll() is None and not (fresh / folder.name / "meta.json").exists()
    assert waiting.communicate(timeout=300)[0].strip().splitlines()[-1] == "built"


def one_line_error(args: list[str]) -> str:
    """What `python train.py ARGS` prints after ``error:``, run in this process (a real subprocess costs seconds)."""
    with pytest.raises((ValueError, OSError, RuntimeError)) as raised:
        train.main(args)
    message = train.user_error(raised.value)
    assert message is not None, f"a traceback, not an error line: {raised.value!r}"
    assert "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def sae_checkpoint(tmp_path_factory, tiny_model_no_dropout, sample_data) -> Path:
    root = tmp_path_factory.mktemp("sae_ckpt")
    args = recipe_args("sae", root / "run", tiny_model_no_dropout, sample_data)
    args[args.index("--trainer.max_steps") + 1] = "2"
    train.main(args)
    return root / "run" / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("option, value, match", [
    ("--model.sae.k", "0", r"k = 0 must be between 1 and the dictionary size"),
    ("--model.sae.k", "5000", r"k = 5000 must be between 1 and the dictionary size 64"),
    ("--model.sae.expansion_factor", "0", r"expansion_factor"),
    ("--model.k", "4", r"--model.k is now --model.init_args.sae.k \(SAEModule takes its config whole\)"),
    ("--trainer.max_steps", "-5", r"max_steps"),
])
def test_sae_option_mistakes_are_one_line_errors_naming_the_option(option, value, match, tmp_path,
                                                                   tiny_model_no_dropout, sample_data):
    args = recipe_args("sae", tmp_path, tiny_model_no_dropout, sample_data)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    assert re.search(match, one_line_error(args)), one_line_error(args)


def test_export_and_evaluate_mistakes_are_one_line_errors(sae_checkpoint, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert "notes.txt" in one_line_error(["export", "--ckpt_path", str(sae_checkpoint), "--output_dir", str(a_file)])
    assert a_file.read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    assert "mine" in one_line_error(["export", "--ckpt_path", str(sae_checkpoint), "--output_dir", str(mine)])
    out = tmp_path / "sae"
    train.main(["export", "--ckpt_path", str(sae_checkpoint), "--output_dir", str(out)])
    before = (out / "sae.safetensors").read_bytes()
    assert "--overwrite" in one_line_error(["export", "--ckpt_path", str(sae_checkpoint), "--output_dir", str(out)])
    train.main(["export", "--ckpt_path", str(sae_checkpoint), "--output_dir", str(out), "--overwrite", "true"])
    assert (out / "sae.safetensors").read_bytes() == before and (mine / "thesis.tex").read_text() == "x"
    for target in (sae_checkpoint, out):
        assert "interpret" in one_line_error(["evaluate", "--model", str(target), "--tasks", "stsb"])
    assert "could not load model 'someone/not-a-model'" in one_line_error(
        ["evaluate", "--model", "someone/not-a-model", "--tasks", "stsb"])  # offline: one line, not a traceback


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (a filesystem with 0 bytes free)")
def test_an_export_where_no_file_can_be_made_names_that_not_a_full_disk(sae_checkpoint):
    # /proc has 0 bytes free, like any virtual or read-only filesystem: that is not why the write failed
    message = one_line_error(["export", "--ckpt_path", str(sae_checkpoint), "--output_dir", "/proc/embedlab_x"])
    assert message.startswith("could not write the export /proc/embedlab_x: No such file or directory"), message
    assert "space" not in message


def test_a_blank_line_in_an_sae_source_names_the_option_that_exists(tmp_path, tiny_model_no_dropout, sample_data):
    text = tmp_path / "blank.txt"
    text.write_text("a man is playing a guitar .\n\nthe dog is cleaning the car .\n" * 20)
    args = recipe_args("sae", tmp_path, tiny_model_no_dropout, sample_data)
    args[args.index("--data.source") + 1] = str(text)
    message = one_line_error(args)
    assert "blank.txt" in message and "data.skip_empty" in message
    from datamodules import ActivationsDataModule

    assert "skip_empty" in inspect.signature(ActivationsDataModule).parameters  # the hint names a real option


def test_an_sae_at_a_diverging_learning_rate_stops_and_exports_nothing(tmp_path, tiny_model_no_dropout, sample_data):
    args = recipe_args("sae", tmp_path, tiny_model_no_dropout, sample_data) + [
        "--model.lr", "1e30", "--model.check_finite_every_n_steps", "2",
        "--trainer.callbacks+=callbacks.ExportOnFitEnd"]
    with pytest.raises(DivergenceError, match=r"training diverged at step \d+"):
        train.main(args)
    assert not list(tmp_path.rglob("sae.safetensors"))
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


@pytest.mark.data
def test_a_collapsing_learning_rate_on_minilm_stops_with_the_collapse_named(minilm, tmp_path):
    """lr 1e4 maps every sentence to one direction (loss ln(batch)) without any NaN: only the collapse check sees it."""
    with pytest.raises(DivergenceError, match=r"at step 1: the embeddings collapsed: the mean cosine .* 0\.99"):
        train.main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "6",
                    "--model.model_name_or_path", minilm, "--model.lr", "1e4", "--model.check_finite_every_n_steps",
                    "2", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                    "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
                    "--data.source", str(ROOT / "configs/quickstart_data/sentences.txt")])


@pytest.fixture
def small_filesystem(tmp_path):
    """A real full disk: a tmpfs of a few hundred KiB (needs root to mount; skipped otherwise), resizable in place
    with ``resize(kib)`` so the test can 'free space' and go on with what is on it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a small tmpfs (a real full filesystem)")
    mnt = tmp_path / "small"
    mnt.mkdir()

    def resize(kib: int) -> None:
        options = f"size={kib}k" + (",remount" if os.path.ismount(mnt) else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"could not mount a tmpfs here: {done.stderr.decode().strip()}")

    resize.path = mnt
    yield resize
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_checkpointing_names_the_file_and_resume_goes_on_after_space_is_freed(
        small_filesystem, tmp_path, tiny_model_no_dropout, sample_data):
    small_filesystem(400)
    ckpt_dir = small_filesystem.path / "ckpt"
    args = recipe_args("contrastive", tmp_path, tiny_model_no_dropout, sample_data)
    args[args.index(f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}")] = f"--trainer.callbacks.dirpath={ckpt_dir}"
    message = one_line_error(args)
    assert re.search(r"could not write checkpoint .*small/ckpt/\S+\.ckpt: No space left on device", message), message
    written = list(ckpt_dir.glob("*.ckpt"))
    assert written and all(damage(p) is None for p in written), written  # nothing half-written at a final path
    assert not list(ckpt_dir.glob(".*.tmp"))
    saved = torch.load(newest_complete([ckpt_dir]), weights_only=False)["global_step"]
    small_filesystem(20_000)  # space freed
    cli = train.main([*args, "--ckpt_path", "last"])
    assert saved >= 2 and cli.trainer.global_step == 8


def test_a_full_disk_while_caching_names_the_file_and_the_build_resumes_after_space_is_freed(
        small_filesystem, tmp_path, tiny_model_no_dropout, sample_data):
    from datamodules.activation_cache import ActivationCache
    from datamodules.activations import ActivationsDataModule

    def module(cache_dir: Path) -> ActivationsDataModule:
        return ActivationsDataModule(model_name_or_path=tiny_model_no_dropout, cache_dir=str(cache_dir),
                                     source=str(sample_data / "sentences.txt"), max_length=32, shard_sentences=40,
                                     encode_device="cpu")

    small_filesystem(120)
    full = module(small_filesystem.path)
    with pytest.raises(StorageError, match=r"could not write .*small/.*: No space left on device"):
        full.prepare_data()
    small_filesystem(20_000)
    again = module(small_filesystem.path)
    again.prepare_data()
    reference = module(tmp_path / "big")
    reference.prepare_data()
    got, want = ActivationCache(again.cache_folder()), ActivationCache(reference.cache_folder())
    assert len(got) == len(want) > 0
    rows = np.arange(len(want))
    torch.testing.assert_close(torch.as_tensor(got.gather(rows)), torch.as_tensor(want.gather(rows)))


def test_under_ddp_one_rank_diverging_stops_every_rank_with_the_error(tmp_path, tiny_model_no_dropout, sample_data):
    args = recipe_args("contrastive", tmp_path, tiny_model_no_dropout, sample_data)
    args += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--model.check_finite_every_n_steps", "2",
             "--trainer.callbacks+=cli_probes.DivergeOnOneRank"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    env.pop("EMBEDLAB_TRACEBACK", None)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # a rank left waiting would hit the timeout
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert any("training diverged at step 1: the training loss is nan" in e for e in errors), errors
    assert not list((tmp_path / "ckpt").glob("*step=2*"))  # the bad step's checkpoint was not written


def test_a_resumed_run_with_relative_folders_keeps_writing_last_ckpt(tmp_path, tiny_model, sample_data, monkeypatch):
    """The quickstart names its folders relatively; the resumed run's ModelCheckpoint names them absolutely. Its
    restored state must still match, or save_last writes a last-v1.ckpt beside last.ckpt (and best-k is lost)."""
    monkeypatch.chdir(tmp_path)
    args = fit_args(Path("."), tiny_model, sample_data, "--trainer.callbacks+=ModelCheckpoint",
                    "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=2")
    train.main(args)  # checkpoints in lightning_logs/version_0/checkpoints, named relatively
    cli = train.main([*args, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6
    folder = Path("lightning_logs/version_0/checkpoints")
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 6


def test_a_checkpoint_chosen_on_a_validation_metric_is_never_one_of_a_diverged_model(tmp_path, tiny_model_no_dropout,
                                                                                       sample_data):
    """ModelCheckpoint(monitor=val/...) saves from on_validation_end, outside the training hooks: it must be
    checked too (it was not: a NaN last.ckpt was written and `--ckpt_path last` resumed it)."""
    args = recipe_args("sae", tmp_path, tiny_model_no_dropout, sample_data)
    args = [a for a in args if a not in CKPT and not a.startswith("--trainer.callbacks.dirpath")] + [
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/sae/fvu",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.save_last=true", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--model.lr", "1e30", "--model.check_finite_every_n_steps", "50"]
    with pytest.raises(DivergenceError,
                       match=r"training diverged at step \d+: (the training loss is nan|\d+ weight tensor)"):
        train.main(args)
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_the_weights_check_counts_the_tensors_holding_a_nan_or_an_infinity():
    """note_weights (run before every checkpoint save) fires on a NaN or an infinity anywhere, counts the tensors
    holding one, and does not fire on large finite half-precision weights whose fp16 sum would overflow."""
    finite = [torch.randn(50, 8), torch.full((300,), 60000.0, dtype=torch.float16),
              torch.randn(3, dtype=torch.bfloat16)]
    guard = DivergenceGuard()
    guard.note_weights(finite, step=4)
    assert guard.first() is None
    broken = [t.clone() for t in finite] + [torch.zeros(2, dtype=torch.long)]  # integer buffers are not weights
    broken[0][7, 3] = float("nan")
    broken[2][1] = float("-inf")
    guard.note_weights(broken, step=5)
    event = guard.first()
    assert (event.kind, event.step, event.value) == ("weights", 5, 2.0)
    assert describe(event) == "2 weight tensor(s) hold non-finite values"


def test_temporaries_of_killed_checkpoint_writers_are_removed_at_the_next_save(tmp_path):
    """A writer SIGKILLed mid-write leaves `.<name>.ckpt.<pid>.tmp` (a checkpoint's worth of disk); the next save in
    that folder removes those whose process is gone, and keeps a live writer's."""
    import socket

    from lightning_modules.checkpoints import AtomicCheckpointIO

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = tmp_path / f".epoch=0-step=4.ckpt.{host}-{gone.pid}.tmp"
    alive = tmp_path / f".last.ckpt.{host}-{os.getppid()}.tmp"
    elsewhere = tmp_path / f".last.ckpt.another-node-{gone.pid}.tmp"  # a shared file system: not ours to judge
    for tmp in (dead, alive, elsewhere):
        tmp.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, "last.ckpt"])


def test_background_checkpoint_writes_keep_the_state_of_their_save_and_raise_their_failure(tmp_path):
    """A background write holds the checkpoint as it was when saved (training changes tensors and lists in place
    right after), and a write that fails raises at the next wait, naming its file."""
    from lightning_modules.checkpoints import ArtifactError, AtomicCheckpointIO

    io = AtomicCheckpointIO(background=True)
    weights, history = torch.zeros(4), [(10, 80.0)]
    io.save_checkpoint({"state_dict": {"w": weights}, "history": history}, tmp_path / "last.ckpt")
    weights.add_(1.0)  # the optimiser's next step
    history.append((20, 81.0))  # the evaluator's next point
    io.wait()
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(4)) and saved["history"] == [(10, 80.0)]
    (tmp_path / "a_file").write_text("not a folder")
    io.save_checkpoint({"global_step": 1}, tmp_path / "a_file" / "last.ckpt")  # returns: the thread fails later
    with pytest.raises(ArtifactError, match=r"could not write checkpoint .*a_file/last\.ckpt"):
        io.teardown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "last.ckpt"]  # no temporary left behind


def test_a_snapshot_is_serialised_after_training_changed_the_state_and_still_holds_the_saved_one(tmp_path,
                                                                                                monkeypatch):
    """The writer thread held until training has changed everything in place: the file still holds the state of
    the save; views of one storage (tied weights) still share one on load; removals queue behind the writes; a
    third save waits only when two snapshots are in flight; a checkpoint holding a Parameter (which a snapshot
    does not copy) is serialised at the save instead."""
    import threading

    from lightning_modules import checkpoints
    from lightning_modules.checkpoints import AtomicCheckpointIO

    gate, started = threading.Event(), []
    real_write = checkpoints.write_atomically

    def held_write(data, path):
        started.append(path.name)
        assert gate.wait(30)
        real_write(data, path)

    monkeypatch.setattr(checkpoints, "write_atomically", held_write)
    writer = AtomicCheckpointIO(background=True)
    (tmp_path / "old.ckpt").write_bytes(b"x")
    weights, step, history = torch.zeros(6), torch.tensor(3.0), [(10, 80.0)]
    tied = weights.view(2, 3)
    writer.save_checkpoint({"state_dict": {"w": weights, "tied": tied}, "optimizer_states": [{"step": step}],
                            "history": history}, tmp_path / "best.ckpt")
    writer.remove_checkpoint(tmp_path / "old.ckpt")
    writer.save_checkpoint({"global_step": 2, "p": torch.nn.Parameter(torch.ones(2))}, tmp_path / "last.ckpt")
    third = threading.Thread(target=writer.save_checkpoint, args=({"global_step": 3}, tmp_path / "third.ckpt"))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # two snapshots in flight: the third save waits for the oldest write
    weights.add_(1.0)
    step.add_(1.0)
    history.append((20, 81.0))
    assert (tmp_path / "old.ckpt").exists() and not (tmp_path / "best.ckpt").exists()
    gate.set()
    third.join(30)
    writer.wait()
    saved = torch.load(tmp_path / "best.ckpt", weights_only=False)
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(6)) and saved["optimizer_states"][0]["step"] == 3.0
    assert saved["history"] == [(10, 80.0)]
    assert saved["state_dict"]["tied"].untyped_storage().data_ptr() == saved["state_dict"]["w"].untyped_storage()\
        .data_ptr()
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert isinstance(last["p"], torch.nn.Parameter) and torch.equal(last["p"], torch.ones(2))
    assert started == ["best.ckpt", "last.ckpt", "third.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt", "third.ckpt"]
    # a step's two saves (best and last) both fill the host memory of the two written before, which stay intact
    for name in ("best2", "last2"):
        writer.save_checkpoint({"state_dict": {"w": weights}}, tmp_path / f"{name}.ckpt")
    writer.wait()
    spare = {storage.data_ptr() for storage in writer._spare}
    assert len(spare) == 2
    weights.add_(1.0)
    gate.clear()  # held until checked: a write finished before the second save would leave the queue
    for name in ("best3", "last3"):
        writer.save_checkpoint({"state_dict": {"w": weights}}, tmp_path / f"{name}.ckpt")
    assert {storage.data_ptr() for _, storages in writer._jobs for storage in storages} == spare
    gate.set()
    writer.teardown()
    for name, value in (("best2", 1.0), ("last2", 1.0), ("best3", 2.0), ("last3", 2.0)):
        assert torch.equal(torch.load(tmp_path / f"{name}.ckpt")["state_dict"]["w"], torch.full((6,), value))
    assert torch.equal(torch.load(tmp_path / "best.ckpt", weights_only=False)["state_dict"]["w"], torch.zeros(6))
