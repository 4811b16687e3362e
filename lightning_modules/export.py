"""Export trained modules as artefacts other tools load directly.

Encoders become sentence-transformers folders: ``SentenceTransformer(path)`` loads them, and their ``encode``
returns the trained module's ``encode``, L2-normalised (cosine similarity is the metric every module here trains
for, so the exported model ends with ``Normalize`` and a dot product is a cosine).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import DataError, why_write_failed
from core.files import readable_as_umask
from core.hub import pooler_report_filtered
from core.tensors import eval_mode
from lightning_modules.checkpoints import ArtifactError
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE, fold_input_scale
from lightning_modules.components.guard import DivergenceError
from lightning_modules.components.st_modules import st_modules, transformer
from lightning_modules.family import SAE, ModuleFamily
from lightning_modules.loading import is_checkpoint_file, load_module
from lightning_modules.model_card import write_model_card
from lightning_modules.sae_card import sae_card
from lightning_modules.saelens_format import WEIGHTS_FILE as SAELENS_WEIGHTS
from lightning_modules.saelens_format import from_saelens, sae_weights_file, saelens_files


def sentence_transformer_modules(module: nn.Module, transformer_dir: str | Path) -> list[nn.Module]:
    """The sentence-transformers modules equivalent to ``module.encode`` (an ``EmbeddingModule``'s; followed by
    Normalize).

    ``transformer_dir`` must already hold the Hugging Face model and tokenizer (``save_pretrained``).
    Modules that add a head after pooling extend this list (see ``extra_st_modules``).
    """
    modules_ = st_modules()  # imported when used: ~3 s; only exporting needs it
    Dense, Normalize, Pooling = modules_.Dense, modules_.Normalize, modules_.Pooling
    enc = module.encoder
    first_last = enc.pooler == "first_last_avg"
    config_kwargs = {"output_hidden_states": True} if first_last else None
    modules: list[nn.Module] = [transformer(str(transformer_dir), enc.max_length, config_kwargs)]
    if first_last:  # (hidden_states[1] + hidden_states[-1]) / 2 as a layer weighting from layer 1
        n_layers = enc.model.config.num_hidden_layers
        weights = torch.zeros(n_layers)
        weights[0] = weights[-1] = 1.0
        modules.append(modules_.WeightedLayerPooling(enc.dim, num_hidden_layers=n_layers, layer_start=1,
                                                    layer_weights=nn.Parameter(weights)))
    modules.append(Pooling(enc.dim, "cls" if enc.pooler.startswith("cls") else "mean"))
    if enc.mlp is not None and enc.mlp_mode == "always":
        modules.append(Dense(enc.dim, enc.dim, activation_function=nn.Tanh(),
                             init_weight=enc.mlp.dense.weight.detach().clone(),
                             init_bias=enc.mlp.dense.bias.detach().clone()))
    modules.extend(getattr(module, "extra_st_modules", lambda: [])())
    modules.append(Normalize())
    return modules


def prepare_output_dir(output_dir: str | Path, marker: str, overwrite: bool = False) -> Path:
    """Check that ``output_dir`` may be written: missing, empty, or an earlier export (it holds ``marker``) when
    ``overwrite`` is set. An export never mixes its files into an unrelated folder (a model folder, a run folder)
    and never replaces an earlier export unasked."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is a file; give a folder to export to")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not (output_dir / marker).is_file():
            raise FileExistsError(f"{output_dir} is not empty and holds no earlier export ({marker}): give a new or "
                                  "empty folder")
        if not overwrite:
            raise FileExistsError(f"{output_dir} holds an earlier export: pass --overwrite to replace it, or give "
                                  "another --output_dir")
    return output_dir


