"""PS-Eval (Minegishi et al., ICLR 2025, arXiv 2501.06254): does an SAE give a polysemous word's senses different
features? (docs/methods.md 5b)

For each WiC pair the target word's token in each context is encoded by the SAE of a layer; the feature with the
largest activation is the word's "feature" in that context, and the same feature in both contexts predicts "same
sense". Scored against WiC's gold with T (same sense) as the positive class; specificity = TN / (TN + FP) is the
paper's headline number (an SAE that gives every occurrence of a word one feature has recall 1 and specificity 0).

Pairs are kept only when the target word is ONE token in both contexts (contexts split on whitespace, tokenised with
``is_split_into_words=True``), then T and F are balanced by subsampling the larger class with a seed. A context whose
code is all zero has no feature: its pair is predicted "different" and counted in ``no_feature_pairs``. The encoder
runs once per batch of contexts for all layers together (``output_hidden_states``), never once per pair.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.errors import DataError
from core.hub import load_pretrained
from core.tensors import eval_mode, pad_ids
from datamodules.activation_builder import check_layer
from datamodules.wic import WiCPair, target_tokens
from lightning_modules.components.sparse_coder import SparseCoder, input_dim


@dataclass
class Confusion:
    """Counts with T (same sense) as the positive class."""

    tp: int
    fp: int
    tn: int
    fn: int

    def metrics(self) -> dict[str, float]:
        """precision, recall, F1, accuracy, specificity = TN / (TN + FP); a ratio with a zero denominator is 0."""
        def ratio(a: int, b: int) -> float:
            return a / b if b else 0.0

        precision, recall = ratio(self.tp, self.tp + self.fp), ratio(self.tp, self.tp + self.fn)
        return {
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall),
            "accuracy": ratio(self.tp + self.tn, self.tp + self.fp + self.tn + self.fn),
            "specificity": ratio(self.tn, self.tn + self.fp),
        }


def confusion(pred_same: Sequence[bool], gold: Sequence[bool]) -> Confusion:
    """Confusion matrix of predictions against gold labels (both: True = same sense)."""
    if len(pred_same) != len(gold):
        raise ValueError(f"{len(pred_same)} predictions but {len(gold)} gold labels")
    pairs = list(zip(map(bool, pred_same), map(bool, gold)))
    return Confusion(tp=pairs.count((True, True)), fp=pairs.count((True, False)),
                     tn=pairs.count((False, False)), fn=pairs.count((False, True)))


@dataclass
class PSEvalResult:
    """PS-Eval of one layer's SAE. Pair counts are shared by all layers of one run."""

    layer: int
    confusion: Confusion
    precision: float
    recall: float
    f1: float
    accuracy: float
    specificity: float
    no_feature_contexts: int
    """Contexts whose code was all zero (no feature)."""
    no_feature_pairs: int
    """Pairs with at least one such context: predicted "different"."""
    counts: dict[str, int]
    """``pairs`` loaded, dropped as ``multi_token`` or ``truncated``, ``single_token`` kept (``single_token_true`` /
    ``single_token_false``), and ``balanced`` (``balanced_true`` = ``balanced_false``)."""

    def to_dict(self, prefix: str = "pseval") -> dict[str, float]:
        """Flat metrics named ``<prefix>/layer<L>/<name>``, confusion counts and pair counts included."""
        flat = {**dataclasses.asdict(self.confusion), "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "accuracy": self.accuracy, "specificity": self.specificity,
                "no_feature_contexts": self.no_feature_contexts, "no_feature_pairs": self.no_feature_pairs,
                **self.counts}
        return {f"{prefix}/layer{self.layer}/{k}": v for k, v in flat.items()}


# --------------------------------------------------------------------------------------------- pair selection
def single_token_pairs(pairs: Sequence[WiCPair], tokenizer, max_length: int = 128
                       ) -> tuple[list[WiCPair], list[tuple[int, int]], dict[str, int]]:
    """The pairs whose target word is exactly one token in both contexts, its token position in each, and counts
    (``pairs``, ``multi_token``, ``truncated`` = the target lies beyond ``max_length`` in a context)."""
    contexts = [w for p in pairs for w in (p.words1, p.words2)]
    indices = [i for p in pairs for i in (p.idx1, p.idx2)]
    _, positions = target_tokens(tokenizer, contexts, indices, max_length)
    kept, where, multi, truncated = [], [], 0, 0
    for n, pair in enumerate(pairs):
        pos1, pos2 = positions[2 * n], positions[2 * n + 1]
        if not pos1 or not pos2:
            truncated += 1
        elif len(pos1) > 1 or len(pos2) > 1:
            multi += 1
        else:
            kept.append(pair), where.append((pos1[0], pos2[0]))
    return kept, where, {"pairs": len(pairs), "multi_token": multi, "truncated": truncated, "single_token": len(kept)}


def balance(gold: Sequence[bool], seed: int = 0) -> list[int]:
    """Indices (ascending) keeping every item of the smaller class and an equal, seeded random sample of the other."""
    true = [i for i, g in enumerate(gold) if g]
    false = [i for i, g in enumerate(gold) if not g]
    n = min(len(true), len(false))
    rng = random.Random(seed)
    return sorted(rng.sample(true, n) + rng.sample(false, n))


# ---------------------------------------------------------------------------------------------- the maths
def top_features(codes_BF: Tensor) -> Tensor:
    """(B,) index of each row's largest code (the lowest index on ties), -1 where the row is all zero."""
    top_B = codes_BF.argmax(dim=-1)
    return torch.where((codes_BF > 0).any(dim=-1), top_B, torch.full_like(top_B, -1))


