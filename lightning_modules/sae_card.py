"""The README.md of an exported SAE: what it reads, its size and quality, and how to open it in each library.

Written by :func:`lightning_modules.export.export_sae` from the SAE and the figures of its run (every value comes
from them; nothing is typed by hand): ``callbacks.ExportOnFitEnd`` passes what ``sae_metrics.json`` holds, and
``train.py export`` what the checkpoint holds (:func:`checkpoint_metrics`).
"""

from __future__ import annotations

import os
from pathlib import Path

from core.hub import looks_like_hub_name
from lightning_modules.checkpoints import Checkpoint
from lightning_modules.components.batch_topk import BatchTopKSAE

#: The figures of the card: (label, metric name under ``val/sae/`` and ``sae/``).
QUALITY = (("FVU", "fvu"), ("explained variance", "explained_variance"), ("L0 (non-zero codes per vector)", "l0"),
           ("dead fraction", "dead_fraction"))
SOURCES = (("val/sae/", "held-out split, inference threshold"),
           ("sae/", "training batch at the exported step, batch top-k"))
NOT_MEASURED = "not measured"


def checkpoint_metrics(checkpoint: Checkpoint, sae: BatchTopKSAE) -> dict:
    """What a checkpoint (as ``read_checkpoint`` opened it) says about the SAE it holds, in ``sae_metrics.json``'s
    names: its step, the dead-latent count of its training counters, and the monitored ``sae/`` value of a
    ``ModelCheckpoint`` that kept this very file among its best (the only logged figure a checkpoint stores)."""
    ckpt_path = checkpoint.path
    metrics: dict = {"checkpoint": str(ckpt_path), "global_step": checkpoint.content.get("global_step")}
    for state in checkpoint.callback_states:
        if "sae/" not in str(state.get("monitor")):
            continue
        for path, score in (state.get("best_k_models") or {}).items():
            if os.path.realpath(path) == os.path.realpath(ckpt_path) and score is not None:
                metrics[state["monitor"]] = float(score)
    metrics.update(state_metrics(sae))
    return metrics


def state_metrics(sae: BatchTopKSAE) -> dict:
    """Figures read from the SAE's own buffers: dead latents (no firing in the last ``dead_after`` training
    vectors), the dictionary size, the inference threshold in input units (None before it is estimated)."""
    return {"dead_latents": int((sae.tokens_since_fired >= sae.cfg.dead_after).sum()),
            "num_latents": sae.num_latents,
            "threshold_input_units": float(sae.threshold * sae.input_scale) if sae.threshold >= 0 else None}


def _figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quality_rows(metrics: dict | None, sae: BatchTopKSAE) -> list[tuple[str, str, str]]:
    """(figure, value, where it was measured) for FVU, explained variance, L0 and dead fraction: the held-out value
    when the run measured one, else the training one, else "not measured"; and the dead-latent count."""
    metrics = metrics or {}
    rows = []
    for label, name in QUALITY:
        found = next(((_figure(metrics[p + name]), where) for p, where in SOURCES if metrics.get(p + name) is not None),
                     (NOT_MEASURED, ""))
        rows.append((label, *found))
    if metrics.get("dead_latents") is not None:
        rows.append(("dead latents", f"{metrics['dead_latents']} of {sae.num_latents}",
                     f"no firing in the last {sae.cfg.dead_after:,} training vectors"))
    else:
        rows.append(("dead latents", NOT_MEASURED, ""))
    return rows


