"""Throughput of the BatchTopK SAE training step and of activation caching, as ratios measured in one process.

    python benchmarks/sae_throughput.py [--cache DIR] [--data_root ../shared/data] [--quick]

1. SAE step (forward, AuxK, backward, decoder-gradient projection, Adam step, renormalisation, statistics):
   ``BatchTopKSAE`` (sparse backward, candidate top-k) against :class:`PlainSAE` below, a straightforward dense
   PyTorch implementation of the same maths (flattened topk, dense (B, F) codes, autograd matmuls). Both start from
   the same weights and see the same batches; rounds alternate between them. Target: ratio >= 1.0. On a GPU the
   result is also compared with the memory-bandwidth bound of reading W_enc and W_dec once per step (bandwidth
   measured with a device-to-device copy in the same run).
2. Activation caching: ``CacheBuilder.encode_chunk`` (tokenisation, forward, extraction of kept token vectors with
   their metadata, back to text order) against a bare forward pass of the encoder over the same pre-tokenised,
   length-sorted batches. Vectors per second counted the same way (kept tokens). Target: ratio >= 0.9.
3. Against the peer users would pick instead, when sae-lens is installed (the ``peers`` extra; ``--skip_saelens``
   leaves it out): SAELens' ``BatchTopKTrainingSAE`` step as its ``SAETrainer`` runs it (training_forward_pass with
   its dead-latent mask, firing counts, backward, gradient-norm clipping, Adam) against ``BatchTopKSAE``'s step,
   same d, F, k, batch, weights and batches, with AuxK and without (ours: aux_coef 0; SAELens: no dead mask); the
   four steps alternate within each round. With AuxK the same 10% of latents are held dead in both before every
   step (at these sizes every latent fires in every batch, so latents marked dead at the start revive after one
   step and the AuxK path would stop running). SAELens keeps its own defaults otherwise (decoder-norm rescaling,
   dense (B, F) codes).

Input vectors for 1. and 3. come from an activation cache when ``--cache`` names one (real MiniLM token vectors),
else Gaussian vectors. Writes benchmarks/results/sae_throughput.json (``--out``) and prints a table. The SAELens
comparison at the size its issue measured (d 384, F 3072, k 32, batch 1024, fp32; docs/results.md):

    python benchmarks/sae_throughput.py --configs 8x32 --batch 1024 --steps 5 --rounds 8 --skip_cache --threads 1 \
        --out benchmarks/results/sae_throughput_saelens-t1.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_threads, parse, write_json  # noqa: E402

from lightning_modules.components.batch_topk import BatchTopKConfig, BatchTopKSAE, positive_min  # noqa: E402


class PlainSAE(nn.Module):
    """The reference: BatchTopK SAE training maths written plainly, dense everywhere."""

    def __init__(self, sae: BatchTopKSAE) -> None:
        super().__init__()
        self.cfg = sae.cfg
        self.W_enc = nn.Parameter(sae.W_enc.detach().clone())
        self.b_enc = nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())
        self.scale = float(sae.input_scale)
        self.register_buffer("counts", sae.tokens_since_fired.clone())  # a buffer: .to(device) moves it
        self.threshold, self.steps = -1.0, 0

    def step(self, x: Tensor, opt: torch.optim.Optimizer) -> Tensor:
        cfg, B = self.cfg, x.shape[0]
        xn = x / self.scale
        pre = F.relu((xn - self.b_dec) @ self.W_enc.T + self.b_enc)
        vals, idx = pre.flatten().topk(cfg.k * B)
        codes = torch.zeros_like(pre).flatten().scatter(0, idx, vals).view_as(pre)
        x_hat = codes @ self.W_dec + self.b_dec
        e = xn - x_hat
        loss = e.pow(2).sum(-1).mean()
        dead = self.counts >= cfg.dead_after
        n_dead = int(dead.sum())
        if n_dead and cfg.aux_coef > 0:
            masked = torch.where(dead, pre, torch.full_like(pre, -1.0))
            a_vals, a_idx = masked.topk(min(cfg.aux_k, n_dead), dim=1)
            aux_codes = torch.zeros_like(pre).scatter(1, a_idx, a_vals.clamp_min(0))
            r = e.detach()
            aux = (r - aux_codes @ self.W_dec).pow(2).sum(-1).mean() / (r - r.mean(0)).pow(2).sum(-1).mean()
            loss = loss + cfg.aux_coef * aux
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
            opt.step()
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)
            fired = (codes > 0).any(0)
            self.counts += B
            self.counts[fired] = 0
            self.steps += 1
            m = float(vals[vals > 0].min())
            if self.steps > cfg.threshold_start:
                self.threshold = m if self.threshold < 0 else 0.999 * self.threshold + 0.001 * m
        return loss.detach()


def our_step(sae: BatchTopKSAE, x: Tensor, opt: torch.optim.Optimizer) -> Tensor:
    """What SAEModule does per batch, without Lightning."""
    out = sae(x)
    opt.zero_grad()
    out.loss.backward()
    sae.project_decoder_grad()
    opt.step()
    sae.normalize_decoder()
    sae.update_stats(out.fired, x.shape[0], positive_min(out.acts) / sae.input_scale)
    return out.loss.detach()


class SAELensStep:
    """SAELens' ``BatchTopKTrainingSAE`` training step as ``SAETrainer._train_step`` (sae-lens 6) runs it, minus its
    logging and schedulers: ``training_forward_pass`` with the dead-latent mask (AuxK; None turns it off), firing
    counts, backward, gradient-norm clipping at 1, Adam. Starts from ``sae``'s weights and dead latents, which stay
    dead (see the module docstring); inputs are divided by ``sae``'s input scale first (SAELens scales activations
    before the step, outside it)."""

    def __init__(self, sae: BatchTopKSAE, aux: bool, lr: float, batch: int, device: torch.device) -> None:
        # imported when used: sae-lens is optional (the peers extra) and takes seconds to import
        from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        self.step_input = TrainStepInput
        cfg = BatchTopKTrainingSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.num_latents, k=sae.cfg.k, device=str(device))
        self.sae = BatchTopKTrainingSAE(cfg).to(device)
        with torch.no_grad():
            for theirs, ours in ((self.sae.W_enc, sae.W_enc.t()), (self.sae.W_dec, sae.W_dec),
                                 (self.sae.b_enc, sae.b_enc), (self.sae.b_dec, sae.b_dec)):
                theirs.copy_(ours)
        self.scale, self.aux, self.steps = float(sae.input_scale), aux, 0
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        # SAETrainer counts steps since a latent fired (dead: more than its window); ours counts vectors
        self.window = max(sae.cfg.dead_after // batch, 1)
        self.held_dead = (sae.tokens_since_fired >= sae.cfg.dead_after).to(device)
        self.since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
        self.act_freq = torch.zeros(sae.num_latents, device=device)

    def __call__(self, x: Tensor) -> Tensor:
        self.since_fired.masked_fill_(self.held_dead, self.window + 1)
        out = self.sae.training_forward_pass(self.step_input(
            sae_in=x / self.scale, coefficients={}, n_training_steps=self.steps, is_logging_step=False,
            dead_neuron_mask=self.since_fired > self.window if self.aux else None))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            self.since_fired += 1
            self.since_fired[firing.sum(-2).bool()] = 0
            self.act_freq += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1
        return out.loss.detach()


def held_dead_step(sae: BatchTopKSAE, x: Tensor, opt: torch.optim.Optimizer, dead_F: Tensor) -> Tensor:
    """:func:`our_step` with the latents of ``dead_F`` dead again before it (as :class:`SAELensStep` holds them)."""
    sae.tokens_since_fired.masked_fill_(dead_F, sae.cfg.dead_after)
    return our_step(sae, x, opt)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Achievable bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.empty(256 * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 10 * 2 * a.numel() * 4 / (time.perf_counter() - t)


def start_sae(vectors: Tensor, d_in: int, expansion: int, k: int, batch: int) -> BatchTopKSAE:
    """The SAE every stepper starts from: initialised on the vectors, 10% of latents marked dead (they revive once
    they fire, after one step at these sizes; :func:`bench_saelens` holds them dead)."""
    torch.manual_seed(0)
    cfg = BatchTopKConfig(d_in=d_in, expansion_factor=expansion, k=k, dead_after=20 * batch, threshold_start=0)
    sae = BatchTopKSAE(cfg)
    sae.initialize(vectors[:8192])
    sae.tokens_since_fired[: sae.num_latents // 10] = cfg.dead_after
    return sae


def sample_batches(vectors: Tensor, batch: int, steps: int, device: torch.device) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [vectors[torch.randint(len(vectors), (batch,), generator=g)].to(device) for _ in range(steps)]


def interleaved(steppers: dict[str, Callable[[Tensor], Tensor]], batches: list[Tensor], rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per round of each stepper over ``batches``, after one warm-up step each; within a round the steppers
    run one after the other, in reverse order every other round (a noisy machine then slows them alike)."""
    for step in steppers.values():
        step(batches[0])
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(rounds):
        for name in (list(steppers) if r % 2 == 0 else list(reversed(steppers))):
            sync(device)
            t = time.perf_counter()
            for x in batches:
                steppers[name](x)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def bench_sae(vectors: Tensor, d_in: int, expansion: int, k: int, batch: int, steps: int, rounds: int,
              device: torch.device) -> dict:
    sae = start_sae(vectors, d_in, expansion, k, batch)
    plain = PlainSAE(sae).to(device)
    sae = sae.to(device).train()
    lr = 2e-4 / (sae.num_latents / 2**14) ** 0.5
    opts = {"ours": torch.optim.Adam(sae.parameters(), lr=lr), "plain": torch.optim.Adam(plain.parameters(), lr=lr)}
    steppers = {"ours": lambda x: our_step(sae, x, opts["ours"]), "plain": lambda x: plain.step(x, opts["plain"])}
    times = interleaved(steppers, sample_batches(vectors, batch, steps, device), rounds, device)
    rate = {n: steps * batch / float(np.median(ts)) for n, ts in times.items()}
    result = {"d_in": d_in, "num_latents": sae.num_latents, "k": k, "batch": batch, "steps_per_round": steps,
              "rounds": rounds, "vectors_per_s": rate, "ratio": rate["ours"] / rate["plain"],
              "round_ratios": [p / o for o, p in zip(times["ours"], times["plain"])]}
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        bytes_per_step = 2 * sae.num_latents * d_in * 4  # W_enc and W_dec, float32, read once
        bound = batch / (bytes_per_step / bw)
        result.update({"copy_bandwidth_GBps": bw / 1e9, "bandwidth_bound_vectors_per_s": bound,
                       "fraction_of_bound": rate["ours"] / bound})
    return result


