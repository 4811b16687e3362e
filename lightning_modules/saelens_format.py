"""SAELens' on-disk layout of a BatchTopK SAE: a JumpReLU SAE whose per-latent threshold is the global threshold.

SAELens (>= 6) saves its own trained BatchTopK SAEs this way (``BatchTopKTrainingSAE.save_inference_model``), and
``sae_lens.SAE.load_from_disk(DIR)`` opens the folder as a ``JumpReLUSAE``:

- ``cfg.json``: ``architecture: "jumprelu"``, ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations`` and a free-form ``metadata`` dict. ``metadata.sae_lens_version``
  must be >= 6: without it SAELens takes the folder for a pre-6 one and its converter drops the metadata.
- ``sae_weights.safetensors``: ``W_enc`` (d, F), ``b_enc`` (F), ``W_dec`` (F, d), ``b_dec`` (d), ``threshold`` (F).

Its JumpReLU encodes ``relu(h) * (h > threshold)`` with ``h = (x - b_dec) W_enc + b_enc`` (``apply_b_dec_to_input``),
which for a threshold >= 0 is this project's inference rule (``pre * (pre > theta)``) exactly; it decodes
``codes W_dec + b_dec``. Checked against sae-lens 6.54.12 by ``tests/test_export_peers.py``.

What the SAE reads goes where SAELens keeps it, in ``metadata``: ``model_name`` (the Hugging Face model),
``hook_name`` = ``hidden_states.<layer>`` (the ``output_hidden_states`` index, 0 = embeddings output; not a
TransformerLens hook, which these encoders do not have: ``HookedSAETransformer.add_sae`` skips it with a warning),
``exclude_special_tokens`` (token level: True when special tokens were dropped from the training vectors), and
everything else (level, text prefix, model fingerprint, the BatchTopK config, the folded input scale) under
``metadata.embedlab``, the same fields as the sparsify ``cfg.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from core.errors import DataError
from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE

WEIGHTS_FILE = "sae_weights.safetensors"
#: The ``metadata.sae_lens_version`` written: the first version of the layout above (SAELens converts older ones).
LAYOUT_VERSION = "6.0.0"



def sae_weights_file(path: str | Path) -> Path | None:
    """The weights of the SAE folder ``path``: this project's ``sae.safetensors`` or SAELens' (:data:`WEIGHTS_FILE`),
    beside a ``cfg.json``; None when ``path`` is no SAE folder. Every loader asks this, so a folder in either
    format is recognised everywhere."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        return None
    return next((path / name for name in (WEIGHTS_FILE, "sae.safetensors") if (path / name).is_file()), None)

def saelens_files(folded: BatchTopKSAE, embedlab: dict) -> tuple[dict[str, Tensor], dict]:
    """The tensors and ``cfg.json`` of the SAELens folder of ``folded`` (an SAE whose input scale is folded, see
    ``fold_input_scale``); ``embedlab``: this project's own fields, kept in ``metadata.embedlab``.

    Raises:
        DataError: the SAE has no inference threshold yet (a JumpReLU without it would not be this SAE).
    """
    if folded.threshold < 0:
        raise DataError(f"the SAE has no inference threshold yet (it trained {int(folded.steps)} steps, the threshold "
                        f"is estimated after threshold_start = {folded.cfg.threshold_start}): SAELens needs it as "
                        "the JumpReLU threshold; train longer or export the sparsify format")
    acts = folded.activations or {}
    layer = acts.get("layer")
    tensors = {"W_enc": folded.W_enc.t(), "b_enc": folded.b_enc, "W_dec": folded.W_dec, "b_dec": folded.b_dec,
               "threshold": torch.full_like(folded.b_enc, float(folded.threshold))}
    cfg = {
        "architecture": "jumprelu", "d_in": folded.cfg.d_in, "d_sae": folded.num_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": LAYOUT_VERSION, "sae_lens_training_version": None,
            "model_name": acts.get("model"),
            "hook_name": None if layer is None else f"hidden_states.{layer}",
            "exclude_special_tokens": {"drop": True, "keep": False}.get(acts.get("special_tokens")),
            "training_architecture": "batchtopk", "training_architecture_details": {"k": folded.cfg.k},
            "embedlab": embedlab,
        },
    }
    return {k: v.detach().float().contiguous() for k, v in tensors.items()}, cfg


def from_saelens(cfg: dict, tensors: dict[str, Tensor], where: str) -> tuple[BatchTopKConfig, dict[str, Tensor], dict]:
    """(config, tensors in this project's names and layout, ``metadata.embedlab``) of a SAELens JumpReLU folder
    whose thresholds are one global value: an export of :func:`saelens_files`, or a BatchTopK SAE SAELens trained
    (its k from ``training_architecture_details``). ``where`` names the folder in errors."""
    meta = cfg.get("metadata") or {}
    ours = meta.get("embedlab") or {}
    if cfg.get("architecture") != "jumprelu" or cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{where}: a SAELens {cfg.get('architecture')!r} SAE (normalize_activations "
                         f"{cfg.get('normalize_activations')!r}); only a JumpReLU without input normalisation is a "
                         "BatchTopK SAE")
    missing = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"} - set(tensors)
    if missing:
        raise ValueError(f"{where}: {WEIGHTS_FILE} lacks {sorted(missing)}")
    threshold = tensors["threshold"].float()
    if not bool((threshold == threshold[0]).all()) or float(threshold[0]) < 0:
        raise ValueError(f"{where}: per-latent thresholds differ (or are negative): a JumpReLU SAE, not a BatchTopK "
                         "one with a global threshold; open it with sae_lens.SAE.load_from_disk")
    if "batch_topk" in ours:
        config = BatchTopKConfig.from_dict({**ours["batch_topk"], "normalize_input": False})
    else:
        k = (meta.get("training_architecture_details") or {}).get("k")
        if k is None:
            raise ValueError(f"{where}: no k in metadata.training_architecture_details: not a BatchTopK SAE")
        config = BatchTopKConfig(d_in=cfg["d_in"], num_latents=cfg["d_sae"], k=max(1, round(k)),
                                 normalize_input=False)
    W_enc_DF = tensors["W_enc"].float()
    b_enc = tensors["b_enc"].float()
    if not cfg.get("apply_b_dec_to_input", True):  # h = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + tensors["b_dec"].float() @ W_enc_DF
    ours_tensors = {"encoder.weight": W_enc_DF.t(), "encoder.bias": b_enc, "W_dec": tensors["W_dec"].float(),
                    "b_dec": tensors["b_dec"].float()}
    return config, ours_tensors, {**ours, "threshold": float(threshold[0])}
