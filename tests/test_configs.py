"""Every recipe in configs/ parses and runs a few steps on the tiny model with local data (docs/design.md)."""

import functools
from pathlib import Path

import pytest
import yaml

import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml"))
OVERRIDES = sorted((CONFIGS / "trainer").glob("*.yaml"))


def patch(node, paths: dict, tmp_path: Path, data_class: str | None = None):
    """Point a recipe at local tiny resources: models, data sources, STS tasks, output folders."""
    if isinstance(node, list):
        return [patch(n, paths, tmp_path, data_class) for n in node]
    if not isinstance(node, dict):
        return node
    cls = node.get("class_path", data_class)
    out = {}
    for key, value in node.items():
        if key == "model_name_or_path":
            value = paths["model"]
        elif key == "source" and cls:
            value = str(paths["nli"] if "NLI" in cls or node.get("columns") else paths["sentences"])
        elif key == "in_dim":
            value = 32  # the tiny model's hidden size
        elif key == "out_dim":
            value = min(value, 16)
        elif key == "cache_path":
            value = str(tmp_path / "cache.safetensors")
        elif key in ("data_files", "subset"):
            value = None
        elif key == "task" and cls and "STSEvaluator" in cls:
            value = str(paths["sts"])
        elif key == "init_dev":  # MCR2Module's init: best is chosen on STS dev pairs
            value = str(paths["sts"])
        elif key == "extra_sources" and value:
            value = [str(paths["sentences"])]
        elif key == "matryoshka_dims" and value:  # must end at the shrunk out_dim
            k = min(node.get("out_dim", value[-1]), 16)
            value = [d for d in (4, 8) if d < k] + [k]
        elif key in ("save_dir", "dirpath", "output_dir", "default_root_dir"):
            value = str(tmp_path / key)
        elif key == "batch_size":
            value = min(value, 8)
        elif key == "max_length":
            value = min(value, 32)  # the tiny model's 64 positions
        elif key == "columns" and value and not set(value) <= {"sent0", "sent1", "hard_neg"}:
            value = ["sent0", "sent1", "hard_neg"][: len(value)]
        else:
            value = patch(value, paths, tmp_path, cls)
        out[key] = value
    if "model_name_or_path" in node:
        out.setdefault("max_length", 32)  # a module's default may exceed the tiny model's positions
    return out


@pytest.fixture
def local_paths(tmp_path, tiny_model, sample_data):
    sentences = (sample_data / "sentences.txt").read_text().splitlines()
    rows = ["sent0,sent1,hard_neg"] + [f"{a},{b},{c}" for a, b, c in zip(sentences, sentences[1:], sentences[2:])]
    (tmp_path / "nli.csv").write_text("\n".join(rows[:80]) + "\n")
    return {"model": tiny_model, "sentences": sample_data / "sentences.txt", "nli": tmp_path / "nli.csv",
            "sts": sample_data / "sts_dev.tsv"}


