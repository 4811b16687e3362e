"""`train.py push`: the dry run of each kind of export, and the upload against a recorder in place of HfApi."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, metadata_load

import train
from commands.push import push
from core.errors import DataError
from lightning_modules import ContrastiveModule
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE
from lightning_modules.export import export_sae, export_sentence_transformer

BASE = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A tiny encoder export (with an STS table on its card) and one SAE in each layout."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    module = ContrastiveModule(tiny_model, pooler="mean", max_length=16)
    facts = {"step": 3, "sts": {"data_root": "d", "missing": [],
                                "tasks": {"stsb": {"spearman": 71.25, "n_pairs": 1379},
                                          "sickr": {"spearman": 65.5, "n_pairs": 4927}}}}
    out = {"encoder": export_sentence_transformer(module, root / "st", run_facts=facts)}
    sae = BatchTopKSAE(BatchTopKConfig(d_in=4, num_latents=8, k=2))
    sae.threshold.fill_(0.25)
    sae.activations = {"model": BASE, "layer": 3, "level": "token", "special_tokens": "drop"}
    out["sparsify"] = export_sae(sae, root / "sae_sparsify")
    out["saelens"] = export_sae(sae, root / "sae_lens", format="saelens")
    return out


def printed_front_matter(text: str) -> dict:
    """The YAML the dry run prints between its two ``---`` lines."""
    return yaml.safe_load(text.split("\n---\n")[1])


@pytest.mark.parametrize("kind,files,meta", [
    ("encoder", {"README.md", "modules.json", "model.safetensors", "config.json", "tokenizer.json",
                 "1_Pooling/config.json"},  # sentence-transformers 6 also writes 2_Normalize/config.json
     {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity"}),
    ("sparsify", {"README.md", "cfg.json", "sae.safetensors"},
     {"base_model": BASE, "layer": 3, "hook_point": "hidden_states.3", "d_sae": 8}),
    ("saelens", {"README.md", "cfg.json", "sae_weights.safetensors"},
     {"library_name": "saelens", "base_model": BASE, "layer": 3, "hook_point": "hidden_states.3"}),
])
def test_dry_run_lists_every_file_and_a_card_the_hub_parses(exports, capsys, kind, files, meta):
    folder = exports[kind]
    train.main(["push", "--model", str(folder), "--repo_id", "me/tiny", "--dry_run", "true"])
    text = capsys.readouterr().out
    on_disk = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert files <= set(on_disk)
    block = text.split("\ncard front matter")[0].split("\n")
    listed = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in block if line.startswith("  ")}
    assert listed == on_disk  # every file, with its size
    assert "https://huggingface.co/me/tiny" in text and "dry run" in text
    front = printed_front_matter(text)
    assert front == metadata_load(folder / "README.md")  # what is printed is what the Hub reads
    assert {k: front[k] for k in meta} == meta and "embedlab" in front["tags"]
    ModelCard.load(folder / "README.md", ignore_metadata_errors=False)  # raises on a card the Hub rejects


def test_encoder_card_model_index_holds_the_sts_table(exports):
    card = ModelCard.load(exports["encoder"] / "README.md", ignore_metadata_errors=False)
    got = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {("mteb/stsbenchmark-sts", "test", "spearman_cosine"): 0.7125,
                   ("sick", "test", "spearman_cosine"): 0.655}


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records each call, and the bytes of each file upload_folder gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        folder = Path(kw["folder_path"])
        self.uploaded = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def online(monkeypatch):
    """A token and the hub switched on, for this test only."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")


@pytest.mark.parametrize("kind", ["encoder", "saelens", "sparsify"])
def test_recorded_upload_carries_every_file_as_it_is(exports, online, kind):
    api, folder = RecordingApi(), exports[kind]
    before = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    plan = push(folder, "me/tiny", private=True, revision="v1", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][1]["branch"] == "v1" and api.calls[2][1]["revision"] == "v1"
    assert api.uploaded == before  # every file of the export as it was before the push (the card untouched)
    assert b"embedlab" in api.uploaded["README.md"]  # embedlab's card, not a generated one
    assert plan.url == "https://huggingface.co/me/tiny/tree/v1"


def test_no_branch_is_made_for_the_default_revision(exports, online):
    api = RecordingApi()
    assert push(exports["encoder"], "me/tiny", api=api).url == "https://huggingface.co/me/tiny"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"] and api.calls[1][1]["revision"] is None


def test_offline_or_without_token_one_line_before_reading(tmp_path, monkeypatch):
    missing = tmp_path / "nothing"  # never read: the check comes first
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE is set.*HF_TOKEN or run `huggingface-cli login`"):
        push(missing, "me/tiny")
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(DataError, match=r"^no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`"):
        push(missing, "me/tiny")


def test_bad_folders_cards_and_repo_ids(exports, tmp_path):
    with pytest.raises(DataError, match="--repo_id 'tiny': give it as USER/NAME"):
        push(exports["encoder"], "tiny", dry_run=True)
    with pytest.raises(DataError, match="--repo_id 'me/ti ny'"):
        push(exports["encoder"], "me/ti ny", dry_run=True)
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="not an embedlab export"):
        push(tmp_path / "x", "me/tiny", dry_run=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("cfg.json", "sae.safetensors"):
        (broken / name).write_bytes((exports["sparsify"] / name).read_bytes())
    with pytest.raises(DataError, match="README.md: no model card"):
        push(broken, "me/tiny", dry_run=True)
    (broken / "README.md").write_text("---\nmodel-index:\n- name: x\n  results: [{task: 1}]\n---\n# card\n")
    with pytest.raises(DataError, match="front matter the Hub would reject"):
        push(broken, "me/tiny", dry_run=True)