@contextmanager
def writing_folder(output_dir: Path):
    """Yield a hidden sibling of ``output_dir`` to write into; on success it replaces ``output_dir`` by renames,
    so the folder is always a whole export, old or new, never half of one (a kill or a full disk mid-export leaves
    the previous one). Every file gets the mode the umask allows (:func:`readable_as_umask`) before the rename. On
    failure the partial folder is removed and the error names ``output_dir``."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{tag}")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()
        yield tmp
        readable_as_umask(tmp)
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{tag}")
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        why = why_write_failed(err, output_dir)
        raise ArtifactError(f"could not write the export {output_dir}: {why}; nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Refuse to export a model with NaN / infinite weights (a diverged run): it would encode every text as NaN."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise DivergenceError(f"refusing to export {what}: {bad} non-finite value(s) in {name} (the run "
                                  "diverged); export a checkpoint from before the divergence")


def export(module: ModuleFamily, output_dir: str | Path, overwrite: bool = False, card: dict | None = None,
           format: str | None = None) -> Path:
    """The one export entry point, used by ``train.py export`` and by ``callbacks.ExportOnFitEnd``: the module's
    family writes its export (:meth:`~lightning_modules.family.ModuleFamily.write_export`: a sentence encoder a
    sentence-transformers folder (:func:`export_sentence_transformer`), an SAE an SAE folder in ``format``
    (:func:`export_sae`)), its README.md written from ``card`` (run facts, or an SAE's figures). It only writes:
    a caller that scores the export puts the scores on its card afterwards. ``format`` is checked by
    :func:`export_format`."""
    return module.write_export(output_dir, overwrite=overwrite, format=format, card=card)


#: The folders an SAE exports to: sparsify's layout (the default) or SAELens' (``saelens_format``).
SAE_FORMATS = ("sparsify", "saelens")


def export_format(module: ModuleFamily | None, format: str | None, option: str = "format") -> str | None:
    """The format ``module`` exports to: ``format`` (one of its family's ``export_formats``) or, when None, its
    default (the first of them, else its ``export_type``). ``option`` names the setting in the errors (``--format``
    for ``train.py export``); ``module`` None checks the name alone (before a checkpoint is loaded) and returns it.

    Raises:
        DataError: an unknown format, or a format for a module whose family has none.
    """
    if format is not None and format not in SAE_FORMATS:
        raise DataError(f"{option} {format!r} is not an export format: {' or '.join(SAE_FORMATS)} (SAEs only)")
    if module is None:
        return format
    formats = type(module).export_formats
    if not formats:
        if format is not None:
            raise DataError(f"{option} {format}: only SAEs have export formats; {type(module).__name__} exports as a "
                            f"{module.export_type} folder (drop {option})")
        return module.export_type
    return format or formats[0]


def export_sentence_transformer(module: nn.Module, output_dir: str | Path, overwrite: bool = False,
                                run_facts: dict | None = None) -> Path:
    """Write ``module`` (an ``EmbeddingModule``) as a sentence-transformers folder and return its path
    (``overwrite``: replace an earlier export there). Its README.md is the model card of
    :mod:`lightning_modules.model_card`, from the module and ``run_facts`` (scores the caller measured are in them;
    nothing is measured here)."""
    # imported when used: sentence-transformers takes ~3 s to import; only this path needs it
    from sentence_transformers import SentenceTransformer

    output_dir = prepare_output_dir(output_dir, "modules.json", overwrite)
    check_finite_weights(module, type(module).__name__)
    enc = module.encoder
    model = enc.model
    with eval_mode(model), writing_folder(output_dir) as tmp:
        model.save_pretrained(tmp)
        enc.tokenizer.save_pretrained(tmp)
        with pooler_report_filtered():  # the folder holds no pooler, on purpose (load_pretrained)
            st = SentenceTransformer(modules=sentence_transformer_modules(module, tmp), device="cpu")
        st.save(str(tmp))
        write_model_card(tmp, module, run_facts, output_dir)
    return output_dir


# ------------------------------------------------------------------------------------------ sparse autoencoders
#: Each latent's log10 firing frequency, kept beside an export's weights (SAELens' file name and layout).
SPARSITY_FILE = "sparsity.safetensors"


def export_sae(module_or_sae, output_dir: str | Path, overwrite: bool = False, format: str = "sparsify",
               metrics: dict | None = None) -> Path:
    """Write an ``SAEModule`` or a ``BatchTopKSAE`` as a folder of ``format``, with a generated README.md
    (:func:`lightning_modules.sae_card.sae_card`; ``metrics``: the run's figures in ``sae_metrics.json``'s names).

    - ``sparsify``: ``cfg.json`` + ``sae.safetensors`` (sparsify's layout: ``encoder.weight`` (F, d),
      ``encoder.bias``, ``W_dec`` (F, d), ``b_dec``); EleutherAI sparsify opens it as a per-row TopK SAE.
    - ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``, a JumpReLU SAE with the global threshold
      (:mod:`lightning_modules.saelens_format`); SAELens' codes are this SAE's inference codes. Refused (DataError)
      while the SAE has no threshold.

    The input scale is folded into the biases and the threshold (see ``fold_input_scale``), so the exported SAE
    takes raw activations. The inference threshold (input units), the full BatchTopK config, the folded scale and
    what the SAE reads are in ``cfg.json`` (SAELens: under ``metadata``); the training-only dead-latent counters stay
    in the Lightning checkpoint. Both layouts carry ``sparsity.safetensors`` (SAELens' file: ``sparsity``, the (F,)
    ``log10`` firing frequency of the last validation, read by SAELens' and Neuronpedia's loaders) when the SAE's
    density was measured (``sae.log10_density``).
    """

    sae = getattr(module_or_sae, "sae", module_or_sae)
    if not isinstance(sae, BatchTopKSAE):
        raise TypeError(f"export_sae needs an SAEModule or a BatchTopKSAE, got {type(module_or_sae).__name__}")
    if format not in SAE_FORMATS:
        raise DataError(f"format {format!r} is not an SAE export format: {' or '.join(SAE_FORMATS)}")
    output_dir = prepare_output_dir(output_dir, "cfg.json", overwrite)
    check_finite_weights(sae, "the SAE")
    scale = float(sae.input_scale)
    folded = fold_input_scale(copy.deepcopy(sae).cpu().float())
    cfg = sae.cfg
    ours = {
        "architecture": "batch_topk",
        "threshold": float(folded.threshold),
        "input_scale_folded": scale,
        "training_steps": int(sae.steps),
        "batch_topk": {**cfg.to_dict(), "matryoshka_widths": cfg.widths},  # sizes, fractions resolved
        "activations": sae.activations,
    }
    if format == "saelens":
        tensors, meta = saelens_files(folded, ours)
        weights_file = SAELENS_WEIGHTS
    else:
        tensors = {"encoder.weight": folded.W_enc, "encoder.bias": folded.b_enc, "W_dec": folded.W_dec,
                   "b_dec": folded.b_dec}
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        meta = {
            "activation": "topk", "expansion_factor": cfg.expansion_factor, "normalize_decoder": True,
            "num_latents": sae.num_latents, "k": cfg.k, "multi_topk": False, "skip_connection": False,
            "transcode": False, "d_in": cfg.d_in, **ours,
        }
        weights_file = "sae.safetensors"
    density = sae.log10_density
    with writing_folder(output_dir) as tmp:
        save_file(tensors, str(tmp / weights_file))
        if density is not None:  # SAELens' name and layout: {"sparsity": (F,) log10 firing frequency}
            save_file({"sparsity": density.detach().float().cpu().contiguous()}, str(tmp / SPARSITY_FILE))
        (tmp / "cfg.json").write_text(json.dumps(meta, indent=1))
        (tmp / "README.md").write_text(sae_card(sae, format, output_dir, metrics))
    return output_dir


def load_sae(path: str | Path, device: str | torch.device = "cpu"):
    """A ``BatchTopKSAE`` (eval mode: codes by threshold) from a folder written by :func:`export_sae`, in either
    format.

    Folders written by sparsify (no ``batch_topk`` entry) load as BatchTopK SAEs with their k and no threshold;
    SAELens JumpReLU folders whose thresholds are one value (SAELens' own BatchTopK saves) with that threshold.
    """

    path = Path(path)
    weights = sae_weights_file(path)
    if weights is None:
        missing = "cfg.json" if not (path / "cfg.json").is_file() else "sae.safetensors"
        raise FileNotFoundError(f"{path / missing} not found: not an SAE folder written by export_sae")
    saelens = weights.name == SAELENS_WEIGHTS
    meta = json.loads((path / "cfg.json").read_text())
    tensors = load_file(str(weights))
    if saelens:
        cfg, tensors, meta = from_saelens(meta, tensors, str(path))
    elif "batch_topk" in meta:
        cfg = BatchTopKConfig.from_dict({**meta["batch_topk"], "normalize_input": False})
    else:
        cfg = BatchTopKConfig(d_in=meta["d_in"], num_latents=meta.get("num_latents") or 0,
                              expansion_factor=meta.get("expansion_factor", 8), k=meta["k"], normalize_input=False)
    sae = BatchTopKSAE(cfg)
    expected = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if set(tensors) != expected:
        raise ValueError(f"{weights}: tensors {sorted(tensors)}, expected {sorted(expected)}")
    with torch.no_grad():
        for name, param in (("encoder.weight", sae.W_enc), ("encoder.bias", sae.b_enc), ("W_dec", sae.W_dec),
                            ("b_dec", sae.b_dec)):
            if tensors[name].shape != param.shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"cfg.json implies {tuple(param.shape)}")
            param.copy_(tensors[name])
        sae.threshold.fill_(meta.get("threshold", -1.0))
        sae.steps.fill_(meta.get("training_steps", 0))
        sae.initialized.fill_(True)
    sae.activations = meta.get("activations")
    if (path / SPARSITY_FILE).is_file():
        density = load_file(str(path / SPARSITY_FILE)).get("sparsity")
        if density is None or density.shape != (sae.num_latents,):
            raise ValueError(f"{path / SPARSITY_FILE}: expected a tensor 'sparsity' of shape ({sae.num_latents},)")
        sae.log10_density = density
    return sae.to(device).eval()


def load_any_sae(path: str | Path):
    """An SAE in eval mode from an exported folder (``cfg.json`` + ``sae.safetensors``) or an ``SAEModule``
    checkpoint (``.ckpt``, or a zip archive by any name: :func:`~lightning_modules.loading.is_checkpoint_file`)."""

    path = Path(path)
    if is_checkpoint_file(path):
        module = load_module(path)
        if getattr(module, "export_type", None) != SAE:
            raise DataError(f"{path} is a {type(module).__name__} checkpoint, not an SAEModule one")
        return module.sae.eval()
    if sae_weights_file(path) is None:
        raise DataError(f"{path}: neither an SAE checkpoint (.ckpt) nor an exported SAE folder (cfg.json + "
                        "sae.safetensors, or SAELens' sae_weights.safetensors)")
    return load_sae(path).eval()