def local_configs(recipe: Path, local_paths: dict, tmp_path: Path, **trainer) -> list[str]:
    """``--config`` arguments running ``recipe`` on local resources: each file it builds on (``defaults:``,
    configs/defaults/) patched and named before it, then the recipe with ``trainer`` set."""
    files = [*map(Path, train.base_configs(str(recipe))), recipe]
    args, class_paths = [], {}  # a section without class_path (model, data) extends the earlier file's class
    for i, path in enumerate(files):
        cfg = {}
        for key, node in yaml.safe_load(path.read_text()).items():
            if isinstance(node, dict) and "class_path" in node:
                class_paths[key] = node["class_path"]
            cfg[key] = patch(node, local_paths, tmp_path, class_paths.get(key))
        cfg.pop("defaults", None)  # named here in order instead
        if path == recipe:
            cfg.setdefault("trainer", {}).update(trainer)
        out = tmp_path / ("recipe.yaml" if path == recipe else f"base{i}.yaml")
        out.write_text(yaml.safe_dump(cfg))
        args += ["--config", str(out)]
    return args


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_a_few_steps(recipe, tmp_path, local_paths, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = local_configs(recipe, local_paths, tmp_path, accelerator="cpu", devices=1, precision="32-true",
                            max_steps=2, max_epochs=None, enable_progress_bar=False)
    cli = train.main(["fit", *configs])
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda p: p.stem)
def test_trainer_overrides_parse(override, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(override), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in yaml.safe_load(override.read_text())["trainer"].items():
        assert printed["trainer"][key] == value


#: What turns a GPU trainer override into a CPU one here; compile is also switched off (minutes on CPU,
#: docs/pitfalls.md #10: tests/test_fast_paths.py compiles one tiny forward instead).
CPU_ARGS = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
            "--trainer.precision=32-true"]


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
@pytest.mark.parametrize("override", OVERRIDES, ids=lambda p: p.stem)
def test_trainer_overrides_train_a_step_on_cpu(override, tmp_path, local_paths, monkeypatch):
    """Each override instantiates with a quick recipe: trainer, plugins (SLURMEnvironment), model and data switches."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from datamodules.samplers import LengthGroupedSampler

    monkeypatch.chdir(tmp_path)
    cfg = patch(yaml.safe_load((CONFIGS / "quickstart.yaml").read_text()), local_paths, tmp_path)
    cfg["trainer"].update(max_steps=1, logger=False, callbacks=[], enable_progress_bar=False,
                          enable_checkpointing=False)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    spec = yaml.safe_load(override.read_text())
    extra = ["--model.init_args.compile=false"] if spec.get("model", {}).get("init_args", {}).get("compile") else []
    if spec.get("data", {}).get("init_args", {}).get("num_workers"):
        extra.append("--data.init_args.num_workers=1")  # the worker path, without 4 processes on a small CPU
    cli = train.main(["fit", "--config", str(tmp_path / "recipe.yaml"), "--config", str(override), *CPU_ARGS,
                      "--trainer.max_steps=1", *extra])
    assert cli.trainer.global_step == 1
    plugins = spec["trainer"].get("plugins", [])
    if any("SLURMEnvironment" in p["class_path"] for p in plugins):
        env = cli.trainer._accelerator_connector.cluster_environment
        assert isinstance(env, SLURMEnvironment) and env.auto_requeue
        assert env.requeue_signal.name == "SIGUSR1"
    if override.stem == "gpu_fast":
        assert cli.model.encoder.model.config._attn_implementation == "sdpa"
        assert cli.datamodule.pad_to_multiple_of == 8 and cli.datamodule.pin_memory
        assert isinstance(cli.datamodule._sampler, LengthGroupedSampler)


def test_defaults_are_read_before_the_file_that_names_them(tmp_path):
    """A config's ``defaults`` (relative to its folder, recursively) becomes a ``--config`` just before it; the
    other arguments keep their order, so later files and the command line win."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "shared" / "family.yaml").write_text("defaults: root.yaml\n")
    (tmp_path / "recipe.yaml").write_text("defaults: shared/family.yaml\n")
    (tmp_path / "plain.yaml").write_text("seed_everything: 2\n")
    recipe, plain = str(tmp_path / "recipe.yaml"), str(tmp_path / "plain.yaml")
    shared = tmp_path / "shared"
    assert train.with_defaults(["fit", "--config", recipe, "-c", plain, "--seed_everything=3"]) == [
        "fit", f"--config={shared / 'root.yaml'}", f"--config={shared / 'family.yaml'}", "--config", recipe,
        "-c", plain, "--seed_everything=3"]
    assert train.with_defaults(["fit", f"--config={plain}"]) == ["fit", f"--config={plain}"]


def test_defaults_that_are_missing_or_circular_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    with pytest.raises(train.DataError, match=r"a\.yaml: defaults: b\.yaml is not a file"):
        train.with_defaults(["fit", "--config", str(tmp_path / "a.yaml")])
    with pytest.raises(train.DataError, match="--defaults is read from config files only"):
        train.with_defaults(["fit", "--defaults", str(tmp_path / "a.yaml")])
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\n")
    with pytest.raises(train.DataError, match=r"b\.yaml: defaults: a\.yaml builds on itself"):
        train.with_defaults(["fit", "--config", str(tmp_path / "a.yaml")])