def bench_saelens(vectors: Tensor, d_in: int, expansion: int, k: int, batch: int, steps: int, rounds: int,
                  device: torch.device) -> dict:
    """Our step against SAELens' (:class:`SAELensStep`), with AuxK and without, all four interleaved."""
    from importlib.metadata import version

    start = start_sae(vectors, d_in, expansion, k, batch)
    dead_F = (start.tokens_since_fired >= start.cfg.dead_after).to(device)
    lr = 2e-4 / (start.num_latents / 2**14) ** 0.5
    steppers = {}
    for aux in (True, False):
        tag = "aux" if aux else "no_aux"
        ours = BatchTopKSAE(dataclasses.replace(start.cfg, aux_coef=start.cfg.aux_coef if aux else 0.0))
        ours.load_state_dict(start.state_dict())
        ours = ours.to(device).train()
        opt = torch.optim.Adam(ours.parameters(), lr=lr)
        steppers[f"ours_{tag}"] = lambda x, ours=ours, opt=opt: held_dead_step(ours, x, opt, dead_F)
        steppers[f"saelens_{tag}"] = SAELensStep(start, aux, lr, batch, device)
    times = interleaved(steppers, sample_batches(vectors, batch, steps, device), rounds, device)
    rate = {n: steps * batch / float(np.median(ts)) for n, ts in times.items()}
    result = {"d_in": d_in, "num_latents": start.num_latents, "k": k, "batch": batch, "steps_per_round": steps,
              "rounds": rounds, "sae_lens": version("sae-lens")}
    for tag in ("aux", "no_aux"):
        ours, theirs = times[f"ours_{tag}"], times[f"saelens_{tag}"]
        result[tag] = {"vectors_per_s": {"ours": rate[f"ours_{tag}"], "saelens": rate[f"saelens_{tag}"]},
                       "ratio": rate[f"ours_{tag}"] / rate[f"saelens_{tag}"],
                       "round_ratios": [t / o for o, t in zip(ours, theirs)],
                       "median_round_ratio": float(np.median([t / o for o, t in zip(ours, theirs)]))}
    return result


