"""Each module family answers for itself (lightning_modules.family): every family in lightning_modules.__all__
answers the interface, the run tags and checkpoint monitor asked of the class named by a recipe are what the
class-name branches of run_defaults gave, and a checkpoint read builds its module without reading the file again."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import Namespace, dict_to_namespace

import lightning_modules
import train
from lightning_modules.checkpoints import CLASS_PATH_KEY, read_checkpoint
from lightning_modules.components.batch_topk import BatchTopKConfig
from lightning_modules.family import ModuleFamily, entry_name, family_class

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {}))
ANSWERS = ("how_to_load", "write_export", "card_record")


def old_module_tags(model: Namespace) -> list[str]:
    """The method tags run_defaults.run_tags computed by comparing class names (before the families answered)."""
    module, margs = entry_name(model), model.get("init_args") or Namespace()
    tags = []
    if module == "ContrastiveModule":
        builder = margs.get("candidates")
        tags.append(entry_name(builder) if builder is not None else "simcse")
    elif module == "SAEModule":
        sae = margs.get("sae")
        widths = sae.get("matryoshka_widths") if isinstance(sae, Namespace) else None
        tags.append("matryoshka-batchtopk-sae" if widths else "batchtopk-sae")
    elif module:
        tags.append(module.removesuffix("Module").lower())
    if module == "MCR2Module" and margs.get("grouping"):
        tags.append(f"grouping:{margs.grouping}")
    return tags


def merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mappings merged key by key: how jsonargparse composes two --config files for the
    class paths and options the tags read, without parsing every recipe (test_configs does that). It differs where a
    later file names another ``class_path``: jsonargparse then drops the options of the first class, this keeps
    them; no recipe does that."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_model(path: Path) -> Namespace:
    """The recipe's model entry, composed over the files it builds on (``defaults:``)."""
    model: dict = {}
    for f in [*train.base_configs(str(path)), str(path)]:
        model = merged(model, yaml.safe_load(Path(f).read_text()).get("model") or {})
    return dict_to_namespace(model)


@pytest.mark.parametrize("name", [n for n in lightning_modules.__all__ if n != "EmbeddingModule"])
def test_every_family_answers_the_interface(name):
    cls = getattr(lightning_modules, name)
    assert issubclass(cls, ModuleFamily) and family_class(name) is cls
    assert family_class(f"{cls.__module__}.{name}") is cls
    assert isinstance(cls.export_type, str) and cls.export_subdir and cls.export_marker
    for answer in ANSWERS:  # each family writes, describes and loads its own export
        assert getattr(cls, answer) is not getattr(ModuleFamily, answer), f"{name}.{answer}"
    tags = cls.run_tags(Namespace())
    assert tags and all(isinstance(t, str) for t in tags)
    monitor = cls.checkpoint_monitor(Namespace())
    assert monitor is None or set(monitor) == {"monitor", "mode", "filename"}


def test_unknown_class_paths_name_no_family():
    assert family_class("no.such.Module") is None
    assert family_class("pytorch_lightning.LightningModule") is None  # a class, but no family
    assert family_class("") is None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_run_tags_from_the_class_are_the_old_ones(recipe):
    model = recipe_model(recipe)
    family = family_class(model.class_path)
    assert family is not None, recipe
    assert family.run_tags(model.get("init_args") or Namespace()) == old_module_tags(model)


def test_tags_and_monitors_of_each_family():
    sae = recipe_model(CONFIGS / "sae_minilm_brown_tokens_matryoshka.yaml")
    assert family_class(sae.class_path).run_tags(sae.init_args) == ["matryoshka-batchtopk-sae"]
    assert family_class(sae.class_path).checkpoint_monitor(sae.init_args) == {
        "monitor": "val/sae/fvu", "mode": "min", "filename": "step{step}-fvu{val/sae/fvu:.4f}"}
    hnm = recipe_model(CONFIGS / "hncse_hnm_quick.yaml")
    assert family_class(hnm.class_path).run_tags(hnm.init_args) == ["HardNegativeMixing"]
    assert family_class(hnm.class_path).checkpoint_monitor(hnm.init_args) is None
    kmeans = recipe_model(CONFIGS / "mcr2_minilm_kmeans.yaml")
    assert family_class(kmeans.class_path).run_tags(kmeans.init_args) == ["mcr2", "grouping:kmeans"]
    assert lightning_modules.SAEModule.moved_options["k"] == "sae.k"