@torch.no_grad()
def sae_top_features(sae: SparseCoder, x_ND: Tensor, batch_size: int = 1024) -> Tensor:
    """(N,) top feature (or -1) of each vector under ``sae.encode`` in eval mode (the inference threshold)."""
    with eval_mode(sae):
        parts = [top_features(sae.encode(x_ND[i : i + batch_size].to(sae.W_dec))).cpu()
                 for i in range(0, len(x_ND), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def score_layer(layer: int, sae: SparseCoder, h1_ND: Tensor, h2_ND: Tensor, gold: Sequence[bool],
                counts: Mapping[str, int] | None = None) -> PSEvalResult:
    """PS-Eval of one SAE from the target tokens' vectors in context 1 (``h1_ND``) and context 2 (``h2_ND``)."""
    if h1_ND.shape[-1] != input_dim(sae):
        raise ValueError(f"layer {layer}: hidden states have {h1_ND.shape[-1]} dims but the SAE expects "
                         f"d_in = {input_dim(sae)}: is it the SAE of another model?")
    f1_N, f2_N = sae_top_features(sae, h1_ND), sae_top_features(sae, h2_ND)
    none1_N, none2_N = f1_N < 0, f2_N < 0
    pred_same = ((f1_N == f2_N) & ~none1_N).tolist()
    cm = confusion(pred_same, gold)
    return PSEvalResult(layer, cm, **cm.metrics(), no_feature_contexts=int(none1_N.sum() + none2_N.sum()),
                        no_feature_pairs=int((none1_N | none2_N).sum()), counts=dict(counts or {}))


@torch.inference_mode()
def target_hidden_states(model, tokenizer, contexts: Sequence[Sequence[str]], positions: Sequence[int],
                         layers: Sequence[int], batch_size: int = 64, max_length: int = 128) -> dict[int, Tensor]:
    """``{layer: (N, D)}`` float32 CPU: ``hidden_states[layer]`` of each pre-split context at token ``positions[i]``,
    from length-sorted batches (one forward pass per batch for all layers)."""
    ids = tokenizer([list(c) for c in contexts], is_split_into_words=True, truncation=True,
                    max_length=max_length)["input_ids"]
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = {layer: torch.empty(len(ids), model.config.hidden_size) for layer in layers}
    pad = tokenizer.pad_token_id or 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids_BL, mask_BL = pad_ids([ids[r] for r in rows], pad)
            hidden = model(input_ids=ids_BL.to(device), attention_mask=mask_BL.long().to(device),
                           output_hidden_states=True).hidden_states
            pos_B = torch.as_tensor([positions[r] for r in rows], device=device)
            b_B = torch.arange(len(rows), device=device)
            for layer in layers:
                out[layer][rows] = hidden[layer][b_B, pos_B].float().cpu()
    return out


def ps_eval(encoder, saes: Mapping[int, SparseCoder], pairs: Sequence[WiCPair], seed: int = 0, batch_size: int = 64,
            max_length: int = 128, text_prefix: str = "") -> dict[int, PSEvalResult]:
    """PS-Eval of each layer's SAE on the same filtered, balanced WiC pairs.

    Args:
        encoder: an :class:`~lightning_modules.components.encoder.Encoder`, a ``(model, tokenizer)`` pair, or a
            model name / folder (``sentence-transformers/all-MiniLM-L6-v2`` loads offline when installed).
        saes: ``{layer: SparseCoder}``; ``layer`` indexes ``hidden_states`` (0 = embeddings output, -1 = last).
        pairs: WiC pairs (:func:`datamodules.wic.load_wic`).
        seed: seed of the class balancing.
        batch_size: contexts per encoder forward pass.
        max_length: tokens kept per context; a pair whose target is truncated away is dropped (counted).
        text_prefix: put before every context, as the SAE's activation cache put it before every sentence (e5's
            ``"query: "``), so the SAE reads hidden states of the kind it was trained on.

    Returns:
        ``{layer: PSEvalResult}`` with the layers as given.
    """
    model, tokenizer = model_and_tokenizer(encoder)
    if text_prefix.strip():
        n = len(text_prefix.split())
        pairs = [p._replace(context1=f"{text_prefix.strip()} {p.context1}", idx1=p.idx1 + n,
                            context2=f"{text_prefix.strip()} {p.context2}", idx2=p.idx2 + n) for p in pairs]
    n_layers = model.config.num_hidden_layers
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    index = {layer: check_layer(layer, n_layers, name) for layer in saes}
    if len(set(index.values())) < len(index):
        raise DataError(f"PS-Eval: the SAEs' layers {sorted(saes)} name the same hidden_states entry twice "
                        f"({name} has {n_layers} layers, so -1 is {n_layers}): one SAE per layer")
    kept, where, counts = single_token_pairs(pairs, tokenizer, max_length)
    gold = [p.gold for p in kept]
    counts |= {"single_token_true": sum(gold), "single_token_false": len(gold) - sum(gold)}
    chosen = balance(gold, seed)
    counts |= {"balanced": len(chosen), "balanced_true": len(chosen) // 2, "balanced_false": len(chosen) // 2}
    if not chosen:
        raise DataError(f"PS-Eval: no pairs left after the single-token filter and balancing ({counts})")
    contexts = [w for i in chosen for w in (kept[i].words1, kept[i].words2)]
    positions = [p for i in chosen for p in where[i]]
    hidden = target_hidden_states(model, tokenizer, contexts, positions, sorted(set(index.values())), batch_size,
                                  max_length)
    gold = [gold[i] for i in chosen]
    return {layer: score_layer(layer, sae, hidden[index[layer]][0::2], hidden[index[layer]][1::2], gold, counts)
            for layer, sae in saes.items()}


def model_and_tokenizer(encoder):
    if isinstance(encoder, str):
        return load_pretrained(encoder)
    if isinstance(encoder, tuple):
        return encoder
    return encoder.model, encoder.tokenizer
