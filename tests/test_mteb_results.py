"""MTEB results in MTEB's format: `evaluate --tasks <MTEB names>`, the callback's TaskResults, the cards built
from them, prompts, and the card metadata read from the base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from test_mteb_callback import data_root, direct_spearman, pairs_tsv  # noqa: F401  (fixtures)

import train
from core.errors import DataError
from lightning_modules import ContrastiveModule
from lightning_modules.export import export_sentence_transformer


def cache_results(folder: Path) -> dict[tuple[str, str, str], float]:
    """(model name, revision, task) -> main score x 100, as mteb's own ResultCache loads the folder."""
    from mteb.cache import ResultCache

    bench = ResultCache(folder).load_results(include_remote=False, require_model_meta=True)
    return {(m.model_name, m.model_revision, t.task_name): t.get_score() * 100
            for m in bench.model_results for t in m.task_results}


@pytest.fixture
def module(tiny_model):
    torch.manual_seed(0)
    return ContrastiveModule(tiny_model, pooler="mean", max_length=16)


def test_evaluate_runs_mteb_tasks_on_an_export_and_updates_its_card(module, data_root, pairs_tsv, tmp_path):  # noqa: F811
    folder = export_sentence_transformer(module, tmp_path / "st", run_facts={"step": 1, "sts": {"data_root": "d",
                                         "tasks": {"stsb": {"spearman": 50.0, "n_pairs": 10}}}})
    args = ["evaluate", "--model", str(folder), "--tasks", "STSBenchmark,SICK-R", "--data_root", str(data_root)]
    train.main(args)
    got = cache_results(folder / "mteb")
    # the fixture's STS-B test file and SICK's three files hold the same pairs (SICK's scores linearly rescaled)
    want = direct_spearman(module, pairs_tsv)
    assert got == pytest.approx({("embedlab/st", "export", "STSBenchmark"): want,
                                 ("embedlab/st", "export", "SICK-R"): want}, abs=0.05)
    train.main(args)  # a second run replaces its entries on the card, the STS table's stay
    card = ModelCard.load(folder / "README.md", ignore_metadata_errors=False)
    entries = {(r.dataset_type, r.source_name): r.metric_value for r in card.data.eval_results}
    assert len(card.data.eval_results) == len(entries) == 3  # replaced, not appended
    assert entries == pytest.approx({("mteb/stsbenchmark-sts", "MTEB"): want / 100,
                                     ("mteb/sickr-sts", "MTEB"): got[("embedlab/st", "export", "SICK-R")] / 100,
                                     ("mteb/stsbenchmark-sts", None): 0.5}, abs=5e-4)
    title = next(line[2:] for line in card.text.splitlines() if line.startswith("# "))
    assert card.data.model_name == title and title.endswith(", SimCSE")  # the model-index is named as the card
    assert card.text.count("## MTEB") == 1 and "| STSBenchmark | test | default | `cosine_spearman` |" in card.text


def test_a_task_without_local_data_says_so_offline_in_one_line():
    from evaluation.mteb_eval import load_tasks

    with pytest.raises(DataError, match=r"^MTEB task Banking77Classification needs its data from the Hugging Face "
                                        r"hub \(mteb/banking77\) and HF_HUB_OFFLINE is set"):
        load_tasks(["Banking77Classification"])
    with pytest.raises(DataError, match="mixes this project's STS names"):
        train.main(["evaluate", "--model", "x", "--tasks", "stsb,SICK-R"])


def test_prompts_reach_the_encoder_by_mteb_key(pairs_tsv):  # noqa: F811
    from evaluation.mteb_eval import encoder, evaluate_tasks, load_tasks

    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return torch.randn(len(texts), 4)

    tasks = load_tasks(["STSBenchmark"], local_data={"STSBenchmark": str(pairs_tsv)})
    evaluate_tasks(encoder(encode, "t/m", "r", {"STS": "sts: ", "query": "query: "}), tasks)
    assert seen and all(t.startswith("sts: ") for t in seen)  # STS asks for no prompt type: the task type's key
    seen.clear()
    evaluate_tasks(encoder(encode, "t/m", "r", {"STSBenchmark": "q: ", "STS": "sts: "}), tasks)
    assert seen and all(t.startswith("q: ") and not t.startswith("q: sts: ") for t in seen)  # the task's own key first


def test_fit_export_card_carries_the_mteb_results_of_the_exported_step(module, sample_data, data_root, tmp_path):  # noqa: F811
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from callbacks import ExportOnFitEnd
    from callbacks.mteb import MTEBEvaluator
    from datamodules import SentencesDataModule

    cb = MTEBEvaluator(["STSBenchmark"], every_n_steps=2, data_root=str(data_root))
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, default_root_dir=tmp_path,
                         callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", monitor=
                                                        "mteb/STSBenchmark", mode="min", every_n_train_steps=2),
                                    ExportOnFitEnd(sts_tasks=[], log_artifacts=False)],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16))
    scores = {step: s["mteb/STSBenchmark"] for step, s in cb.history}
    assert sorted(scores) == [2, 4]
    got = cache_results(tmp_path / "run" / "mteb")
    assert got == pytest.approx({("embedlab/ContrastiveModule", f"step{s}", "STSBenchmark"): v
                                 for s, v in scores.items()}, abs=1e-4)
    kept = min(scores, key=scores.get)  # mode min: the worse step, so that "the last one" would be caught
    card = ModelCard.load(tmp_path / "run" / "export" / "README.md", ignore_metadata_errors=False)
    (entry,) = card.data.eval_results
    assert entry.dataset_type == "mteb/stsbenchmark-sts" and entry.metric_value == pytest.approx(
        scores[kept] / 100, abs=1e-6)
    # evaluate on that checkpoint stores beside the callback's, under the same name and step: the same score
    ckpt = next((tmp_path / "run" / "checkpoints").glob(f"*step={kept}.ckpt"))
    stored = tmp_path / "run" / "mteb" / "results" / "embedlab__ContrastiveModule" / f"step{kept}" / "STSBenchmark.json"
    stored.unlink()  # so that what is read back below is what evaluate wrote
    train.main(["evaluate", "--model", str(ckpt), "--tasks", "STSBenchmark", "--data_root", str(data_root)])
    again = cache_results(tmp_path / "run" / "mteb")[("embedlab/ContrastiveModule", f"step{kept}", "STSBenchmark")]
    assert again == pytest.approx(scores[kept], abs=1e-4)


