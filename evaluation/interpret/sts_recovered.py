"""STS recovered: what an SAE costs the similarity the encoder exists for (SAELens' ``ce_loss_score`` for a sentence
encoder; docs/methods.md 5f).

Token-level SAE of layer L: the encoder runs on the STS sentences three times, pooling its last layer as the model
does (its sentence-transformers ``Pooling`` module; mean when it has none), and each run is scored as
``train.py evaluate`` scores a model (cosine, Spearman x 100, :func:`evaluation.evaluate.score_tasks`):

- ``clean``: untouched;
- ``spliced``: layer L's hidden states replaced by the SAE's reconstruction (inference threshold), then the forward
  pass continues;
- ``ablated``: those same states set to zero.

``sts_recovered = (spliced - ablated) / (clean - ablated)``: 1 when the SAE loses nothing of the STS ranking, 0
when it is no better than deleting the layer's states. Zero-ablation, not mean-ablation: it is SAELens' baseline,
it needs no statistic of some other corpus, and an SAE whose weights are all zero gives exactly the ablated score.

The positions replaced are those the SAE was trained on (its cache's ``special_tokens``): every real token for a
``keep`` SAE; for a ``drop`` SAE the word tokens only ([CLS], [SEP] and the text prefix keep their clean states,
which it never saw). Padding is never touched. When the ablated embeddings are all the same vector (a ``keep`` SAE:
every position zeroed, so every sentence gets one embedding), their cosines are constant up to rounding and carry
no ranking: the ablated score is taken as 0 and ``ablated_constant`` says so (the same for any run whose
embeddings are one vector: ``spliced_constant``).

Sentence-level SAE: the sentence vectors its cache holds (layer, pooling, normalisation) are computed on the STS
sentences (:class:`~datamodules.activation_builder.CacheBuilder`, the cache's own code); ``clean`` scores them,
``spliced`` their reconstructions, ``ablated`` is 0 (a zero vector has no direction), so recovered =
spliced / clean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from core.errors import DataError
from core.hub import load_pretrained, resolve_model
from core.tensors import eval_mode, masked_mean
from datamodules.activation_builder import CacheBuilder, Corpus, check_layer
from evaluation.evaluate import load_tasks, score_tasks
from lightning_modules.components.sparse_coder import SparseCoder
from lightning_modules.sae import activations_of

#: Relative spread of the ablated embeddings under which they count as one vector (rounding of a mean of equal rows).
CONSTANT_RTOL = 1e-5


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    """The submodule whose output is ``hidden_states[layer]``: the embeddings for 0, else the layer-th block of the
    model's list of ``num_hidden_layers`` blocks. :class:`Splicer` checks it against ``output_hidden_states``."""
    if layer == 0:
        found = getattr(model, "embeddings", None)
        if found is None:
            raise DataError(f"{type(model).__name__}: no `embeddings` submodule to splice layer 0 into")
        return found
    n = model.config.num_hidden_layers
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not blocks:
        raise DataError(f"{type(model).__name__}: no list of its {n} layers found to splice into")
    return blocks[0][layer - 1]


