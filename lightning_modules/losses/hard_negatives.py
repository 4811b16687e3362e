"""HNCSE (Liu et al., arXiv 2411.12156): unsupervised SimCSE with harder negatives, as two candidate builders.

Both builders plug into :class:`~lightning_modules.contrastive.ContrastiveModule` through its ``candidates``
argument and reuse SimCSE's candidate set (:class:`~lightning_modules.losses.contrastive.InBatchNegatives`):

- :class:`PositiveMixing` (HNCSE-PM) rebuilds every positive from itself and its anchor's hardest negative;
- :class:`HardNegativeMixing` (HNCSE-HNM) appends synthetic negatives mixed from each anchor's top-k hardest
  negatives (in the spirit of MoCHi, Kalantidis et al. 2020).

The specification is ``docs/methods.md`` section 2; ``S = cos(z1, z2^T) / tau``.

Hardest negatives are searched in the GLOBAL batch (every rank's rows, gathered with gradients), so a run on
W processes x B rows computes what one process x W*B rows computes. Random draws (HNM's pairs and alphas) are
made for all G = W*B rows with torch's global RNG on the embeddings' device, then this rank's rows are sliced:
Lightning's ``seed_everything`` gives every rank the same RNG state, hence the same draws, and a seeded run is
deterministic.

Supervised setting (triplets): the pool of negatives an anchor i is searched in is every other row's positive
(z2_j, j != i) AND every explicit hard negative (z3_j, all j, including its own). The z3 columns stay in
the logits unchanged: ``[cos(z1, z2~) | cos(z1, z3)] / tau`` for PM and
``[cos(z1, z2) | cos(z1, z3) | cos(z1, g)] / tau`` for HNM, with SimCSE's optional
``log(hard_negative_weight)`` on each anchor's own z3 column.

Where this implementation deliberately differs from the authors' code, and how to get either behaviour:

- No search inside the training step. The authors' PM code runs an Optuna search (2000 trials over w1, w2
  in [0, 2]) inside every training step. Here ``w1`` and ``w2`` are configuration; the defaults (1.0, 0.0)
  make the near-tie branch reproduce SimCSE. To explore them, run a hyper-parameter search OUTSIDE training,
  one run per trial, e.g. ``--model.candidates.init_args.w1 1.3 --model.candidates.init_args.w2 0.4``.
- Gradients through the PM mixing coefficients: the authors' code does not detach them (``mix_grad: true``,
  the default); ``mix_grad: false`` treats them as constants.
- Gradients through HNM's synthetic negatives: the authors' code lets them flow (``detach_synthetic: false``,
  the default); MoCHi detaches them (``detach_synthetic: true``).
- HNM's alpha: fixed 0.5 as in HNCSE (``alpha: 0.5``), or drawn per synthetic negative from U(0, 1) as in
  MoCHi (``alpha_uniform: true``).
- The synthetic negatives mix the raw embeddings and are then normalised (``g = normalize(alpha z_a +
  (1 - alpha) z_b)``), as written in docs/methods.md; MoCHi mixes unit vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.losses.contrastive import Candidates, InBatchNegatives, Views


def similarity(a_ND: Tensor, b_MD: Tensor, temperature: float) -> Tensor:
    """``cos(a_n, b_m) / temperature`` for every pair: (N, M)."""
    return F.normalize(a_ND, dim=-1) @ F.normalize(b_MD, dim=-1).T / temperature


def negative_pool(views: Views) -> Tensor:
    """Every candidate of the global batch: z2 (G rows), then z3 (G rows) when present: (P, D)."""
    if views.hard_negatives_GD is None:
        return views.positives_GD
    return torch.cat([views.positives_GD, views.hard_negatives_GD])


class PositiveMixing(InBatchNegatives):
    """HNCSE-PM: each positive is rebuilt from its anchor's hardest negative before the SimCSE loss.

    For every row i of the GLOBAL batch (all columns of the logits change, so every rank rebuilds all of
    them), with ``S_ih`` the largest similarity to a negative (``h = argmax_{j != i} S_ij``; ties go to the
    lowest column):

    1. ``S_ii <= S_ih`` (the negative is at least as close as the positive):
       ``z2~_i = (S_ii z2_i + S_ih z_h) / (S_ii + S_ih)``;
    2. else if ``(S_ii - S_ih) / S_ii <= margin`` (a near tie): ``z2~_i = w1 z2_i + w2 z_h``;
    3. else ``z2~_i = z2_i``.

    The loss is SimCSE's on ``cos(z1, z2~) / tau`` (plus the z3 columns in the supervised setting).

    Guards, documented because S is a cosine and can be negative:

    - Case 1 divides by ``S_ii + S_ih``, which is near 0 when the two have opposite signs. Its magnitude is
      clamped to at least ``eps`` with its sign kept (0 counts as positive), so the result stays finite. The
      logits normalise z2~, so only the direction matters: the clamp changes the result only when
      ``|S_ii + S_ih| < eps``, and never its sign.
    - Case 2 tests the ratio literally: with ``S_ii < 0`` the ratio is negative, hence case 2; with
      ``S_ii = 0`` it is ``+inf`` (the numerator is > 0 outside case 1), hence case 3. No NaN can arise.
    - A row with no negative at all (a global batch of one sentence, unsupervised) stays ``z2_i`` (case 3).

    The case and ``h`` are chosen without gradient; gradients always reach z2_i and z_h through the mixture.

    Args:
        margin: relative gap below which a positive counts as a near tie (case 2); >= 0.
        w1: weight of the positive in case 2.
        w2: weight of the hardest negative in case 2. ``w1=1, w2=0`` (defaults) leave case 2 as SimCSE.
        mix_grad: case 1's coefficients ``S_ii / (S_ii + S_ih)`` and ``S_ih / (S_ii + S_ih)`` carry gradient
            (True, as in the authors' code) or are treated as constants (False).
        eps: smallest magnitude of case 1's denominator (in logit units, i.e. cosine / tau); > 0.
        hard_negative_weight: SimCSE's alpha on each anchor's own explicit hard negative (supervised only).
    """

    def __init__(
        self,
        margin: float = 0.1,
        w1: float = 1.0,
        w2: float = 0.0,
        mix_grad: bool = True,
        eps: float = 1e-4,
        hard_negative_weight: float = 1.0,
    ) -> None:
        super().__init__(hard_negative_weight)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"PositiveMixing: margin must be a finite number >= 0, got {margin}")
        if not (math.isfinite(w1) and math.isfinite(w2)):
            raise ValueError(f"PositiveMixing: w1 and w2 must be finite, got w1={w1}, w2={w2}")
        if not eps > 0:
            raise ValueError(f"PositiveMixing: eps must be > 0, got {eps}")
        self.margin, self.w1, self.w2, self.mix_grad, self.eps = margin, w1, w2, mix_grad, eps

    def __call__(self, views: Views, temperature: float) -> Candidates:
        mixed_GD = self.mixed_positives(views, temperature)
        return super().__call__(views._replace(positives_GD=mixed_GD), temperature)

    def mixed_positives(self, views: Views, temperature: float) -> Tensor:
        """z2~ for every row of the global batch: (G, D)."""
        z2_GD, pool_PD = views.positives_GD, negative_pool(views)
        S_GP, h_G, case1_G, case2_G = self._select(views, temperature)
        s_ii_G = S_GP.diagonal()
        s_ih_G = S_GP.gather(1, h_G[:, None]).squeeze(1)
        total_G = s_ii_G + s_ih_G
        total_G = torch.where(total_G >= 0, total_G.clamp(min=self.eps), total_G.clamp(max=-self.eps))
        coef_own_G = torch.where(case1_G, s_ii_G / total_G, torch.where(case2_G, self.w1, 1.0))
        coef_h_G = torch.where(case1_G, s_ih_G / total_G, torch.where(case2_G, self.w2, 0.0))
        coef_own_G, coef_h_G = coef_own_G.to(z2_GD.dtype), coef_h_G.to(z2_GD.dtype)
        return coef_own_G[:, None] * z2_GD + coef_h_G[:, None] * pool_PD[h_G]

    def cases(self, views: Views, temperature: float) -> Tensor:
        """The rule applied to each row of the global batch, 1, 2 or 3 (see above): (G,) int64. Diagnostics."""
        _, _, case1_G, case2_G = self._select(views, temperature)
        return torch.where(case1_G, 1, torch.where(case2_G, 2, 3))

    def _select(self, views: Views, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """S (G, P), detached unless ``mix_grad``; each row's hardest negative h (G,); case 1 and case 2 masks."""
        pool_PD = negative_pool(views)
        G = views.positives_GD.shape[0]
        S_GP = similarity(views.anchors_GD, pool_PD, temperature)
        if not self.mix_grad:
            S_GP = S_GP.detach()
        # column i of row i is the row's own positive
        own_GP = torch.eye(G, pool_PD.shape[0], dtype=torch.bool, device=S_GP.device)
        with torch.no_grad():
            hardest_G, h_G = S_GP.masked_fill(own_GP, -math.inf).max(dim=1)  # first maximum on ties
            own_G = S_GP.diagonal()
            has_negative_G = torch.isfinite(hardest_G)
            case1_G = has_negative_G & (own_G <= hardest_G)
            case2_G = has_negative_G & ~case1_G & ((own_G - hardest_G) / own_G <= self.margin)
        return S_GP, h_G, case1_G, case2_G


class HardNegativeMixing(InBatchNegatives):
    """HNCSE-HNM: ``s`` synthetic negatives per anchor, mixed from pairs of its top-k hardest negatives.

    For each local anchor i: rank the pool (z2_j for j != i, plus all z3 in the supervised setting) by
    ``S_ij`` (descending; ties by the lower column, a stable sort), keep the first ``k' = min(k, P - 1)``
    (k is clamped to the negatives available), draw ``s`` pairs of positions (a, b) in ``[0, k')`` uniformly
    with replacement, and append ``cos(z1_i, g) / tau`` for ``g = normalize(alpha z_a + (1 - alpha) z_b)``
    as ``s`` extra columns after SimCSE's. An anchor without any negative (a global batch of one,
    unsupervised) gets no extra column.

    Random draws, in this order, for the whole global batch of G rows with torch's global RNG on the
    embeddings' device: ``torch.randint(k', (G, s, 2))`` (pair positions), then, with ``alpha_uniform``,
    ``torch.rand(G, s)`` (float32). This rank uses rows ``offset : offset + B``.

    Args:
        k: hardest negatives mixed per anchor (>= 1; clamped to the negatives available).
        s: synthetic negatives per anchor (>= 1).
        alpha: mixing weight of the first of each pair, in [0, 1] (used when ``alpha_uniform`` is False).
        alpha_uniform: draw alpha ~ U(0, 1) per synthetic negative (MoCHi) instead of the fixed ``alpha``.
        detach_synthetic: stop gradients through the synthetic negatives (MoCHi); False lets them flow (the
            authors' code).
        hard_negative_weight: SimCSE's alpha on each anchor's own explicit hard negative (supervised only).
    """

    def __init__(
        self,
        k: int = 10,
        s: int = 40,
        alpha: float = 0.5,
        alpha_uniform: bool = False,
        detach_synthetic: bool = False,
        hard_negative_weight: float = 1.0,
    ) -> None:
        super().__init__(hard_negative_weight)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"HardNegativeMixing: k must be an integer >= 1, got {k!r}")
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"HardNegativeMixing: s must be an integer >= 1, got {s!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"HardNegativeMixing: alpha must be in [0, 1], got {alpha}")
        self.k, self.s, self.alpha = k, s, alpha
        self.alpha_uniform, self.detach_synthetic = alpha_uniform, detach_synthetic

    def __call__(self, views: Views, temperature: float) -> Candidates:
        base = super().__call__(views, temperature)
        pool_PD = base.shared_MD  # z2 (G) [+ z3 (G)]: exactly the pool of negatives, plus each own positive
        k = min(self.k, pool_PD.shape[0] - 1)
        if k < 1:
            return base
        G, B, device = views.anchors_GD.shape[0], views.local_size, pool_PD.device
        pairs_GS2 = torch.randint(k, (G, self.s, 2), device=device)
        if self.alpha_uniform:
            alpha_GS = torch.rand(G, self.s, device=device)
        else:
            alpha_GS = torch.full((G, self.s), self.alpha, device=device)
        local = slice(views.offset, views.offset + B)
        with torch.no_grad():
            S_BP = similarity(base.anchors_BD, pool_PD, temperature)
            S_BP[torch.arange(B, device=device), base.labels_B] = -math.inf  # the own positive is no negative
            top_BK = torch.sort(S_BP, dim=1, descending=True, stable=True).indices[:, :k]
        pick_BS2 = top_BK.gather(1, pairs_GS2[local].reshape(B, -1)).view(B, self.s, 2)
        alpha_BS1 = alpha_GS[local].unsqueeze(-1).to(pool_PD.dtype)
        # g = normalize(mix); contrastive_logits normalises every candidate, so it is not normalised twice here
        g_BSD = alpha_BS1 * pool_PD[pick_BS2[..., 0]] + (1 - alpha_BS1) * pool_PD[pick_BS2[..., 1]]
        if self.detach_synthetic:
            g_BSD = g_BSD.detach()
        bias_BC = None if base.bias_BC is None else F.pad(base.bias_BC, (0, self.s))
        return base._replace(extra_BSD=g_BSD, bias_BC=bias_BC)
