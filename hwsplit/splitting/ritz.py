"""The Rayleigh–Ritz finish of fast scoring: the subspace, its vectors per group, λ with error bars, and
the adaptive stopping rule (docs/design.md §2).

Per channel, the iterate of the Rayleigh descent and its last gradients span a frozen subspace V
(:func:`ritz_basis`, :func:`allocate_ritz_vectors` vectors per group); λ is the smallest eigenvalue of
Vᵀ S V averaged over the batches (Parlett, *The Symmetric Eigenvalue Problem*, §11.4), and its standard
error the spread of the quotient along the Ritz vector over groups of batches (:func:`ritz_estimate`,
:class:`BatchMeans`). :class:`AdaptiveScoring` stops reading batches once the knapsack's cut is decided
within those error bars.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hwsplit.infra.distributed import sum_across_ranks
from hwsplit.splitting.chain import LocalChain
from hwsplit.splitting.recording import Batch

log = logging.getLogger(__name__)

RITZ_MAX_FACTOR = 4  # the cost allocation gives no group more than this many times ritz_vectors

RITZ_ALLOCATIONS = ("cost", "uniform")


@dataclass(frozen=True)
class AdaptiveScoring:
    """Score on a subsample of the loader's batches whose size the estimate chooses (docs/design.md §2).

    The batches are read in the loader's (shuffled) order: the Rayleigh descent runs on the first
    ``ritz_from`` share of the minimum subsample, then the Rayleigh–Ritz sum grows batch by batch. From
    ``min_fraction`` of an epoch on, every ``check_every`` batches, each neuron's λ gets a standard error SE
    (:func:`ritz_estimate`) and a threshold t from ``cut`` (λ ↦ t per neuron, e.g. the knapsack's cut,
    :func:`hwsplit.splitting.select.knapsack_cut`; None: t = 0, the sign); a neuron is *decided* when
    |λ − t| > z·SE. The call stops when the undecided neurons are at most ``tolerance`` × the neurons
    with λ < t (at least 1), or at ``max_fraction`` of an epoch.
    """

    tolerance: float = 0.05  # undecided neurons allowed, as a share of those below the cut
    z: float = 2.0  # half-width of the error bar, in standard errors
    min_fraction: float = 0.05  # of the loader's batches: read at least this many before the first check
    max_fraction: float = 0.25  # the cap, of the loader's batches
    check_every: int = 4  # batches between checks
    cut: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        checks = {"tolerance": self.tolerance >= 0, "z": self.z > 0,
                  "min_fraction": 0 < self.min_fraction <= 1, "max_fraction": 0 < self.max_fraction <= 1,
                  "check_every": isinstance(self.check_every, int) and self.check_every >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"adaptive.{name}: invalid value {getattr(self, name)!r}")
        if self.min_fraction > self.max_fraction:
            raise ValueError(f"adaptive.min_fraction: {self.min_fraction} is above max_fraction {self.max_fraction}")


def decided(eigenvalues: torch.Tensor, stderr: torch.Tensor, threshold: torch.Tensor | float,
            z: float) -> torch.Tensor:
    """Per neuron, whether its side of ``threshold`` is decided: |λ − t| > z·SE (a boolean tensor)."""
    return (eigenvalues - threshold).abs() > z * stderr


def ritz_estimate(grams: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ, Ritz vector and standard error of λ from per-batch Rayleigh–Ritz matrices (one process).

    ``grams``: (B, n, b, b), batch (or group of batches) k's mean Vᵀ S_k V per channel; ``weights``: (B,)
    their shares (samples). λ = λ_min(T), T = Σ_k w_k G_k / Σ_k w_k, y its unit eigenvector. The error bar
    is that of the quotient along y, q_k = yᵀ G_k y: λ = Σ_k w_k q_k / Σ_k w_k exactly, and to first order
    in the noise of T an eigenvalue moves by yᵀ δT y (its derivative along a symmetric perturbation), so
    the spread of q_k over batches — independent samples of the shuffled data — is λ's:

        SE² = B/(B − 1) · Σ_k w_k² (q_k − λ)² / (Σ_k w_k)²

    Not the spread of per-batch λ_min(G_k): the minimum of a noisy matrix is biased low, more so on a small
    batch. Near a double eigenvalue of T the first order fails and SE understates. Returns (n,), (n, b), (n,).
    :meth:`BatchMeans.estimate` computes the same across ranks.
    """
    w = weights.to(grams.dtype)
    t = torch.einsum("k,knij->nij", w, grams) / w.sum()
    evals, evecs = torch.linalg.eigh(0.5 * (t + t.transpose(1, 2)))
    y = evecs[:, :, 0]
    q = torch.einsum("ni,knij,nj->kn", y, grams, y)
    lam = evals[:, 0]
    count = grams.shape[0]
    var = (w[:, None] ** 2 * (q - lam) ** 2).sum(0) / w.sum() ** 2 * (count / max(count - 1, 1))
    return lam, y, var.sqrt()