#: The callbacks each recipe's --print_config lists (ModelCheckpoint: the SAE recipes name theirs in
#: configs/defaults/sae.yaml; the STS recipes' follows their evaluator and is added at fit, commands/run_defaults.py).
SHOWN = {"STS": ["STSEvaluator", "Throughput"], "STS+export": ["STSEvaluator", "Throughput", "ExportOnFitEnd"],
         "MCR2": ["STSEvaluator", "ExportOnFitEnd"], "SAE": ["ExportOnFitEnd", "ModelCheckpoint"]}
CALLBACKS = {
    **dict.fromkeys(["hncse_hnm_bert_base", "hncse_pm_bert_base", "simcse_sup_bert_base", "simcse_sup_minilm_mined",
                     "simcse_sup_minilm_nli", "simcse_unsup_bert_base", "simcse_unsup_minilm_wiki"], SHOWN["STS"]),
    **dict.fromkeys(["hncse_hnm_quick", "hncse_pm_quick", "quickstart"], SHOWN["STS+export"]),
    **dict.fromkeys(["mcr2_minilm_kmeans", "mcr2_minilm_matryoshka", "mcr2_minilm_nli_pairs", "mcr2_minilm_quick"],
                    SHOWN["MCR2"]),
    **dict.fromkeys(["sae_e5_hub", "sae_minilm_brown_tokens", "sae_minilm_brown_tokens_matryoshka",
                     "sae_minilm_sentences", "sae_mpnet_hub"], SHOWN["SAE"]),
}


@functools.cache
def printed(recipe: Path) -> dict:
    """The recipe's ``fit --print_config``, composed with the files it builds on (benchmarks/print_config.py)."""
    from benchmarks.print_config import printed as print_config

    return yaml.safe_load(print_config(recipe))


def without(printed_cfg: dict, own: dict) -> dict:
    """``printed_cfg`` less every option ``own`` (a recipe file's YAML) sets: a class entry goes whole."""
    out = dict(printed_cfg)
    for key, value in own.items():
        if isinstance(value, dict) and "class_path" not in value and isinstance(out.get(key), dict):
            out[key] = without(out[key], value)
        else:
            out.pop(key, None)
    return out


def test_every_recipe_is_listed_with_its_callbacks():
    assert sorted(CALLBACKS) == [p.stem for p in RECIPES]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_print_config_shows_the_evaluator_export_and_checkpoint(recipe, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    callbacks = printed(recipe)["trainer"]["callbacks"]
    assert [c["class_path"].rpartition(".")[2] for c in callbacks] == CALLBACKS[recipe.stem]
    for callback in callbacks:
        if callback["class_path"].endswith("STSEvaluator"):
            assert callback["init_args"]["split"] == "dev" and callback["init_args"]["every_n_steps"] > 0
        if callback["class_path"].endswith("ModelCheckpoint"):
            assert {k: callback["init_args"][k] for k in ("monitor", "mode", "save_last")} == {
                "monitor": "val/sae/fvu", "mode": "min", "save_last": True}


@pytest.mark.parametrize("recipe", [p for p in RECIPES if train.base_configs(str(p))
                                    and Path(train.base_configs(str(p))[-1]).parent == CONFIGS], ids=lambda p: p.stem)
def test_a_recipe_prints_what_it_builds_on_but_its_own_options(recipe, monkeypatch):
    """hncse_hnm_quick is quickstart with another candidate builder: every other printed option is the same."""
    monkeypatch.chdir(CONFIGS.parent)
    own = yaml.safe_load(recipe.read_text())
    base = Path(train.base_configs(str(recipe))[-1])
    assert without(printed(recipe), own) == without(printed(base), own)