def test_a_results_dir_of_its_own_reaches_the_card(module, sample_data, data_root, tmp_path):  # noqa: F811
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from callbacks import ExportOnFitEnd
    from callbacks.mteb import MTEBEvaluator
    from datamodules import SentencesDataModule

    cb = MTEBEvaluator(["STSBenchmark"], every_n_steps=2, data_root=str(data_root), results_dir=str(tmp_path / "r"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path,
                         callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints"),
                                    ExportOnFitEnd(sts_tasks=[], log_artifacts=False)],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=SentencesDataModule(str(sample_data / "sentences.txt"), batch_size=16))
    assert not (tmp_path / "run" / "mteb").exists()
    (entry,) = ModelCard.load(tmp_path / "run" / "export" / "README.md").data.eval_results
    assert entry.metric_value == pytest.approx(dict(cb.history)[2]["mteb/STSBenchmark"] / 100, abs=1e-6)


def test_benchmark_names_are_checked():
    from evaluation.mteb_eval import benchmark_tasks

    assert {"STSBenchmark", "SICK-R"} <= set(benchmark_tasks("MTEB(eng, v1)"))
    with pytest.raises(DataError, match=r"--benchmark 'MTEB\(eng, v9\)' is not an MTEB benchmark; did you mean"):
        benchmark_tasks("MTEB(eng, v9)")
    with pytest.raises(DataError, match="give --benchmark or --tasks, not both"):
        train.main(["evaluate", "--model", "x", "--tasks", "STSBenchmark", "--benchmark", "MTEB(eng, v1)"])


def test_matryoshka_card_names_its_dims_and_truncate_dim_loads_the_prefix(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    from lightning_modules import MCR2Module

    torch.manual_seed(0)
    module = MCR2Module(tiny_model, out_dim=8, matryoshka_dims=[2, 4, 8], max_length=16)
    folder = export_sentence_transformer(module, tmp_path / "m")
    card = (folder / "README.md").read_text()
    assert "| Matryoshka dims | 2, 4, 8 (" in card and f"SentenceTransformer({str(folder)!r}, truncate_dim=2)" in card
    assert "matryoshka" in ModelCard.load(folder / "README.md").data.tags
    texts = ["a man reads .", "the dog plays in the park ."]
    small = SentenceTransformer(str(folder), truncate_dim=2, device="cpu").encode(texts, convert_to_tensor=True)
    full = F.normalize(module.encode(texts), dim=-1)
    assert (small - full[:, :2]).abs().max() < 1e-5


def test_licence_and_language_come_from_the_base_models_card(tmp_path):
    from lightning_modules.card_metadata import front_matter, hub_datasets

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n- fr\n---\n# base\n")
    meta = ModelCard(front_matter(base=str(base), tags=["x"], model_name="m", eval_results=[]) + "\n").data
    assert (meta.license, meta.language, meta.base_model) == ("mit", ["en", "fr"], None)
    meta = ModelCard(front_matter(base="owner/not-cached", tags=["x"], model_name="m", eval_results=[]) + "\n").data
    assert (meta.license, meta.language, meta.base_model) == (None, None, "owner/not-cached")  # never guessed
    data = {"init_args": {"source": "brown", "dataset": "owner/corpus", "data_root": str(tmp_path)}}
    assert hub_datasets(data) == ["owner/corpus"]


def test_sts_hub_datasets_are_mtebs_own():
    import mteb

    from lightning_modules.card_metadata import STS_HUB_DATASETS

    for name, dataset in STS_HUB_DATASETS.values():
        assert mteb.get_task(name).metadata.dataset["path"] == dataset


@pytest.mark.data
def test_minilm_stsbenchmark_through_mteb_matches_the_published_score(minilm, shared_data, tmp_path):
    args = ["evaluate", "--model", minilm, "--tasks", "STSBenchmark", "--data_root", str(shared_data),
            "--results_dir", str(tmp_path / "r")]
    before = (Path(minilm) / "README.md").read_text()
    train.main(args)
    ((key, score),) = cache_results(tmp_path / "r").items()
    assert key == ("embedlab/model", "export", "STSBenchmark") and score == pytest.approx(82.03, abs=0.01)
    assert (Path(minilm) / "README.md").read_text() == before  # not an embedlab card: left alone


def test_a_hub_base_installed_offline_gives_its_licence(minilm):
    from lightning_modules.card_metadata import front_matter

    meta = ModelCard(front_matter(base="sentence-transformers/all-MiniLM-L6-v2", tags=["x"], model_name="m",
                                  eval_results=[]) + "\n").data
    assert (meta.license, meta.language) == ("apache-2.0", "en")  # from the installed package's own card
    assert meta.base_model == "sentence-transformers/all-MiniLM-L6-v2"
