"""The estimators of splitting indices: exact splitting matrices, and the Rayleigh-quotient descent with its
eigenvalue estimates (docs/design.md §2).

* :func:`exact_scores` accumulates every S_j (n·d² memory) and calls ``torch.linalg.eigh``.
* :func:`rayleigh_scores` is the paper's fast method (Wang et al. 2019, §4): minimise the Rayleigh quotient
  R(v) = vᵀSv / vᵀv by stochastic gradient 2(Sv − Rv)/‖v‖² with RMSprop, renormalising v after every
  step; O(n·d) memory. λ is estimated in the same pass: by default by a Rayleigh–Ritz finish
  (:mod:`hwsplit.splitting.ritz`), optionally from the averaged iterate over the last part of the pass,
  or in one more pass with v fixed.

Both read the batches of :mod:`hwsplit.splitting.recording` and return a :class:`SplitScore` per group.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hwsplit.infra.distributed import sum_across_ranks, weighted_mean_across_ranks
from hwsplit.network.graph import NeuronGroup
from hwsplit.splitting.chain import LocalChain
from hwsplit.splitting.recording import Batch, batch_bytes
from hwsplit.splitting.ritz import (
    AdaptiveScoring,
    BatchMeans,
    adaptive_check,
    add_ritz_gram,
    allocate_ritz_vectors,
    ritz_basis,
    ritz_costs,
)

log = logging.getLogger(__name__)


RITZ_REPLAY_BYTES = 2 << 30  # the recorded descent batches kept for the Rayleigh–Ritz estimate, at most


@dataclass
class SplitScore:
    """Splitting indices of one neuron group.

    eigenvalues: (n,) λ_min(S_j) per output channel, in units of loss (a split with step ε changes
    the loss by ε²λ/2). eigenvectors: (n, *producer.weight.shape[1:]), unit norm per channel.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    method: str = "rayleigh"
    group: NeuronGroup | None = None  # the coupling the score was computed for; surgery follows it
    # standard error of each eigenvalue (units of loss), from the batch-to-batch spread of the Rayleigh
    # quotient along its Ritz vector (:func:`ritz_estimate`); None where the method gives none
    stderr: torch.Tensor | None = None
    images: int | None = None  # samples the call read from the loader, over all ranks
    stopped: str | None = None  # adaptive scoring: "tolerance" (the stopping rule) or "cap"; None: every batch

    def __len__(self) -> int:
        return int(self.eigenvalues.numel())


