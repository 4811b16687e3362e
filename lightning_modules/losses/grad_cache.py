"""GradCache: the loss of a large contrastive batch with the activation memory of a small one.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(https://arxiv.org/abs/2101.06983); the same scheme as sentence-transformers' CachedMultipleNegativesRankingLoss
(``sentence_transformers/base/losses/gradcache.py``). In-batch negatives need every embedding of the batch in
one loss, but the encoder's activations for all of them need not be alive at once:

1. embed the batch in chunks of ``mini_batch_size`` rows WITHOUT a graph, recording the RNG state (dropout)
   before each chunk;
2. compute the full loss on the detached embeddings (requires_grad) and its gradient d loss / d embeddings
   (any cross-rank gather inside ``loss_fn`` backpropagates here, in the forward pass);
3. in the backward pass, re-embed each chunk WITH a graph, replaying its recorded RNG state (the same dropout
   masks) and autocast state, and backpropagate the cached embedding gradient through it.

The returned loss is a detached leaf whose gradient hook runs step 3, so Lightning's automatic optimisation
works unchanged: the hook receives whatever the outer backward passes in (``1 / accumulate_grad_batches``, the
fp16 loss scale) and multiplies it in; gradient clipping and the LR schedule act on ``param.grad`` afterwards.

The result equals plain autograd over the same chunked forward passes (same dropout masks): with dropout off, the
unchunked loss and gradients up to float rounding. Chunking changes which dropout masks are drawn (a (B, L, D)
draw is not the concatenation of two (B/2, L, D) draws), not what is computed from them.

Cost: every chunk is embedded twice (about +1/3 of a step's compute: one more forward on top of forward +
backward), in exchange for activation memory of one chunk instead of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import get_device_states, set_device_states


class RNGState:
    """The CPU generator and the generators of the devices ``tensors`` live on, captured now, replayable later.

    :meth:`replay` restores them inside ``torch.random.fork_rng``, so the global RNG stream after the replay is
    what it was before it (a replayed forward pass consumes nothing). sentence-transformers' ``RandContext``.
    """

    def __init__(self, *tensors: Tensor) -> None:
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    @contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states)
            yield


class AutocastState:
    """Whether autocast is on for ``device_type`` (and its dtype) now; :meth:`replay` re-enters that state.

    The backward pass runs outside the training step's autocast context, so without this the re-embedding of
    step 3 would run in float32 under ``precision: bf16-mixed`` and differ from the embeddings step 2 used.
    """

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def replay(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def grad_cached_loss(
    embed: Callable[[Tensor, Tensor], Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    mini_batch_size: int,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """``loss_fn(embed(input_ids, attention_mask))``, computed in chunks of rows with cached gradients.

    Args:
        embed: rows of token ids and mask (b, ...) -> embeddings (b, ...); row i of the output depends on row i of
            the input only. It is called twice per chunk (without, then with a graph).
        loss_fn: all embeddings (B, ...) -> scalar loss. It must hold no parameters of its own: only the embeddings
            receive a gradient from it.
        input_ids, attention_mask: the batch (B, ...), split along dim 0.
        mini_batch_size: rows per chunk (>= 1).
        params: None: each chunk's backward accumulates into ``param.grad`` as it goes (one device). Under
            DistributedDataParallel pass the trainable parameters of ``embed``: each chunk's gradient is then summed
            with ``torch.autograd.grad`` and delivered in ONE final backward, because DDP's reducer must see every
            parameter's gradient exactly once per backward (it all-reduces after the first one otherwise). Costs
            one extra parameter-sized buffer.

    Returns:
        The loss, a detached scalar with ``requires_grad``; calling ``backward`` on it (or on anything computed
        from it) re-embeds the chunks and fills the parameters' gradients.
    """
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    B = input_ids.shape[0]
    bounds = [(s, min(s + mini_batch_size, B)) for s in range(0, B, mini_batch_size)]
    if not torch.is_grad_enabled():  # evaluation: nothing to cache
        return loss_fn(torch.cat([embed(input_ids[s:e], attention_mask[s:e]) for s, e in bounds]))

    # 1. embed without a graph; remember each chunk's RNG state
    states, chunks = [], []
    with torch.no_grad():
        for s, e in bounds:
            states.append(RNGState(input_ids))
            chunks.append(embed(input_ids[s:e], attention_mask[s:e]))
    # 2. the full loss on detached embeddings, and its gradient with respect to them
    z_all = torch.cat(chunks).requires_grad_()
    loss = loss_fn(z_all)
    (grad_all,) = torch.autograd.grad(loss, z_all)
    grads = grad_all.split([e - s for s, e in bounds])
    # 3. deferred to the backward pass
    out = loss.detach().requires_grad_()
    replay = partial(_replay, embed=embed, input_ids=input_ids, attention_mask=attention_mask, bounds=bounds,
                     states=states, grads=grads, autocast=AutocastState(input_ids.device.type), params=params)
    out.register_hook(replay)
    return out


def _replay(grad_output: Tensor, *, embed, input_ids, attention_mask, bounds, states, grads, autocast, params) -> None:
    """Step 3: re-embed every chunk with a graph and backpropagate its cached gradient (scaled by ``grad_output``)."""
    summed: list[Tensor | None] = [None] * len(params) if params is not None else []
    with torch.enable_grad():
        for (s, e), state, grad in zip(bounds, states, grads):
            with state.replay(), autocast.replay():
                z = embed(input_ids[s:e], attention_mask[s:e])
            grad = (grad * grad_output).to(z.dtype)
            if params is None:
                torch.autograd.backward(z, grad)
                continue
            for i, g in enumerate(torch.autograd.grad(z, params, grad, allow_unused=True)):
                if g is not None:
                    summed[i] = g if summed[i] is None else summed[i].add_(g)
    if params is not None:
        used = [(p, g) for p, g in zip(params, summed) if g is not None]
        torch.autograd.backward([p for p, _ in used], [g for _, g in used])