def sae_checkpoint(path: Path, step: int) -> lightning_modules.SAEModule:
    torch.manual_seed(step)
    module = lightning_modules.SAEModule(sae=BatchTopKConfig(d_in=4, num_latents=8, k=2))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": step,
                "pytorch-lightning_version": pl.__version__, CLASS_PATH_KEY: "lightning_modules.sae.SAEModule"}, path)
    return module


def test_a_checkpoint_read_builds_its_module_without_reading_again(tmp_path, monkeypatch):
    path = tmp_path / "sae.ckpt"
    module = sae_checkpoint(path, 7)
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    checkpoint = read_checkpoint(path)
    rebuilt = checkpoint.module()
    assert checkpoint.step == 7 and len(loads) == 1  # module() built it from what was read
    assert type(rebuilt) is lightning_modules.SAEModule
    for name, tensor in module.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    assert rebuilt.card_record(checkpoint)["global_step"] == 7
    assert rebuilt.how_to_load("x") == "lightning_modules.export.load_sae('x')"
    sae_checkpoint(path, 8)  # nothing is kept between reads: a new read sees the new file
    assert read_checkpoint(path).step == 8 and len(loads) == 2


def test_the_sae_family_writes_its_own_export(tmp_path):
    from lightning_modules.export import export, export_format, load_sae

    module = sae_checkpoint(tmp_path / "sae.ckpt", 3)
    module.sae.threshold.fill_(0.25)  # SAELens' JumpReLU needs one
    assert export_format(module, None) == "sparsify"
    out = export(module, tmp_path / "sae", format="saelens")
    assert (out / module.export_marker).is_file() and (out / "sae_weights.safetensors").is_file()
    assert not (out / "sae.safetensors").exists()  # SAELens' layout, not sparsify's
    assert torch.allclose(load_sae(out).W_dec, module.sae.W_dec)


def test_a_family_without_an_end_of_fit_record_is_refused_before_training(tiny_model):
    from callbacks.export import ExportOnFitEnd
    from core.errors import DataError

    class OtherExport(lightning_modules.ContrastiveModule):
        export_type = "other"

    with pytest.raises(DataError, match=r"no end-of-fit record for OtherExport's export type 'other'"):
        ExportOnFitEnd().on_fit_start(None, OtherExport(tiny_model, pooler="mean"))


def test_a_checkpoint_of_a_module_outside_the_families_is_refused_by_name(tmp_path):
    """A checkpoint naming a LightningModule that is no ModuleFamily (it has no export_type) gets the loaders' own
    error naming its class, not an AttributeError."""
    from pytorch_lightning.demos.boring_classes import BoringModel

    from core.errors import DataError
    from evaluation.evaluate import load_embedder, load_sentence_transformer
    from lightning_modules.export import load_any_sae

    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    path = tmp_path / "boring.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[CLASS_PATH_KEY] = "pytorch_lightning.demos.boring_classes.BoringModel"
    torch.save(checkpoint, path)
    with pytest.raises(DataError, match="is a BoringModel checkpoint, not an SAEModule one"):
        load_any_sae(path)
    with pytest.raises(DataError, match="is a BoringModel checkpoint: evaluate scores sentence encoders"):
        load_embedder(str(path))
    with pytest.raises(DataError, match="is a BoringModel checkpoint: mining needs a sentence encoder"):
        load_sentence_transformer(str(path))