def reads_rows(activations: dict | None) -> list[tuple[str, str]]:
    """(what, value) of the vectors the SAE reads, from the activation cache it was trained on."""
    if not activations:
        return [("vectors", "not recorded (trained outside an activation cache)")]
    level = activations.get("level")
    special = activations.get("special_tokens")
    rows = [("model", f"`{activations.get('model')}`"),
            ("layer", f"{activations.get('layer')} (`output_hidden_states` index; 0 = the embeddings output)"),
            ("level", {"token": "token (one vector per token)",
                       "sentence": "sentence (one pooled vector per text)"}.get(level, str(level)))]
    if level == "token":
        rows.append(("special tokens", {"drop": "dropped ([CLS], [SEP], padding and the text prefix's tokens are "
                                                "not in the training vectors)",
                                        "keep": "kept (every token, [CLS] and [SEP] included)"}.get(special,
                                                                                                     str(special))))
    prefix = activations.get("text_prefix")
    rows.append(("text prefix", f"`{prefix}` (put before every text)" if prefix else "none"))
    if activations.get("model_fingerprint"):
        rows.append(("model fingerprint", f"`{activations['model_fingerprint']}`"))
    return rows


def open_lines(format: str, folder: str) -> list[str]:
    """How to open a folder of ``format`` in sparsify, SAELens and this project."""
    ours = ["```python", "from lightning_modules.export import load_sae", "",
            f"sae = load_sae({folder!r})  # eval mode: codes by the global threshold", "codes = sae.encode(x)",
            "x_hat = sae.decode(codes)", "```"]
    if format == "saelens":
        return ["**SAELens** (`pip install sae-lens`): a JumpReLU SAE whose every threshold is the global BatchTopK "
                "threshold, so its codes are this SAE's inference codes.", "",
                "```python", "from sae_lens import SAE", "", f"sae = SAE.load_from_disk({folder!r})",
                "codes = sae.encode(x)", "x_hat = sae.decode(codes)", "```", "",
                "**EleutherAI sparsify**: not this folder; export with `--format sparsify` (the default).", "",
                "**embedlab**:", "", *ours]
    return ["**EleutherAI sparsify** (`pip install eai-sparsify`): its layout; sparsify has no BatchTopK inference, "
            "so it encodes with a per-row top-k (k per vector) instead of the global threshold.", "",
            "```python", "from sparsify import SparseCoder", "", f"sae = SparseCoder.load_from_disk({folder!r})",
            "top = sae.encode(x)  # top.top_acts, top.top_indices", "x_hat = sae.decode(top.top_acts, "
            "top.top_indices)", "```", "",
            "**SAELens**: not this folder (SAELens' sparsify loader expects another decoder layout); export with "
            "`train.py export --format saelens` for a folder `sae_lens.SAE.load_from_disk` opens with the threshold.",
            "", "**embedlab**:", "", *ours]


def sae_front_matter(sae: BatchTopKSAE, format: str) -> str:
    """The card's YAML front matter (``huggingface_hub.ModelCardData``): ``library_name: saelens`` for the SAELens
    layout (as SAELens writes it; the sparsify layout names no library, the Hub has none for it, and is tagged
    ``sparsify``), tags, the base model when it is a hub name, and what the SAE reads: ``layer`` (the
    ``output_hidden_states`` index), ``hook_point`` (``hidden_states.<layer>``, SAELens' ``hook_name``), ``level``."""
    from huggingface_hub import ModelCardData

    acts = sae.activations or {}
    model, layer = acts.get("model"), acts.get("layer")
    card = ModelCardData(
        library_name="saelens" if format == "saelens" else None,
        tags=["sparse-autoencoder", "sae", "batch-topk", "embedlab", "saelens" if format == "saelens" else "sparsify"],
        base_model=model if isinstance(model, str) and looks_like_hub_name(model) and not Path(model).exists()
        else None,
        layer=layer, hook_point=None if layer is None else f"hidden_states.{layer}", level=acts.get("level"),
        d_in=sae.cfg.d_in, d_sae=sae.num_latents)
    return "---\n" + card.to_yaml() + "\n---"


