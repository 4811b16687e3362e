"""BatchTopK sparse autoencoder (Bussmann, Leask & Nanda, arXiv 2412.06410) as a plain ``nn.Module``.

    pre  = relu((x / s - b_dec) W_enc^T + b_enc)       s: input scale (unit mean squared norm), W_enc: (F, d)
    training:  keep the k * B largest entries of the whole batch (flattened), zero the rest
    inference: keep the entries above one learned global threshold theta (no dependence on the batch)
    x_hat = s * (codes W_dec + b_dec)                  W_dec rows (F, d) have unit norm

Codes and reconstructions are returned in input units (``s * codes``): :func:`fold_input_scale` folds ``s`` into
the biases and the threshold, after which ``s = 1`` and every output is unchanged (this is how the SAE is exported).

Training maths is sparse: only the selected (row, latent) entries get a gradient, so the backward pass and the
decoder run as ``embedding_bag`` gathers over ~k*B entries instead of dense (B, F) x (F, d) matmuls; the dense
encoder matmul that scores all latents is the only O(B d F) step. :func:`sparse_code` is that autograd function;
``tests/test_sae.py`` checks its gradients against dense autograd.

Matryoshka (Bussmann et al., arXiv 2503.17547) is configuration of this SAE, not another one: with nested widths
``w_1 < ... < w_L = F`` the training loss is ``sum_j weight_j * ||x - x_hat_j||^2`` where ``x_hat_j`` decodes only
the selected codes of latents ``< w_j`` (the same batch top-k over the whole dictionary). Each selected entry is
decoded once, in the group of widths it falls in, and the prefixes are cumulative sums of the group outputs.
Inference (the threshold) and every export are unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.losses.sae import aux_loss, fvu, squared_error


@dataclass
class BatchTopKConfig:
    """Configuration of a :class:`BatchTopKSAE`; validated on construction.

    Defaults follow dictionary_learning's ``BatchTopKTrainer`` unless noted.
    """

    d_in: int | None = None
    """Dimension of the input vectors; None until known (``SAEModule`` takes it from the data at setup)."""

    expansion_factor: int = 8
    """Dictionary size as a multiple of ``d_in`` (used when ``num_latents`` is 0)."""

    num_latents: int = 0
    """Dictionary size F; 0 means ``d_in * expansion_factor``."""

    k: int = 32
    """Mean number of active latents per row in training (the batch keeps ``k * B`` entries)."""

    k_aux: int = 0
    """Dead latents used per row by the AuxK loss; 0 means ``d_in // 2`` (dictionary_learning; OpenAI uses 512).
    Capped at the number of dead latents."""

    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (dictionary_learning and OpenAI: 1/32; SAELens: 1.0). 0 disables it."""

    dead_after: int = 10_000_000
    """A latent is dead after this many training vectors (tokens) without firing (dictionary_learning: 10M;
    the BatchTopK reference code uses 5 batches). Counted over the global batch under DDP."""

    aux_detach: bool = True
    """Detach the residual ``e = x - x_hat`` the dead latents learn to explain (dictionary_learning, OpenAI): the
    AuxK loss then trains only the dead latents' encoder and decoder rows (and ``b_dec`` through the encoder input),
    never pushing the live reconstruction towards what the dead latents can express. False lets it flow into x_hat."""

    aux_normalize: bool = True
    """Divide the AuxK loss by the residual's variance (OpenAI / dictionary_learning) rather than use raw MSE."""

    threshold_beta: float = 0.999
    """EMA coefficient of the inference threshold: ``theta <- beta * theta + (1 - beta) * min positive code``."""

    threshold_start: int = 1000
    """Training steps before the threshold starts being estimated (the first estimate is that batch's minimum)."""

    normalize_input: bool = True
    """Scale inputs by a fixed ``s = sqrt(mean ||x||^2)`` estimated at initialisation, so that they have unit mean
    squared norm (hyper-parameters then transfer across models and layers)."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias, computed on the initialisation sample (after input scaling)."""

    matryoshka_widths: list[int | float] = dataclasses.field(default_factory=list)
    """Nested dictionary prefixes for the Matryoshka loss, increasing and ending at the dictionary size: sizes
    (``[128, 512, 2048, 3072]``) or fractions of it as floats (``[0.125, 0.5, 1.0]``, so a recipe fits any model;
    kept as given, resolved to sizes by :attr:`widths`); empty: the plain BatchTopK loss. ``[F]`` is the plain loss
    exactly."""

    matryoshka_weights: list[float] = dataclasses.field(default_factory=list)
    """Weight of each prefix's reconstruction error; empty: equal weights summing to 1 (dictionary_learning)."""

    candidates_per_row: int = 4
    """On the CPU, batch top-k is computed exactly from each row's ``candidates_per_row * k`` largest entries,
    falling back to the full flattened top-k when some row had all its candidates chosen (a check that would wait
    for an accelerator, so there the full top-k always runs); 0 always uses the full top-k."""

    def __post_init__(self) -> None:
        self.matryoshka_widths = list(self.matryoshka_widths or [])  # null in YAML: the plain SAE
        self.matryoshka_weights = list(self.matryoshka_weights or [])
        if self.d_in is not None and self.d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {self.d_in}")
        if self.num_latents < 0 or (self.num_latents == 0 and self.expansion_factor < 1):
            raise ValueError(f"num_latents must be >= 0 and expansion_factor >= 1 (got {self.num_latents}, "
                             f"{self.expansion_factor})")
        if self.k < 1:
            raise ValueError(f"k = {self.k} must be between 1 and the dictionary size (d_in x expansion_factor, or "
                             "num_latents)")
        if self.k_aux < 0 or self.aux_coef < 0 or self.dead_after < 1 or self.candidates_per_row < 0:
            raise ValueError("k_aux, aux_coef and candidates_per_row must be >= 0, dead_after >= 1")
        if not 0 <= self.threshold_beta < 1 or self.threshold_start < 0:
            raise ValueError(f"threshold_beta must be in [0, 1) and threshold_start >= 0, got "
                             f"{self.threshold_beta}, {self.threshold_start}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        n_widths, weights = len(self.matryoshka_widths), list(self.matryoshka_weights)
        if weights and (len(weights) != n_widths or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"matryoshka_weights must be one non-negative weight per width ({n_widths}), not all "
                             f"zero, got {weights}")
        if self.d_in is not None or self.num_latents:  # the dictionary size is known: check what depends on it
            if self.k > self.latents:
                raise ValueError(f"k = {self.k} must be between 1 and the dictionary size {self.latents} "
                                 f"(d_in {self.d_in} x expansion_factor {self.expansion_factor} or num_latents)")
            widths = self.widths
            if widths and (widths[-1] != self.latents or any(w < 1 for w in widths)
                           or any(a >= b for a, b in zip(widths, widths[1:]))):
                raise ValueError(f"matryoshka_widths must increase strictly from >= 1 and end at the dictionary "
                                 f"size {self.latents}, got {self.matryoshka_widths} (sizes {widths})")

    @property
    def widths(self) -> list[int]:
        """The Matryoshka prefix sizes, fractions resolved against the dictionary size."""
        return [max(1, round(w * self.latents)) if isinstance(w, float) else int(w) for w in self.matryoshka_widths]

    @property
    def levels(self) -> list[tuple[int, float]]:
        """(width, weight) of each Matryoshka prefix; the plain SAE is the single level (F, 1.0)."""
        widths = self.widths or [self.latents]
        weights = list(self.matryoshka_weights) or ([1.0 / len(widths)] * len(widths) if self.matryoshka_widths
                                                    else [1.0])
        return list(zip(widths, weights))

    @property
    def latents(self) -> int:
        if not self.num_latents and self.d_in is None:
            raise ValueError("the dictionary size is unknown until d_in is set (or num_latents given)")
        return self.num_latents or self.d_in * self.expansion_factor

    @property
    def aux_k(self) -> int:
        return self.k_aux or max(self.d_in // 2, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, drop_extra_fields: bool = True) -> BatchTopKConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra and not drop_extra_fields:
            raise ValueError(f"unknown BatchTopKConfig fields {sorted(extra)}")
        return cls(**{k: v for k, v in d.items() if k in names})


class SAEOutput(NamedTuple):
    """What :meth:`BatchTopKSAE.forward` returns. Codes are sparse: ``acts[i]`` is the code of latent
    ``latents[i]`` in row ``rows[i]`` (rows ascending); :meth:`BatchTopKSAE.dense` makes the (B, F) matrix."""

    x_hat: Tensor
    """(B, d) reconstruction, input units."""
    acts: Tensor
    """(n,) codes, input units. In training n = min(k * B, B * F) always (a size known in advance: no host sync), so
    when fewer entries are positive some are 0; a 0 codes nothing (count codes as ``acts > 0``)."""
    rows: Tensor
    """(n,) row of each code."""
    latents: Tensor
    """(n,) latent index of each code."""
    loss: Tensor
    """Training loss ``mse + aux_coef * aux_loss`` (normalised units)."""
    mse: Tensor
    """Mean over rows of ``||x - x_hat||^2`` in normalised units."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch."""
    aux_loss: Tensor
    """AuxK loss (0 when no latent is dead, in eval mode, or with ``aux_coef = 0``)."""
    fired: Tensor
    """(F,) bool: latents active in this batch."""
    prefix_mse: Tensor | None = None
    """(L,) reconstruction error of each Matryoshka prefix (normalised units; the last is ``mse``); None for the
    plain SAE."""


# ------------------------------------------------------------------------------------------- sparse maths
def host_reads_are_free(t: Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing (a CPU tensor: no device queue to drain). The
    SAE then takes shortcuts that read a value mid-step; elsewhere it keeps every size fixed in advance."""
    return t.device.type == "cpu"


def batch_topk(pre_BF: Tensor, k: int, candidates_per_row: int = 4, shortcut: bool | None = None) -> Tensor:
    """Flat indices (ascending) into ``pre_BF`` of its ``n = min(k * B, B * F)`` largest entries.

    Always exactly n indices, a size the host knows in advance: when fewer than n entries are positive, some of the
    chosen entries are 0 (``pre_BF`` is a ``relu``), and they code nothing.

    Args:
        pre_BF: non-negative pre-activations.
        k: codes per row on average.
        candidates_per_row: c; with the shortcut, only each row's ``c * k`` largest entries compete, which equals
            the full flattened top-k unless some row had all its candidates chosen; then the full top-k is computed.
        shortcut: take the candidate shortcut; its exactness check reads a value on the host. None: where the host
            is the device (CPU tensors), since on an accelerator the read would stall the queue for the rest of the
            step; there the full top-k runs, as SAELens and sparsify do.
    """
    B, F_ = pre_BF.shape
    n = min(k * B, B * F_)
    m = min(F_, candidates_per_row * k)
    if shortcut is None:
        shortcut = host_reads_are_free(pre_BF)
    flat_idx = None
    if shortcut and 0 < m < F_:
        cand_BM, cols_BM = pre_BF.topk(m, dim=1, sorted=False)
        _, pos = cand_BM.reshape(-1).topk(n, sorted=False)
        rows = torch.div(pos, m, rounding_mode="floor")
        chosen_B = torch.zeros(B, dtype=torch.long, device=pos.device).index_add_(0, rows, torch.ones_like(rows))
        if bool((chosen_B < m).all()):  # no row had all its candidates chosen: exact (a host read, on the CPU)
            flat_idx = rows * F_ + cols_BM.reshape(-1)[pos]
    if flat_idx is None:
        _, flat_idx = pre_BF.reshape(-1).topk(n, sorted=False)
    return ascending(flat_idx, B * F_)


def ascending(idx: Tensor, size: int) -> Tensor:
    """Distinct indices in [0, size) in ascending order through a bitmap instead of a comparison sort (done by hand:
    on a busy 2-core CPU, torch's parallel sort of 131k indices took ~0.5 s, 5x this bitmap). ``nonzero_static``
    with the known count: a plain ``nonzero`` waits for the device to learn its output size."""
    mask = torch.zeros(size, dtype=torch.bool, device=idx.device)
    mask[idx] = True
    return torch.nonzero_static(mask, size=idx.numel()).squeeze(-1)


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """``embedding_bag`` offsets: start of each row's entries in ``rows`` (sorted ascending). A binary search, not
    ``bincount``, whose CUDA kernel reads the largest value on the host to size its output."""
    return torch.searchsorted(rows, torch.arange(n_rows, dtype=rows.dtype, device=rows.device))


def sampled_dot(a_BD: Tensor, b_FD: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:
    """``(a_BD[rows] * b_FD[cols]).sum(-1)`` (an SDDMM) without materialising the (n, d) gathers: torch's CSR
    ``sampled_addmm`` where available, else blocks of gathers."""
    n = rows.numel()
    if n == 0:
        return a_BD.new_zeros(0)
    try:
        crow = torch.cat([offsets, offsets.new_tensor([n])])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            mask = torch.sparse_csr_tensor(crow, cols, a_BD.new_zeros(n), (a_BD.shape[0], b_FD.shape[0]),
                                           check_invariants=False)
            return torch.sparse.sampled_addmm(mask, a_BD, b_FD.t()).values()
    except (RuntimeError, NotImplementedError):
        out = a_BD.new_empty(n)
        for s in range(0, n, 1 << 15):
            e = min(s + (1 << 15), n)
            out[s:e] = (a_BD[rows[s:e]] * b_FD[cols[s:e]]).sum(-1)
        return out


class _SparseCode(torch.autograd.Function):
    """``R = S W_dec`` with ``S[bag, col] = relu(x_c W_enc^T + b_enc)[row, col]`` over the selected entries.

    The selection (rows, cols) is given, and each entry adds into output row ``bags[i]`` (its input row for the
    plain SAE; (row, Matryoshka group) for the nested one, so every prefix's part comes out of one pass). Gradients
    flow to x_c, W_enc, b_enc and W_dec through the selected entries only, computed with ``embedding_bag``
    (gather-sum) kernels: no (B, F) tensor in the backward pass.
    """

    @staticmethod
    def forward(ctx, x_c_BD, W_enc, b_enc, W_dec, rows, cols, vals, bags, n_bags):
        bag_offsets = row_offsets(bags, n_bags)
        recon_ND = F.embedding_bag(cols, W_dec, bag_offsets, mode="sum", per_sample_weights=vals)
        ctx.save_for_backward(x_c_BD, W_enc, W_dec, rows, cols, vals, bags, bag_offsets)
        return recon_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_c_BD, W_enc, W_dec, rows, cols, vals, bags, bag_offsets = ctx.saved_tensors
        F_ = W_enc.shape[0]
        grad_ND = grad_ND.contiguous()
        # an entry coded 0 was chosen but is off (relu): no gradient flows through it
        g_vals = sampled_dot(grad_ND, W_dec, bags, cols, bag_offsets) * (vals > 0)
        # Entries grouped by latent (S^T as bags of rows): the transposed bitmap gives (col, row) pairs in order, and
        # a binary search in the row-major flat indices maps each back to its entry.
        B = x_c_BD.shape[0]
        flat_T = ascending(cols * B + rows, F_ * B)
        cols_T = torch.div(flat_T, B, rounding_mode="floor")
        col_rows = flat_T - cols_T * B
        by_col = torch.searchsorted(rows * F_ + cols, col_rows * F_ + cols_T)
        col_offsets = row_offsets(cols_T, F_)
        grad_W_dec = F.embedding_bag(bags[by_col], grad_ND, col_offsets, mode="sum", per_sample_weights=vals[by_col])
        grad_W_enc = F.embedding_bag(col_rows, x_c_BD, col_offsets, mode="sum", per_sample_weights=g_vals[by_col])
        grad_b_enc = torch.zeros(F_, dtype=vals.dtype, device=vals.device).index_add_(0, cols, g_vals)
        grad_x_c = None
        if ctx.needs_input_grad[0]:
            grad_x_c = F.embedding_bag(cols, W_enc, row_offsets(rows, B), mode="sum", per_sample_weights=g_vals)
        return grad_x_c, grad_W_enc, grad_b_enc, grad_W_dec, None, None, None, None, None


def sparse_code(x_c_BD: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, rows: Tensor, cols: Tensor,
                vals: Tensor, bags: Tensor | None = None, n_bags: int | None = None) -> Tensor:
    """Decoder output (no bias) of the selected codes, differentiable with sparse gradients (see :class:`_SparseCode`).

    ``vals`` must equal ``relu(x_c W_enc^T + b_enc)[rows, cols]`` (computed without gradient by the caller; an
    entry of 0 codes nothing and gets no gradient); ``rows`` ascending. Output (B, d), or (n_bags, d) when each
    entry goes to output row ``bags[i]`` (ascending too).
    """
    if bags is None:
        bags, n_bags = rows, x_c_BD.shape[0]
    return _SparseCode.apply(x_c_BD, W_enc, b_enc, W_dec, rows, cols, vals, bags, n_bags)


def positive_min(acts: Tensor) -> Tensor:
    """Smallest positive entry of ``acts`` (inf when none is), computed on the device."""
    return torch.where(acts > 0, acts, torch.full_like(acts, float("inf"))).amin() if acts.numel() else \
        acts.new_tensor(float("inf"))


def geometric_median(x_ND: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm (done by hand: torch has no geometric median)."""
    y_D = x_ND.mean(0)
    for _ in range(iters):
        w_N = 1 / torch.linalg.vector_norm(x_ND - y_D, dim=-1).clamp_min(eps)
        y_next = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        if torch.linalg.vector_norm(y_next - y_D) <= eps * torch.linalg.vector_norm(y_D).clamp_min(eps):
            return y_next
        y_D = y_next
    return y_D


# ------------------------------------------------------------------------------------------------- module
class BatchTopKSAE(nn.Module):
    """BatchTopK sparse autoencoder. Parameters are stored as in EleutherAI sparsify (``W_enc`` = its
    ``encoder.weight``, (F, d)); buffers ``threshold``, ``tokens_since_fired``, ``input_scale``, ``steps`` and
    ``initialized`` are part of the state dict, so a checkpoint restores them.

    Train mode uses batch top-k and adds the AuxK loss; eval mode uses the threshold (and falls back to batch top-k
    with a warning while no threshold has been estimated).
    """

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__()
        self.activations: dict | None = None  # what it reads (model, layer, level): set by SAEModule / load_sae
        self.log10_density: Tensor | None = None  # (F,) log10 firing frequency of its last validation, if measured
        self.cfg = cfg
        d, n = cfg.d_in, cfg.latents
        W_dec = torch.randn(n, d)
        W_dec = W_dec / torch.linalg.vector_norm(W_dec, dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # tied initialisation: W_enc^T = W_dec
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("threshold", torch.tensor(-1.0))  # normalised units; < 0: not estimated yet
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))
        # Matryoshka widths and weights on the parameters' device (not state: the config holds them), so a step
        # makes no host-to-device copy
        levels = cfg.levels
        self.register_buffer("level_widths", torch.tensor([w for w, _ in levels]), persistent=False)
        # float64: a float32 copy would round the weights (1/3 by 3e-8) for a float64 SAE
        self.register_buffer("level_weights", torch.tensor([w for _, w in levels], dtype=torch.float64),
                             persistent=False)

    @property
    def num_latents(self) -> int:
        return self.W_dec.shape[0]

    # -------------------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def initialize(self, x_ND: Tensor) -> None:
        """Set the input scale and ``b_dec`` from a sample of inputs (dictionary_learning: one batch)."""
        x_ND = x_ND.to(self.W_dec)
        if self.cfg.normalize_input:
            self.input_scale.copy_(x_ND.pow(2).sum(-1).mean().sqrt().clamp_min(1e-12))
        x_ND = x_ND / self.input_scale
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x_ND))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(x_ND.mean(0))
        self.initialized.fill_(True)

    # ---------------------------------------------------------------------------------------------- maths
    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """(B, F) ``relu`` pre-activations in normalised units (dense; no gradient needed for selection)."""
        x_c = x_BD.to(self.W_enc) / self.input_scale - self.b_dec
        return F.relu(torch.addmm(self.b_enc, x_c, self.W_enc.t()))

    def select(self, pre_BF: Tensor) -> Tensor:
        """Flat indices of the active codes: batch top-k in training, the threshold at inference."""
        if self.training or self.threshold < 0:
            if not self.training:
                warnings.warn("BatchTopKSAE in eval mode has no threshold yet (fewer than threshold_start "
                              "training steps): using batch top-k, so codes depend on the batch", stacklevel=3)
            return batch_topk(pre_BF, self.cfg.k, self.cfg.candidates_per_row)
        return torch.nonzero(pre_BF.reshape(-1) > self.threshold).squeeze(-1)

    def forward(self, x_BD: Tensor) -> SAEOutput:
        # The SAE computes in its parameters' dtype even under autocast (bf16-mixed recipes): the selection and the
        # sparse kernels need matching dtypes, and reconstruction errors are small differences of large numbers.
        with torch.autocast(device_type=x_BD.device.type, enabled=False):
            return self._forward(x_BD)

    def _forward(self, x_BD: Tensor) -> SAEOutput:
        cfg, s = self.cfg, self.input_scale
        x_n = x_BD.to(self.W_enc) / s
        x_c = x_n - self.b_dec
        n_lat = self.num_latents
        with torch.no_grad():
            pre_BF = F.relu(torch.addmm(self.b_enc, x_c, self.W_enc.t()))
            flat = self.select(pre_BF)
            rows, cols = torch.div(flat, n_lat, rounding_mode="floor"), flat % n_lat
            vals = pre_BF.reshape(-1)[flat]
        prefix_mse = None
        if cfg.matryoshka_widths:
            x_hat_n, recon_loss, prefix_mse = self._matryoshka(x_n, x_c, rows, cols, vals)
            mse = prefix_mse[-1]
        else:
            x_hat_n = sparse_code(x_c, self.W_enc, self.b_enc, self.W_dec, rows, cols, vals) + self.b_dec
            mse = recon_loss = squared_error(x_n, x_hat_n)
        aux = torch.zeros((), dtype=mse.dtype, device=mse.device)
        if self.training and cfg.aux_coef > 0:
            dead_F = self.tokens_since_fired >= cfg.dead_after
            aux = self._aux_loss(x_n - x_hat_n, x_c, pre_BF, dead_F, aux)
        fired = torch.zeros(n_lat, dtype=torch.int32, device=cols.device).index_add_(0, cols, (vals > 0).int()) > 0
        return SAEOutput(x_hat_n * s, vals * s, rows, cols, recon_loss + cfg.aux_coef * aux, mse,
                         fvu(x_n, x_hat_n.detach()), aux, fired, prefix_mse)

    def _matryoshka(self, x_n: Tensor, x_c: Tensor, rows: Tensor, cols: Tensor, vals: Tensor):
        """(full reconstruction, weighted prefix loss, (L,) prefix errors). Each selected entry is decoded once, into
        the output row of (its row, the width group its latent falls in): row-major entries keep those ascending.
        The prefixes are running sums of the groups."""
        L, B = self.level_widths.numel(), x_n.shape[0]
        group = torch.bucketize(cols, self.level_widths, right=True)  # group j: widths[j-1] <= latent < widths[j]
        parts_BLD = sparse_code(x_c, self.W_enc, self.b_enc, self.W_dec, rows, cols, vals, rows * L + group,
                                B * L).view(B, L, -1)
        x_hat_BLD = parts_BLD.cumsum(1) + self.b_dec  # prefix j: the groups up to j
        prefix_mse = (x_n[:, None] - x_hat_BLD).pow(2).sum(-1).mean(0)  # (L,)
        return x_hat_BLD[:, -1], (self.level_weights.to(prefix_mse.dtype) * prefix_mse).sum(), prefix_mse

    def _aux_loss(self, e_BD: Tensor, x_c: Tensor, pre_BF: Tensor, dead_F: Tensor, zero: Tensor) -> Tensor:
        """AuxK: the ``aux_k`` largest codes of dead latents per row reconstruct the residual; 0 when no latent is
        dead. Off the CPU every size is fixed in advance (the top-k runs over all latents with the live ones zeroed,
        a chosen 0 codes nothing, and the "none dead" case is chosen on the device: counting the dead on the host
        would stall the queue). On the CPU, where that count is free, only the dead latents' columns are gathered
        (5x cheaper with 10 % dead) and nothing runs when none is."""
        with torch.no_grad():
            B = pre_BF.shape[0]
            if host_reads_are_free(pre_BF):
                dead_idx = torch.nonzero(dead_F).squeeze(-1)
                if dead_idx.numel() == 0:
                    return zero
                scores_BG, latent_of = pre_BF[:, dead_idx], dead_idx
            else:
                scores_BG, latent_of = pre_BF.masked_fill(~dead_F, 0), None
            k_aux = min(self.cfg.aux_k, scores_BG.shape[1])
            _, top_BK = scores_BG.topk(k_aux, dim=1, sorted=False)
            cols = top_BK.reshape(-1) if latent_of is None else latent_of[top_BK.reshape(-1)]
            rows = torch.arange(B, device=pre_BF.device).repeat_interleave(k_aux)
            flat = ascending(rows * self.num_latents + cols, B * self.num_latents)  # row-major order
            rows, cols = torch.div(flat, self.num_latents, rounding_mode="floor"), flat % self.num_latents
            vals = pre_BF.reshape(-1)[flat] * dead_F[cols]
        if self.cfg.aux_detach:
            e_BD = e_BD.detach()
        recon_BD = sparse_code(x_c, self.W_enc, self.b_enc, self.W_dec, rows, cols, vals)
        return torch.where(dead_F.any(), aux_loss(e_BD, recon_BD, normalize=self.cfg.aux_normalize), zero)

    # ----------------------------------------------------------------------------------- public inference API
    def dense(self, out: SAEOutput) -> Tensor:
        """(B, F) code matrix of a forward output, input units."""
        codes_BF = torch.zeros(out.x_hat.shape[0], self.num_latents, dtype=out.acts.dtype, device=out.acts.device)
        codes_BF[out.rows, out.latents] = out.acts
        return codes_BF

    @torch.no_grad()
    def encode(self, x_BD: Tensor) -> Tensor:
        """(B, F) codes in input units (eval mode: threshold; train mode: batch top-k)."""
        pre_BF = self.pre_acts(x_BD)
        codes_BF = torch.zeros_like(pre_BF)
        flat = self.select(pre_BF)
        codes_BF.view(-1)[flat] = pre_BF.reshape(-1)[flat]
        return codes_BF * self.input_scale

    def decode(self, codes_BF: Tensor) -> Tensor:
        """Reconstruction (B, d) in input units from (B, F) codes in input units."""
        return codes_BF @ self.W_dec + self.b_dec * self.input_scale

    # --------------------------------------------------------------------------------------- training hooks
    @torch.no_grad()
    def update_stats(self, fired_F: Tensor, n_tokens: int, min_act: Tensor) -> None:
        """After a training step's forward: dead-latent counters, step count and the threshold EMA.

        Args:
            fired_F: latents that fired anywhere in the (global) batch.
            n_tokens: rows in the (global) batch.
            min_act: smallest positive selected code of the (global) batch, normalised units (the caller passes
                ``positive_min(out.acts) / input_scale``; inf when nothing fired, then the threshold is left as is).
        """
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired_F, 0)  # not [fired_F] = 0: a boolean index finds its nonzeros
        self.steps += 1
        # on the device throughout: an `if` on these tensors would wait for the GPU at every step
        update = (self.steps > self.cfg.threshold_start) & torch.isfinite(min_act)
        beta = self.cfg.threshold_beta
        new = torch.where(self.threshold < 0, min_act, beta * self.threshold + (1 - beta) * min_act)
        self.threshold.copy_(torch.where(update, new.to(self.threshold), self.threshold))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along that (unit-norm) row; call before the step."""
        if self.W_dec.grad is not None:
            parallel_F = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(parallel_F * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Renormalise decoder rows to unit norm; call after the step."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def fold_input_scale(sae: BatchTopKSAE) -> BatchTopKSAE:
    """Fold the input scale s into the parameters (in place): ``b_enc``, ``b_dec`` and ``threshold`` are multiplied by
    s and s becomes 1. Encoding raw inputs then gives the same codes (input units) and reconstructions as before."""
    s = sae.input_scale.clone()
    sae.b_enc.mul_(s)
    sae.b_dec.mul_(s)
    if sae.threshold >= 0:
        sae.threshold.mul_(s)
    sae.input_scale.fill_(1.0)
    return sae


__all__ = ["BatchTopKConfig", "BatchTopKSAE", "SAEOutput", "batch_topk", "fold_input_scale", "geometric_median",
           "positive_min", "sparse_code"]