class BatchMeans:
    """Σ w_k G_k over consecutive groups of batches (at most 2·``groups`` of them: pairs are merged and the
    group size doubled when there are more), for the error bar of :func:`ritz_estimate`: group means of
    consecutive batches of shuffled data are independent, so the method of batch means applies, and the
    memory stays 2·groups·n·b² per neuron group whatever the number of batches."""

    def __init__(self, groups: int = 32) -> None:
        self.limit, self.size = 2 * groups, 1
        self.sums: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []
        self.counts: list[int] = []

    def add(self, grams: dict[str, torch.Tensor], weight: float) -> None:
        if self.sums and self.counts[-1] < self.size:
            for name, g in grams.items():
                self.sums[-1][name].add_(g, alpha=weight)
            self.weights[-1] += weight
            self.counts[-1] += 1
            return
        self.sums.append({name: g * weight for name, g in grams.items()})
        self.weights.append(weight)
        self.counts.append(1)
        if len(self.sums) > self.limit:  # merge pairs of full groups; the newest (one batch) stays on its own
            pairs = range(0, len(self.sums) - 1, 2)
            merged = [{n: self.sums[i][n].add_(self.sums[i + 1][n]) for n in self.sums[i]} for i in pairs]
            self.sums = merged + self.sums[len(pairs) * 2:]
            self.weights = [self.weights[i] + self.weights[i + 1] for i in pairs] + self.weights[len(pairs) * 2:]
            self.counts = [self.counts[i] + self.counts[i + 1] for i in pairs] + self.counts[len(pairs) * 2:]
            self.size *= 2

    def estimate(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group: λ, Ritz vector y (n, b) and SE over every rank's batches (:func:`ritz_estimate`; the
        sums it needs are reduced across ranks, so every rank gets the same)."""
        out = {}
        for name in names:
            grams = torch.stack([s[name] for s in self.sums])  # Σ w_k G_k of each group
            device, dtype = grams.device, grams.dtype
            w = torch.tensor(self.weights, dtype=torch.float64, device=device)
            total = sum_across_ranks(grams.sum(0))
            w_all = sum_across_ranks(torch.stack([w.sum(), torch.tensor(float(len(self.weights)), dtype=w.dtype,
                                                                             device=device)]))
            t = total / w_all[0].to(dtype)
            evals, evecs = torch.linalg.eigh(0.5 * (t + t.transpose(1, 2)))
            y, lam = evecs[:, :, 0], evals[:, 0]
            q = torch.einsum("ni,knij,nj->kn", y, grams, y) / w.to(dtype)[:, None]  # each group's mean quotient
            w2 = (w.to(dtype) ** 2)[:, None]
            sums = sum_across_ranks(torch.stack([(w2 * q * q).sum(0), (w2 * q).sum(0),
                                                 w2.sum(0).expand_as(lam)]).to(torch.float64))
            count = float(w_all[1])
            lam64 = lam.to(torch.float64)
            spread = (sums[0] - 2 * lam64 * sums[1] + lam64 * lam64 * sums[2]).clamp_min(0.0)
            var = spread / float(w_all[0]) ** 2 * (count / max(count - 1.0, 1.0))
            out[name] = (lam, y, var.sqrt().to(dtype))
        return out


def add_ritz_gram(gram: dict[str, torch.Tensor], chains: dict[str, LocalChain], basis: dict[str, torch.Tensor],
                   batch: Batch, means: BatchMeans | None = None) -> None:
    """gram += w_b Vᵀ S_b V for every group (basis V per group: (n, d, b)); the batch's Vᵀ S_b V also goes
    to ``means`` (for the error bars)."""
    grams = {}
    for name, chain in chains.items():
        q = basis[name]
        block = q.permute(2, 0, 1).reshape(q.shape[2], *chain.weight.shape)
        grams[name] = batch.ritz(chain, block)
        gram[name].add_(grams[name], alpha=batch.weight)
    if means is not None:
        means.add(grams, batch.weight)


def adaptive_check(means: BatchMeans, names: list[str], adaptive: AdaptiveScoring) -> bool:
    """The stopping rule of :class:`AdaptiveScoring` on the batches so far: every λ with its SE
    (:meth:`BatchMeans.estimate`, the same on every rank), the cut's thresholds t, and whether the neurons
    with |λ − t| ≤ z·SE number at most ``tolerance`` × those with λ < t (at least 1)."""
    est = means.estimate(names)
    lam = {name: e[0].cpu() for name, e in est.items()}
    cut = adaptive.cut(lam) if adaptive.cut is not None else None
    undecided = below = 0
    for name, (_, _, se) in est.items():
        t = torch.as_tensor(cut[name], dtype=lam[name].dtype) if cut is not None else torch.zeros_like(lam[name])
        undecided += int((~decided(lam[name], se.cpu(), t, adaptive.z)).sum())
        below += int((lam[name] < t).sum())
    log.debug("adaptive scoring: %d undecided, %d below the cut", undecided, below)
    return undecided <= adaptive.tolerance * max(below, 1)


def ritz_costs(chains: dict[str, LocalChain], batch: Batch) -> dict[str, float]:
    """Every group's :meth:`LocalChain.ritz_cost` on this batch's shapes, summed over the ranks (one
    reduction per call), so that every rank allocates the same vectors even where their shapes differ."""
    names = list(chains)
    local = [chains[name].ritz_cost(batch.inputs[name]) for name in names]
    device = chains[names[0]].weight.device
    total = sum_across_ranks(torch.tensor(local, dtype=torch.float64, device=device))
    return dict(zip(names, total.tolist()))


def allocate_ritz_vectors(costs: dict[str, float], dims: dict[str, int], vectors: int,
                          rule: str = "cost") -> dict[str, int]:
    """Rayleigh–Ritz vectors b_g per group for ``vectors`` = b (docs/design.md §2).

    ``"uniform"``: b_g = b. ``"cost"``: b_g = max(b, b·Σ_h c_h / (√c_g · Σ_h √c_h)), rounded, with c_g the
    work of one vector (:meth:`LocalChain.ritz_cost`): the second term is the allocation of the work of b
    vectors everywhere that minimises Σ_g 1/b_g (an error falling like 1/b; a Lagrange multiplier gives
    b_g ∝ c_g^(-1/2)), i.e. more vectors where they are cheap (small maps, late layers); the floor b keeps
    the dear groups (the stem) at the uniform count, because which groups need vectors depends on the
    net and its training (BENCHMARKS.md, "Splitting core"). Both rules are
    bounded by the fan-in d_g (``dims``: a basis of d_g vectors spans every direction and is exact), and
    "cost" by RITZ_MAX_FACTOR·b: the basis (n·d·b_g), the b×b sums (n·b_g²) and their eigen-solves grow with
    b_g in ways c_g does not count (a Linear head's vectors cost almost nothing to form)."""
    if rule not in RITZ_ALLOCATIONS:
        raise ValueError(f"ritz_allocation: expected one of {RITZ_ALLOCATIONS}, got {rule!r}")
    if rule == "uniform" or vectors == 0:
        return {name: min(vectors, dims[name]) for name in dims}
    total = sum(costs.values())
    roots = sum(math.sqrt(c) for c in costs.values())
    cap = RITZ_MAX_FACTOR * vectors
    return {name: min(dims[name], cap, max(vectors, round(vectors * total / (roots * math.sqrt(costs[name])))))
            for name in dims}


def ritz_basis(v: torch.Tensor, residuals: list[torch.Tensor], size: int, gen: torch.Generator) -> torch.Tensor:
    """Per channel, an orthonormal basis (n, d, min(d, size)) of the iterate v and the descent's last
    ``size`` − 1 gradients 2(S_b v − (vᵀS_b v) v), newest first, filled up with random directions (reduced
    QR: its columns are orthonormal even where these vectors are dependent).

    The gradients are residuals of successive iterates on successive batches, so together with v they span
    an approximate Krylov space {v, S v, S² v, …} of the Rayleigh quotient's descent, which is where the
    eigenvector's remaining error lies (docs/design.md §2; its rank agreement with exact scoring against
    other bases: BENCHMARKS.md, "Splitting core")."""
    cols = [v.flatten(1)] + [g.flatten(1) for g in reversed(residuals)]
    cols = cols[:size]
    while len(cols) < size:
        cols.append(torch.randn(cols[0].shape, generator=gen, dtype=torch.float64).to(cols[0]))
    q, _ = torch.linalg.qr(torch.stack(cols, 2))
    return q


__all__ = ["RITZ_ALLOCATIONS", "RITZ_MAX_FACTOR", "AdaptiveScoring", "BatchMeans", "adaptive_check", "add_ritz_gram",
           "allocate_ritz_vectors", "decided", "ritz_basis", "ritz_costs", "ritz_estimate"]