def sts_lines(metrics: dict | None, level: str | None = "token") -> list[str]:
    """The card's STS-recovered section from ``sts_recovered/<task>`` and ``sts/<task>/*`` figures (none: a line
    saying it was not measured, and why when the run said); ``level``: what the SAE reads."""
    metrics = metrics or {}
    tasks = [k.removeprefix("sts_recovered/") for k in metrics if k.startswith("sts_recovered/")]
    head = ["## STS recovered", ""]
    if not tasks:
        why = metrics.get("sts_recovered_error")
        return [*head, f"{NOT_MEASURED.capitalize()}" + (f": {why}" if why else " (the run named no data root).")
                + " `train.py interpret --data_root ...` measures it.", ""]
    rows = [f"| {t} | {_figure(metrics[f'sts/{t}/clean'])} | {_figure(metrics[f'sts/{t}/spliced'])} | "
            f"{_figure(metrics[f'sts/{t}/ablated'])} | {_figure(metrics[f'sts_recovered/{t}'])} |" for t in tasks]
    how = ("the sentence vectors the SAE reads (clean) and their reconstructions (spliced); a zero vector ranks "
           "nothing (ablated: 0)" if level == "sentence" else
           "the encoder as is (clean), with the SAE's reconstruction in place of the layer's states (spliced) and "
           "with those states zeroed (ablated)")
    return [*head, f"Spearman x 100 of cosine on the test set of {how}; recovered = (spliced - ablated) / "
            "(clean - ablated).", "",
            "| task | clean | spliced | ablated | recovered |", "|---|---|---|---|---|", *rows, ""]


def sae_card(sae: BatchTopKSAE, format: str, folder: str | Path, metrics: dict | None = None) -> str:
    """The README.md text of the export of ``sae`` (its original, unfolded state) in ``format`` (sparsify or
    saelens) at ``folder``, with the run's ``metrics`` (``sae_metrics.json``'s names; None: "not measured")."""
    cfg, acts = sae.cfg, sae.activations or {}
    what = (f"{acts.get('level', '')} vectors of `{acts.get('model')}`, layer {acts.get('layer')}" if acts
            else "vectors of unrecorded origin")
    threshold = f"{float(sae.threshold * sae.input_scale):.6g}" if sae.threshold >= 0 else "none yet (not estimated)"
    files = ("`cfg.json` + `sae_weights.safetensors` (SAELens JumpReLU: `W_enc` (d, F), `b_enc`, `W_dec` (F, d), "
             "`b_dec`, `threshold` (F))" if format == "saelens" else
             "`cfg.json` + `sae.safetensors` (sparsify: `encoder.weight` (F, d), `encoder.bias`, `W_dec` (F, d), "
             "`b_dec`)")
    size = [("input dimension d", str(cfg.d_in)), ("latents F", str(sae.num_latents)),
            ("k (mean active latents per vector in training)", str(cfg.k)),
            ("inference threshold (input units)", threshold), ("training steps", str(int(sae.steps))),
            ("input scale (folded into the weights)", f"{float(sae.input_scale):.6g}")]
    if cfg.matryoshka_widths:
        size.append(("Matryoshka prefixes", ", ".join(str(w) for w in cfg.widths)))
    step, ckpt = (metrics or {}).get("global_step"), (metrics or {}).get("checkpoint")
    lines = [sae_front_matter(sae, format), "", f"# BatchTopK sparse autoencoder: {what}", "",
             f"Exported by embedlab in the {format} format: {files}. Inputs are raw activations (the input scale is "
             "folded into the biases and the threshold); codes and reconstructions are in the same units.", "",
             "## What it reads", "", "| | |", "|---|---|", *[f"| {a} | {b} |" for a, b in reads_rows(sae.activations)],
             "", "## Dictionary", "", "| | |", "|---|---|", *[f"| {a} | {b} |" for a, b in size], "",
             "## Quality", "",
             (f"As logged by the run up to step {step}" if step is not None else "As logged by the run")
             + (f"; the weights are those of `{ckpt}`." if ckpt else "."), "",
             "| figure | value | measured on |", "|---|---|---|",
             *[f"| {a} | {b} | {c} |" for a, b, c in quality_rows(metrics, sae)], "",
             *sts_lines(metrics, (sae.activations or {}).get("level")),
             "## Opening it", "", *open_lines(format, str(folder)), ""]
    return "\n".join(lines)