@contextmanager
def spliced(module: nn.Module, replace: Callable[[Tensor], Tensor], where_BL: Callable[[], Tensor]):
    """While inside, ``module``'s output states become ``replace(states)`` at the positions ``where_BL()`` marks
    (a (B, L) bool, read at each call) and stay as they were elsewhere; the hook is removed on the way out."""

    def hook(_module, _args, output):
        h_BLD = output[0] if isinstance(output, tuple) else output
        new_BLD = torch.where(where_BL()[..., None], replace(h_BLD).to(h_BLD.dtype), h_BLD)
        return (new_BLD, *output[1:]) if isinstance(output, tuple) else new_BLD

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_pooling(model_name_or_path: str) -> str:
    """``cls`` or ``mean``: the sentence-transformers ``Pooling`` module of the model's folder (mean without one)."""
    folder = Path(resolve_model(model_name_or_path))
    modules = folder / "modules.json"
    if not modules.is_file():
        return "mean"
    for entry in json.loads(modules.read_text()):
        if entry.get("type", "").endswith("Pooling"):
            cfg = json.loads((folder / entry.get("path", "") / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                return "cls"
            if not cfg.get("pooling_mode_mean_tokens", True):
                raise DataError(f"{folder}: its pooling ({cfg}) is neither mean nor CLS; STS recovered pools only "
                                "those")
    return "mean"


class Splicer:
    """Sentence embeddings of the model with layer ``layer`` replaced at the positions an SAE reads.

    Args:
        builder: a token-level :class:`CacheBuilder` with its model loaded (tokenisation, length-sorted batches and
            the special/prefix flags are the cache's own).
        pooling: ``mean`` (all real tokens) or ``cls``, over the last layer.
    """

    def __init__(self, builder: CacheBuilder, pooling: str) -> None:
        self.builder, self.pooling = builder, pooling
        self.module = layer_module(builder.model, builder.layers[0])
        self._where_BL: Tensor | None = None
        self._checked = False

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], replace: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """(N, D) float64 embeddings of ``texts`` (in order), spliced with ``replace`` (None: the clean model)."""
        b = self.builder
        corpus = Corpus(list(texts))
        tk = b.tokenize(corpus, range(len(texts)))
        out_ND = torch.empty(len(texts), b.model.config.hidden_size, dtype=torch.float64)
        for rows, ids_BL, mask_BL in b.padded_batches(tk["input_ids"]):
            ids_BL, mask_BL = ids_BL.to(b.device), mask_BL.to(b.device)
            where_BL = mask_BL.bool()
            if b.special_tokens == "drop":
                special_BL = torch.zeros_like(where_BL)
                for i, r in enumerate(rows):
                    special_BL[i, : len(tk["special"][r])] = torch.as_tensor(tk["special"][r], dtype=torch.bool)
                where_BL &= ~special_BL
            self._where_BL = where_BL
            if not self._checked:
                self._check_module(ids_BL, mask_BL)
            if replace is None:
                last_BLD = b.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
            else:
                with spliced(self.module, replace, lambda: self._where_BL):
                    last_BLD = b.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
            z_BD = masked_mean(last_BLD.float(), mask_BL) if self.pooling == "mean" else last_BLD[:, 0].float()
            out_ND[rows] = z_BD.double().cpu()
        return out_ND

    def _check_module(self, ids_BL: Tensor, mask_BL: Tensor) -> None:
        """The hooked module's output must be ``hidden_states[layer]``, else the splice would replace other states."""
        seen = []
        with spliced(self.module, lambda h: seen.append(h.clone()) or h, lambda: self._where_BL):
            out = self.builder.model(input_ids=ids_BL, attention_mask=mask_BL, output_hidden_states=True)
        if not seen or not torch.equal(seen[0], out.hidden_states[self.builder.layers[0]]):
            raise DataError(f"{type(self.builder.model).__name__}: the output of {type(self.module).__name__} is not "
                            f"hidden_states[{self.builder.layers[0]}]; STS recovered cannot splice this architecture")
        self._checked = True


def reconstruct(sae: SparseCoder) -> Callable[[Tensor], Tensor]:
    """``x -> sae.decode(sae.encode(x))`` over the last dimension, in the SAE's dtype (eval mode: the threshold)."""
    param = sae.W_dec

    @torch.no_grad()
    def replace(h_BLD: Tensor) -> Tensor:
        x_ND = h_BLD.reshape(-1, h_BLD.shape[-1]).to(param)
        return sae.decode(sae.encode(x_ND)).reshape(h_BLD.shape)

    return replace


class _Fixed:
    """An :class:`~evaluation.evaluate.Embedder` of embeddings computed beforehand."""

    def __init__(self, name: str, texts: Sequence[str], z_ND: Tensor) -> None:
        self.name, self._index, self._z = name, {t: i for i, t in enumerate(texts)}, z_ND

    def encode(self, sentences: list[str]) -> Tensor:
        return self._z[[self._index[s] for s in sentences]]


def is_constant(z_ND: Tensor) -> bool:
    """Whether all rows are one vector up to rounding (:data:`CONSTANT_RTOL` of its norm)."""
    z_ND = z_ND.double()
    spread = (z_ND - z_ND[:1]).norm(dim=-1).max()
    return bool(spread <= CONSTANT_RTOL * z_ND[0].norm().clamp_min(1e-30))


def sts_recovered(sae: SparseCoder, tasks: Sequence[str], data_root: str | None, *, model: str | None = None,
                  batch_size: int = 64, max_length: int = 128, text: str = "senteval",
                  loaded: tuple | None = None, reads: dict | None = None, memo: dict | None = None
                  ) -> dict[str, dict]:
    """Clean, spliced and ablated STS of ``sae`` on each task (test split, as ``train.py evaluate`` reads them).

    Args:
        sae: the SAE; its ``activations``, when it has them (the BatchTopK SAE does), say what it reads
            (model, layer, level, special tokens, text prefix; the cache's identity, kept in checkpoints and exports).
        tasks: STS task names (``stsb``, ``sickr``, ...). data_root: where their files are (None: the hub copies).
        model: the encoder (default: the one the SAE's cache names).
        batch_size, max_length: sentences per forward pass; tokens per sentence.
        text: the STS text form (:data:`datamodules.sts.TEXT_FORMS`).
        loaded: ``(model, tokenizer)`` already loaded (tests).
        reads: what the SAE reads when ``sae.activations`` does not say (an activation cache's identity).
        memo: a dict that keeps the clean and ablated embeddings between calls (a sweep of SAEs of one layer
            encodes them once; only the spliced run is per SAE).

    Returns:
        ``{task: {"clean", "spliced", "ablated", "recovered", "ablated_constant", "spliced_constant",
        "n_pairs"}}``, scores x 100.
    """
    acts = getattr(sae, "activations", None) or reads or {}
    if not acts.get("level") or acts.get("layer") is None or not (model or acts.get("model")):
        raise DataError("STS recovered needs to know what the SAE reads (model, layer, level): it was trained "
                        "outside an activation cache, or exported before that was recorded")
    model = model or acts["model"]
    hf_model, tokenizer = loaded if loaded is not None else load_pretrained(model)
    device = sae.W_dec.device
    layer = check_layer(int(acts["layer"]), hf_model.config.num_hidden_layers, model)
    level = acts["level"]
    builder = CacheBuilder(model, level, layer, acts.get("pooling") or "mean", bool(acts.get("normalize")),
                           acts.get("special_tokens") or "keep", max_length, acts.get("text_prefix") or "",
                           batch_size, str(device), "float32")
    builder.model, builder.tokenizer = hf_model.eval().to(device), tokenizer
    data = load_tasks(list(tasks), data_root, text)
    texts = sorted({s for subsets in data.values() for p in subsets for s in (*p.sentences1, *p.sentences2)})
    key = (model, layer, level, builder.special_tokens, builder.text_prefix, builder.pooling, builder.normalize,
           max_length, text, tuple(tasks), data_root)
    memo = {} if memo is None else memo
    with eval_mode(sae):
        if level == "sentence":
            if key not in memo:
                memo[key] = {"clean": torch.as_tensor(builder.encode_chunk(Corpus(texts), range(len(texts)))[0])}
            clean = memo[key]["clean"]
            runs = {"clean": clean.double(), "spliced": reconstruct(sae)(clean.to(device)).double().cpu()}
        else:
            splicer = Splicer(builder, model_pooling(model))
            if key not in memo:
                memo[key] = {"clean": splicer.embed(texts), "ablated": splicer.embed(texts, torch.zeros_like)}
            runs = {**memo[key], "spliced": splicer.embed(texts, reconstruct(sae))}
    constant = {name: is_constant(z) for name, z in runs.items()}  # no ranking: scored 0, never a rounding draw
    scores = {name: score_tasks(_Fixed(name, texts, z), data)[0] for name, z in runs.items() if not constant[name]}
    out = {}
    for task in data:
        clean, spliced_, ablated = (scores[name][task].all if name in scores else 0.0
                                    for name in ("clean", "spliced", "ablated"))
        gap = clean - ablated
        out[task] = {"clean": clean, "spliced": spliced_, "ablated": ablated,
                     "recovered": (spliced_ - ablated) / gap if gap != 0 else float("nan"),
                     "ablated_constant": constant.get("ablated", True), "spliced_constant": constant["spliced"],
                     "n_pairs": sum(len(p) for p in data[task])}
    return out


def recovered_metrics(result: dict[str, dict], prefix: str = "") -> dict[str, float]:
    """Flat figures: ``<prefix>sts_recovered/<task>`` and ``<prefix>sts/<task>/{clean,spliced,ablated}``."""
    flat = {}
    for task, r in result.items():
        flat[f"{prefix}sts_recovered/{task}"] = r["recovered"]
        flat.update({f"{prefix}sts/{task}/{k}": r[k] for k in ("clean", "spliced", "ablated")})
    return flat


class SweepSTS:
    """STS recovered (on the first of ``tasks``) of each SAE of a sweep over one activation cache (``meta``: its
    ``meta.json``): the encoder is loaded once, and the clean and ablated runs are encoded once for all of them.
    Called with an SAE: ``{"sts_recovered", "sts_spliced"}`` (nothing when ``tasks`` is empty)."""

    def __init__(self, tasks: Sequence[str], data_root: str | None, meta: dict, max_length: int = 128) -> None:
        self.tasks, self.root, self.max_length = list(tasks), data_root, max_length
        self.reads, self.memo, self.last = activations_of(meta), {}, None
        self.loaded = load_pretrained(meta["model"]) if self.tasks else None

    def __call__(self, sae: SparseCoder) -> dict:
        if not self.tasks:
            return {}
        self.last = sts_recovered(sae, self.tasks[:1], self.root, loaded=self.loaded, reads=self.reads,
                                  memo=self.memo, max_length=self.max_length)[self.tasks[0]]
        return {"sts_recovered": self.last["recovered"], "sts_spliced": self.last["spliced"]}

    def baseline(self) -> dict | None:
        """The task and its clean and ablated scores (None before the first SAE)."""
        return None if self.last is None else {"task": self.tasks[0], "clean": self.last["clean"],
                                               "ablated": self.last["ablated"],
                                               "ablated_constant": self.last["ablated_constant"]}

    @property
    def name(self) -> str:
        """The task as a chart names it (a TSV file by its stem)."""
        return task_name(self.tasks[0] if self.tasks else "")

    def lines(self) -> list[str]:
        """The report's sentence on how it was measured."""
        return baseline_lines(self.baseline())


def task_name(task: str) -> str:
    """An STS task as a chart names it (a TSV file by its stem)."""
    return Path(task).stem if task.endswith((".tsv", ".csv", ".txt")) else task


def baseline_lines(b: dict | None) -> list[str]:
    """The report's sentence on how STS recovered was measured, from :meth:`SweepSTS.baseline` (none for None)."""
    return [] if b is None else [
        f"STS recovered: {b['task']} test Spearman x 100 with each SAE's reconstruction spliced into the layer, "
        f"against the clean encoder ({b['clean']:.2f}) and the layer zero-ablated ({b['ablated']:.2f}"
        + ("; every position zeroed gives every sentence one embedding, which ranks nothing" if
           b["ablated_constant"] else "") + ")."]


__all__ = ["SweepSTS", "Splicer", "baseline_lines", "layer_module", "model_pooling", "reconstruct", "recovered_metrics",
           "spliced", "sts_recovered", "task_name"]