def exact_scores(chains: dict[str, LocalChain], passes: Callable[[str], Iterable[Batch]]) -> dict[str, SplitScore]:
    """Every S_j, column by column: column k of all S_j is S·V with V = e_k in every row."""
    acc: dict[str, torch.Tensor] = {}
    images = 0
    for batch in passes("exact splitting matrices"):
        images += batch.samples
        for name, chain in chains.items():
            w = chain.weight
            n, d = w.shape[0], w[0].numel()
            ctx = batch.prepare(chain)
            if name not in acc:
                acc[name] = torch.zeros(n, d, d, dtype=w.dtype, device=w.device)
            eye = torch.eye(d, dtype=w.dtype, device=w.device)
            for k in range(d):
                tangent = eye[k].expand(n, d).reshape(w.shape)
                acc[name][:, :, k] += batch.weight * chain.hvp_prepared(ctx, tangent).reshape(n, d)
    scores = {}
    images = _images_across_ranks(images, next(iter(acc.values())).device) if acc else 0
    for name, s in acc.items():
        s = sum_across_ranks(s)
        s = 0.5 * (s + s.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(s)
        shape = chains[name].weight.shape
        scores[name] = SplitScore(evals[:, 0].cpu(), evecs[:, :, 0].reshape(shape).cpu(), "exact",
                                  chains[name].group, images=images)
    return scores


def rayleigh_scores(chains: dict[str, LocalChain], passes: Callable[[str], Iterable[Batch]], *, epochs: int,
              lr: float, alpha: float, seed: int, eigenvalue_pass: bool, average_last: float,
              schedule: str = "cosine", steps_per_batch: int = 1, average_vectors: bool = True,
              ritz_vectors: int = 0, ritz_from: float = 0.35, ritz_replay: bool = True,
              ritz_allocation: str = "cost", n_batches: int | None = None,
              adaptive: AdaptiveScoring | None = None, eps: float = 1e-8) -> dict[str, SplitScore]:
    """Stochastic Rayleigh-quotient descent (Wang et al. 2019, §4, Algorithm 1), all groups at once.

    With ``ritz_vectors = b > 0`` (and no eigenvalue pass) the descent runs over the first ``ritz_from`` share
    of all passes, and at least over all but the last pass; then every channel's block V (n·(d×b_g), orthonormal
    columns: the iterate and the last b_g − 1 gradients, random directions where there are fewer; b_g per group
    from :func:`allocate_ritz_vectors` with ``ritz_allocation``, on the first batch's shapes) is frozen,
    T = Σ_b w_b Vᵀ S_b V is accumulated over the remaining batches and, with ``ritz_replay``, the last pass's
    descent batches kept for it (linear in S, so T/Σw is an unbiased estimate of Vᵀ S V given V; the replayed
    batches also chose V, a bias measured to matter less than the noise of leaving them out) and
    λ = λ_min(T/Σw), the direction V y with y its eigenvector: the
    Rayleigh–Ritz approximation of λ_min(S) from the subspace (Parlett, *The Symmetric Eigenvalue Problem*,
    §11.4), never below the minimum eigenvalue of the matrix it is estimated on and never above the quotient of
    any vector in V, the iterate included.

    λ is estimated in the same pass (``eigenvalue_pass=False``) from the batches in the last
    ``average_last`` share of all ``epochs`` passes, using each batch's S_b v with the v of the
    previous step, before this batch moves it (v is then independent of batch b, so S_b v is an
    unbiased estimate of S v):

    * ``average_vectors=True`` (default): the averaged iterate u = Σ_b w_b v_b (Polyak averaging) and
      its product S u ≈ Σ_b w_b S_b v_b, both linear in v; λ = uᵀ(S u)/uᵀu, the direction u/‖u‖.
      The iterate jitters around the eigenvector; u averages the jitter out, and its quotient has
      no upward bias from it.
    * ``average_vectors=False``: λ = Σ_b w_b v_bᵀS_b v_b / Σ_b w_b, the mean quotient of the iterates
      (biased upward while v still moves); the direction is the last iterate.

    With ``eigenvalue_pass=True`` one more pass with the last iterate fixed estimates λ instead.

    ``adaptive`` (one pass, Rayleigh–Ritz): the descent runs over the first ``ritz_from`` share of the
    minimum subsample (``adaptive.min_fraction`` of the ``n_batches``), the Rayleigh–Ritz sum over every
    batch from there on (the descent's replayed), and reading stops when :func:`adaptive_check` says the
    rule holds or at ``adaptive.max_fraction`` of the batches.
    """
    gen = torch.Generator().manual_seed(seed)
    vs: dict[str, torch.Tensor] = {}
    sq: dict[str, torch.Tensor] = {}
    for name, chain in chains.items():
        w = chain.weight
        v = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        vs[name] = _normalise(v)
        sq[name] = torch.zeros_like(w)
    # Per group, over the averaged batches, the only sums formed: Σ w_b v_bᵀS_b v_b and Σ w_b, or
    # Σ w_b v_b and Σ w_b S_b v_b.
    lam_sum = {name: torch.zeros(v.shape[0], dtype=v.dtype, device=v.device) for name, v in vs.items()}
    u_sum = {name: torch.zeros_like(v) for name, v in vs.items()}
    su_sum = {name: torch.zeros_like(v) for name, v in vs.items()}
    weight_sum = 0.0
    ritz = ritz_vectors > 0 and not eigenvalue_pass
    # in passes: the descent's share of all of them, and at least every pass but the last (whose batches
    # then all count in the Rayleigh–Ritz sum, once each)
    ritz_start = max(ritz_from * epochs, epochs - 1.0)
    stop: dict[str, Any] = {"now": False, "why": None}
    if adaptive is not None:
        cap_batches = max(1, math.ceil(adaptive.max_fraction * n_batches - 1e-9))
        min_batches = min(cap_batches, max(2, math.ceil(adaptive.min_fraction * n_batches - 1e-9)))
        ritz_start = min(min_batches - 1, round(ritz_from * min_batches)) / n_batches
    means = BatchMeans() if ritz else None  # the Rayleigh–Ritz matrices by groups of batches: the error bars
    images = 0
    residuals: dict[str, list[torch.Tensor]] = {name: [] for name in chains}  # the last b_g − 1 gradients, oldest first
    vectors: dict[str, int] | None = None  # b_g per group, from the first batch's shapes
    basis: dict[str, torch.Tensor] | None = None  # per group (n, d, b'), frozen at the switch
    gram: dict[str, torch.Tensor] = {}
    kept: list[Batch] = []  # the last pass's descent batches, replayed into the Rayleigh–Ritz sum
    kept_bytes, capped = 0, False
    for epoch in range(epochs):
        # share of this pass done after the current batch: by batch count where the loader has a length
        # (the ranks of a sharded loader run in lockstep), else by this process's batch weights
        seen, seen_batches = 0.0, 0
        for batch in passes(f"rayleigh epoch {epoch + 1}/{epochs}",
                            (lambda: stop["now"]) if adaptive is not None else None):
            images += batch.samples
            if ritz and vectors is None:
                vectors = allocate_ritz_vectors(ritz_costs(chains, batch),
                                                {name: chain.weight[0].numel() for name, chain in chains.items()},
                                                ritz_vectors, ritz_allocation)
                log.info("rayleigh: Rayleigh–Ritz vectors per group (%s): %s", ritz_allocation,
                         ", ".join(f"{name} {b}" for name, b in vectors.items()))
            seen += batch.weight
            done = (seen_batches := seen_batches + 1) / n_batches if n_batches else seen
            share = 1 / n_batches if n_batches else batch.weight
            if ritz and epoch + done > ritz_start + 1e-9:
                # Rayleigh–Ritz: every batch that ends after the descent share, so the last one always counts
                if basis is None:
                    basis = {name: ritz_basis(vs[name], residuals[name], vectors[name], gen)
                             for name in chains}
                    gram = {name: torch.zeros(q.shape[0], q.shape[2], q.shape[2], dtype=q.dtype, device=q.device)
                            for name, q in basis.items()}
                    for b in kept:
                        weight_sum += b.weight
                        add_ritz_gram(gram, chains, basis, b, means)
                    kept = []
                weight_sum += batch.weight
                add_ritz_gram(gram, chains, basis, batch, means)
                if adaptive is not None:
                    if seen_batches >= cap_batches:
                        stop.update(now=True, why="cap")
                    elif seen_batches >= min_batches and (seen_batches - min_batches) % adaptive.check_every == 0:
                        if adaptive_check(means, list(chains), adaptive):
                            stop.update(now=True, why="tolerance")
                continue
            if ritz and ritz_replay and epoch == epochs - 1:
                # the descent's batches of the last pass count in the estimate too, once the basis is frozen:
                # λ from all the data (from the last three quarters only, the noise alone caps Spearman's ρ
                # against exact at 0.63 in a 1× group even with exact's own eigenvector)
                size = batch_bytes(batch)
                if kept_bytes + size <= RITZ_REPLAY_BYTES:
                    kept.append(batch)
                    kept_bytes += size
                elif not capped:
                    capped = True
                    log.info("rayleigh: the descent's batches past %.1f GiB are not replayed into the estimate",
                             RITZ_REPLAY_BYTES / 2 ** 30)
            # every batch that ends inside the last share of all passes, so the last batch always counts
            average = not ritz and not eigenvalue_pass and (epoch + done) / epochs > 1.0 - average_last + 1e-9
            if average:
                weight_sum += batch.weight
            # the rate decays over the descent: all passes, or up to the Rayleigh–Ritz part
            horizon = ritz_start if ritz else epochs
            # a batch's preparations are kept only when several steps or the replay reuse them (memory)
            keep = bool(kept) and kept[-1] is batch
            ctxs = {name: batch.prepare(chain, keep=keep) for name, chain in chains.items()} \
                if steps_per_batch > 1 or keep else None
            for inner in range(steps_per_batch):
                step = lr * _step_factor(schedule, (epoch + done - share + share * inner / steps_per_batch)
                                         / max(horizon, 1e-12))
                # one reduction per step for all groups (the identity with one process)
                svs = weighted_mean_across_ranks(
                    {name: chain.hvp_prepared(ctxs[name] if ctxs else batch.prepare(chain), vs[name])
                     for name, chain in chains.items()}, batch.weight)
                _descent_step(vs, sq, svs, step=step, alpha=alpha, eps=eps,
                              average=batch.weight if average and inner == 0 else 0.0,  # a v not yet moved
                              average_vectors=average_vectors, sums=(u_sum, su_sum, lam_sum),
                              residuals=residuals if ritz else None, vectors=vectors)
    if ritz:
        if basis is None or weight_sum == 0:
            raise ValueError("loader: yielded fewer batches than its len() says; no batch was left for λ")
        device = next(iter(gram.values())).device
        weight_sum = float(sum_across_ranks(torch.tensor(weight_sum, dtype=torch.float64, device=device)))
        images = _images_across_ranks(images, device)
        errors = means.estimate(list(chains))
        out = {}
        for name, chain in chains.items():
            t = sum_across_ranks(gram[name]) / weight_sum
            evals, evecs = torch.linalg.eigh(0.5 * (t + t.transpose(1, 2)))
            v = (basis[name] @ evecs[:, :, :1]).squeeze(2).reshape(chain.weight.shape)
            out[name] = SplitScore(evals[:, 0].cpu(), _normalise(v).cpu(), "rayleigh", chain.group,
                                   stderr=errors[name][2].cpu(), images=images, stopped=stop["why"])
        if adaptive is not None:
            log.info("adaptive scoring: %d images (%s)", images, stop["why"] or "the loader ended")
        return out
    if eigenvalue_pass:
        # λ with v fixed, over one more pass (the batch weights make it an expectation over samples).
        weight_sum = 0.0
        for batch in passes("rayleigh eigenvalues"):
            images += batch.samples
            weight_sum += batch.weight
            for name, chain in chains.items():
                sv = chain.hvp_prepared(batch.prepare(chain), vs[name])
                lam_sum[name].add_(_rowdot(vs[name], sv).flatten(), alpha=batch.weight)
        lam_sum = {name: sum_across_ranks(s) for name, s in lam_sum.items()}
        device = next(iter(lam_sum.values())).device  # NCCL reduces device tensors only
        weight_sum = float(sum_across_ranks(torch.tensor(weight_sum, dtype=torch.float64, device=device)))
    elif weight_sum == 0:
        raise ValueError("loader: yielded fewer batches than its len() says; no batch was averaged for λ")
    images = _images_across_ranks(images, next(iter(vs.values())).device)
    if not eigenvalue_pass and average_vectors:
        # S_b v_b is the ranks' weighted mean already, the same on every rank; the weights cancel
        out = {}
        for name, chain in chains.items():
            u = u_sum[name]
            lam = (_rowdot(u, su_sum[name]) / _rowdot(u, u).clamp_min(1e-30)).flatten()
            out[name] = SplitScore(lam.cpu(), _normalise(u).cpu(), "rayleigh", chain.group, images=images)
        return out
    # In the mean quotient each vᵀS_b v is of the ranks' mean S_b v; divide by the weights averaged.
    return {name: SplitScore((lam_sum[name] / weight_sum).cpu(), vs[name].cpu(), "rayleigh", chain.group,
                             images=images)
            for name, chain in chains.items()}


def _images_across_ranks(images: int, device: torch.device) -> int:
    return int(sum_across_ranks(torch.tensor(float(images), dtype=torch.float64, device=device)))


def _descent_step(vs: dict[str, torch.Tensor], sq: dict[str, torch.Tensor], svs: dict[str, torch.Tensor], *,
                  step: float, alpha: float, eps: float, average: float, average_vectors: bool,
                  sums: tuple[dict, dict, dict], residuals: dict[str, list[torch.Tensor]] | None,
                  vectors: dict[str, int] | None = None) -> None:
    """One RMSprop step on every channel's Rayleigh quotient (Algorithm 1), in place on ``vs``/``sq``.
    ``average`` > 0 (the batch's weight) adds the unmoved v to the λ sums; ``residuals`` keeps each group's
    last ``vectors[group]`` − 1 gradients (for its Rayleigh–Ritz basis of that many vectors)."""
    u_sum, su_sum, lam_sum = sums
    for name, sv in svs.items():
        v = vs[name]
        r = _rowdot(v, sv)
        if average:
            if average_vectors:
                u_sum[name].add_(v, alpha=average)
                su_sum[name].add_(sv, alpha=average)
            else:
                lam_sum[name].add_(r.flatten(), alpha=average)
        grad = 2.0 * (sv - r * v)  # ‖v‖ = 1 after every step
        sq[name].mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        vs[name] = _normalise(v - step * grad / (sq[name].sqrt() + eps))
        if residuals is not None and vectors[name] > 1:
            residuals[name] = (residuals[name] + [grad])[1 - vectors[name]:]


SCHEDULES = ("cosine", "constant")


def _step_factor(schedule: str, progress: float) -> float:
    """Multiplier of the descent's learning rate at ``progress`` ∈ [0, 1) of all passes.

    RMSprop's steps have a fixed size per coordinate whatever the gradient, so at a constant rate v
    keeps jittering around the eigenvector; a cosine decay lets it settle, which the in-pass λ needs.
    """
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-channel dot products, shaped to broadcast against a (n, ...) tensor."""
    return (a * b).flatten(1).sum(1).reshape(-1, *([1] * (a.dim() - 1)))


def _normalise(v: torch.Tensor) -> torch.Tensor:
    norms = v.flatten(1).norm(dim=1).clamp_min(1e-30)
    return v / norms.reshape(-1, *([1] * (v.dim() - 1)))


__all__ = ["RITZ_REPLAY_BYTES", "SCHEDULES", "SplitScore", "exact_scores", "rayleigh_scores"]