def bench_cache(model: str, texts: list[str], words, tags, rounds: int, device: str) -> dict:
    from datamodules.activation_builder import CacheBuilder, Corpus

    corpus = Corpus(texts, words, tags)
    builder = CacheBuilder(model, "token", -1, "mean", False, "drop", 256, "", 64, device, "float16")
    builder.load()
    builder.layers = (builder.model.config.num_hidden_layers,)  # the last layer, as in benchmarks/sae_brown.py
    model_ = builder.model
    idx = range(len(texts))
    tk = builder.tokenize(corpus, idx)
    batches = [(ids.to(device), mask.to(device)) for _, ids, mask in builder.padded_batches(tk["input_ids"])]
    n_vectors = sum(sum(1 for s in sp if not s) for sp in tk["special"])

    @torch.inference_mode()
    def bare():
        for ids, mask in batches:
            model_(input_ids=ids, attention_mask=mask)

    def ours():
        vectors, meta, _ = builder.encode_chunk(corpus, idx)
        assert len(vectors) == n_vectors

    bare(), ours()  # warm-up
    times = {"cache": [], "bare_forward": []}
    for r in range(rounds):
        for name, fn in ((("cache", ours), ("bare_forward", bare)) if r % 2 == 0 else
                         (("bare_forward", bare), ("cache", ours))):
            t = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    rate = {n: n_vectors / float(np.median(ts)) for n, ts in times.items()}
    return {"model": model, "sentences": len(texts), "vectors": n_vectors, "rounds": rounds, "vectors_per_s": rate,
            "ratio": rate["cache"] / rate["bare_forward"],
            "round_ratios": [b / c for c, b in zip(times["cache"], times["bare_forward"])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="an activation cache folder (real vectors for the SAE step)")
    ap.add_argument("--data_root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--d_in", type=int, default=384, help="width of the Gaussian vectors (without --cache)")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="SAE steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sentences", type=int, default=512, help="Brown sentences for the caching benchmark")
    ap.add_argument("--configs", default="8x32,32x64", help="expansion x k pairs")
    ap.add_argument("--skip_cache", action="store_true")
    ap.add_argument("--skip_saelens", action="store_true", help="leave out SAELens' step (timed when installed)")
    add_threads(ap)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae_throughput.json"))
    args = parse(ap)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.batch, args.steps, args.rounds, args.sentences, args.configs = 512, 2, 2, 32, "8x32"

    if args.cache:
        from datamodules.activation_cache import ActivationCache

        cache = ActivationCache(args.cache)
        rows = np.random.default_rng(0).choice(len(cache), min(len(cache), 200_000), replace=False)
        vectors, source = cache.gather(rows), f"cache {Path(args.cache).name} ({len(rows)} vectors)"
    else:
        vectors, source = torch.randn(200_000, args.d_in) * 0.5 + 0.1, f"gaussian ({args.d_in}-d)"
    results = {"device": str(device), "cpu": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "vectors": source, "sae": [],
               "load_average_at_start": os.getloadavg()[0]}  # other processes on the machine: ratios still hold
    for spec in args.configs.split(","):
        expansion, k = map(int, spec.split("x"))
        r = bench_sae(vectors, vectors.shape[1], expansion, k, args.batch, args.steps, args.rounds, device)
        results["sae"].append(r)
        print(f"SAE F={r['num_latents']:>5} k={k:>2} B={args.batch}: ours {r['vectors_per_s']['ours']:9.0f} vec/s, "
              f"plain {r['vectors_per_s']['plain']:9.0f} vec/s, ratio {r['ratio']:.2f} "
              f"(rounds {', '.join(f'{x:.2f}' for x in r['round_ratios'])})"
              + (f", {r['fraction_of_bound']:.2%} of the W_enc+W_dec bandwidth bound" if "fraction_of_bound" in r
                 else ""), flush=True)
    if args.skip_saelens or importlib.util.find_spec("sae_lens") is None:
        results["saelens_skipped"] = ("--skip_saelens" if args.skip_saelens
                                      else "sae-lens is not installed (pip install -e '.[peers]')")
    else:
        results["saelens"] = []
        for spec in args.configs.split(","):
            expansion, k = map(int, spec.split("x"))
            r = bench_saelens(vectors, vectors.shape[1], expansion, k, args.batch, args.steps, args.rounds, device)
            results["saelens"].append(r)
            for tag, what in (("no_aux", "AuxK off"), ("aux", "AuxK on ")):
                v = r[tag]["vectors_per_s"]
                print(f"vs SAELens {r['sae_lens']} F={r['num_latents']:>5} k={k:>2} B={args.batch} {what}: ours "
                      f"{v['ours']:9.0f} vec/s, SAELens {v['saelens']:9.0f} vec/s, ratio {r[tag]['ratio']:.2f} "
                      f"(rounds {', '.join(f'{x:.2f}' for x in r[tag]['round_ratios'])})", flush=True)
    if not args.skip_cache:
        from datamodules.brown import read_brown

        try:
            sents = read_brown(args.data_root, max_sentences=args.sentences)
            texts, words, tags = [s.text for s in sents], [s.words for s in sents], [s.tags for s in sents]
        except Exception as err:  # no shared data: the project's own synthetic sentences
            print(f"Brown unavailable ({err}); using configs/quickstart_data/sentences.txt")
            texts = (ROOT / "configs" / "quickstart_data" / "sentences.txt").read_text().splitlines()[: args.sentences]
            words = tags = None
        r = bench_cache(args.model, texts, words, tags, args.rounds, str(device))
        results["cache"] = r
        print(f"caching {r['vectors']} token vectors of {r['sentences']} sentences: cache "
              f"{r['vectors_per_s']['cache']:.0f} vec/s, bare forward {r['vectors_per_s']['bare_forward']:.0f} vec/s, "
              f"ratio {r['ratio']:.2f} (rounds {', '.join(f'{x:.2f}' for x in r['round_ratios'])})", flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
