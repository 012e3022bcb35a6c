"""Splitting indices: the minimum eigenvalue of each neuron's splitting matrix (docs/design.md §2).

For a neuron group with producer P and per-channel chain a_j(θ_j; x) (BatchNorm, activation,
optionally depthwise conv → BatchNorm → activation), the splitting matrix of channel j is

    S_j = E_x [ Σ_positions ⟨ ∂L/∂a_j , ∇²_θ a_j(θ_j; x) ⟩ ]        (Wu et al. 2019, eq. 4;
                                                                     Wang et al. 2019, §3)

the Hessian in θ = P.weight of the scalar ⟨g, a(θ)⟩ with the downstream gradient g held fixed.
S·V for every channel at once is one Hessian-vector product of that scalar on the local chain
(forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``); it is block-diagonal by
construction because channel j depends only on row j of P.weight.

* ``method="exact"`` accumulates every S_j (n·d² memory) and calls ``torch.linalg.eigh``.
* ``method="rayleigh"`` is the paper's fast method (Wang et al. 2019, §4): minimise the Rayleigh
  quotient R(v) = vᵀSv / vᵀv by stochastic gradient 2(Sv − Rv)/‖v‖² with RMSprop, renormalising
  v after every step; O(n·d) memory. The eigenvalue is estimated in the same pass: by default by a
  Rayleigh–Ritz finish (the descent runs over the first 35 % of the batches, then λ is the smallest
  eigenvalue of Vᵀ S V averaged over every batch, V a frozen subspace per channel of the iterate and
  the descent's last gradients, more vectors where they cost less); optionally from the averaged
  iterate over the last part of the pass, or in one more pass with v fixed.

Kinked activations (ReLU, ReLU6, Hardswish, LeakyReLU) have σ'' = 0 almost everywhere; they are
scored through a softplus surrogate of sharpness ``surrogate_beta`` (3, as in the paper's code):
relu → softplus_β(x); relu6 → softplus_β(x) − softplus_β(x − 6); hardswish → x·(softplus_β(x + 3) −
softplus_β(x − 3))/6; leaky_relu(s) → s·x + (1 − s)·softplus_β(x). SiLU, GELU, tanh, sigmoid, ELU,
softplus and mish are used exactly.

BatchNorm is frozen at its running statistics while scoring. The model's parameters, buffers,
gradients and train/eval modes are exactly as before afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import operator
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hwsplit.infra.distributed import global_sample_count, sum_across_ranks, weighted_mean_across_ranks
from hwsplit.network.graph import NeuronGroup, find_neuron_groups, trace

log = logging.getLogger(__name__)

KINKED = ("relu", "relu6", "hardswish", "leaky_relu")
RITZ_REPLAY_BYTES = 2 << 30  # the recorded descent batches kept for the Rayleigh–Ritz estimate, at most
RITZ_CHUNK_BYTES = 4 << 20  # CPU: the Rayleigh–Ritz quadratic forms run on slices of samples of this size
# Per element of the tangents ḣ and ż, the Rayleigh–Ritz forms' elementwise products and b×b sums cost
# about as much as this many multiply-adds of their convolutions: least squares over the 14 groups' measured
# times on the 4× CIFAR seed net, one CPU thread (issue 13g; the forms are memory-bound on maps ≥ 8×8).
RITZ_ELEMENT_MACS = 20  # not tuned for GPUs (there the split only shifts vectors between groups)
RITZ_MAX_FACTOR = 4  # the cost allocation gives no group more than this many times ritz_vectors
RITZ_ALLOCATIONS = ("cost", "uniform")
METHODS = ("rayleigh", "exact")
#: How a growth step scores: every training image once, or an adaptive subsample (:class:`AdaptiveScoring`).
SCORINGS = ("full", "adaptive")
#: Which negative indices are split candidates: all, or those below 0 beyond their error bar
#: (:func:`significant_scores`).
SPLIT_CANDIDATES = ("all", "significant")


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


def scoring_record(scores: dict[str, SplitScore], cut: Callable[[dict[str, torch.Tensor]], dict[str, Any]], *,
                   mode: str, z: float) -> dict[str, Any]:
    """What a growth step's record says about its scoring call: the ``mode`` (:data:`SCORINGS`), the images
    it read, why it stopped, and, where λ has error bars, how many neurons' side of the knapsack's cut
    (``cut``: λ ↦ t per neuron) is decided at ``z`` standard errors (|λ − t| > z·SE), how many are not, how
    many λ are below zero beyond their error bar (``significant_negative``) and the largest SE (units of
    loss)."""
    first = next(iter(scores.values()), None)
    out: dict[str, Any] = {"mode": mode, "images": first.images if first else 0,
                           "stopped": first.stopped if first else None, "z": z,
                           "decided": None, "undecided": None, "significant_negative": None, "stderr_max": None}
    if not scores or any(s.stderr is None for s in scores.values()):
        return out
    thresholds = cut({k: s.eigenvalues for k, s in scores.items()})
    yes = sum(int(decided(s.eigenvalues, s.stderr, torch.as_tensor(thresholds[k], dtype=s.eigenvalues.dtype),
                          z).sum()) for k, s in scores.items())
    count = sum(len(s) for s in scores.values())
    significant = sum(int((s.eigenvalues + z * s.stderr < 0).sum()) for s in scores.values())
    out.update(decided=yes, undecided=count - yes, significant_negative=significant,
               stderr_max=float(max(float(s.stderr.max()) for s in scores.values())))
    return out


def significant_scores(scores: dict[str, SplitScore], z: float) -> dict[str, SplitScore]:
    """``scores`` with λ set to 0 (not a candidate) where λ + z·SE ≥ 0; eigenvectors unchanged.
    ``ValueError`` for a score without error bars (``stderr`` None)."""
    missing = [k for k, s in scores.items() if s.stderr is None]
    if missing:
        raise ValueError(f"scores: {', '.join(missing)} have no error bars (split_candidates significant needs "
                         "split_method rayleigh with split_vectors >= 1)")
    return {k: dataclasses.replace(s, eigenvalues=torch.where(s.eigenvalues + z * s.stderr < 0, s.eigenvalues,
                                                                torch.zeros_like(s.eigenvalues)))
            for k, s in scores.items()}


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
    :meth:`_BatchMeans.estimate` computes the same across ranks.
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


class _BatchMeans:
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


# --------------------------------------------------------------------------------------------
# The local chain, as pure functions of the producer weight
# --------------------------------------------------------------------------------------------

def activation_fn(name: str, kwargs: dict[str, Any] | None = None, *,
                  surrogate_beta: float = 3.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation used for scoring: exact where σ'' exists, a softplus surrogate where kinked."""
    kw = dict(kwargs or {})
    b = surrogate_beta

    def sp(x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x, beta=b)

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": sp,
        "relu6": lambda x: sp(x) - sp(x - 6.0),
        "hardswish": lambda x: x * (sp(x + 3.0) - sp(x - 3.0)) / 6.0,
        "leaky_relu": lambda x: kw.get("negative_slope", 0.01) * x
        + (1 - kw.get("negative_slope", 0.01)) * sp(x),
        "silu": F.silu,
        "gelu": lambda x: F.gelu(x, approximate=kw.get("approximate", "none")),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "elu": lambda x: F.elu(x, alpha=kw.get("alpha", 1.0)),
        "softplus": lambda x: F.softplus(x, beta=kw.get("beta", 1.0), threshold=kw.get("threshold", 20.0)),
        "mish": F.mish,
    }
    if name not in table:
        raise ValueError(f"activation: no scoring rule for {name!r}")
    return table[name]


Derivs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def activation_derivatives(name: str, kwargs: dict[str, Any] | None = None, *,
                           surrogate_beta: float = 3.0) -> Derivs | None:
    """x ↦ (f(x), f'(x), f''(x)) in closed form for the scoring activation ``name`` (same
    surrogates as :func:`activation_fn`); None where only autograd knows (mish, tanh-GELU)."""
    kw = dict(kwargs or {})
    b = surrogate_beta

    def sp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.sigmoid(b * x)
        return F.softplus(x, beta=b), s, b * s * (1 - s)

    def silu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # f = xσ, f' = σ + xσ(1−σ), f'' = σ(1−σ)(2 + x(1 − 2σ)): few passes over memory (memory-bound on CPU)
        s = torch.sigmoid(x)
        t = torch.addcmul(s, s, s, value=-1.0)
        d2 = torch.rsub(s, 1.0, alpha=2.0).mul_(x).add_(2.0).mul_(t)
        return x * s, torch.addcmul(s, x, t), d2

    def relu6(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (a0, a1, a2), (c0, c1, c2) = sp(x), sp(x - 6.0)
        return a0 - c0, a1 - c1, a2 - c2

    def hardswish(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        (a0, a1, a2), (c0, c1, c2) = sp(x + 3.0), sp(x - 3.0)
        q, q1, q2 = a0 - c0, a1 - c1, a2 - c2
        return x * q / 6.0, (q + x * q1) / 6.0, (2 * q1 + x * q2) / 6.0

    def leaky(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slope = kw.get("negative_slope", 0.01)
        f, f1, f2 = sp(x)
        return slope * x + (1 - slope) * f, slope + (1 - slope) * f1, (1 - slope) * f2

    def gelu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pdf = torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
        cdf = 0.5 * (1 + torch.erf(x / 2 ** 0.5))
        return x * cdf, cdf + x * pdf, pdf * (2 - x * x)

    def tanh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.tanh(x)
        return t, 1 - t * t, -2 * t * (1 - t * t)

    def sigmoid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.sigmoid(x)
        return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)

    def elu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha = kw.get("alpha", 1.0)
        e = alpha * torch.exp(torch.clamp(x, max=0.0))
        neg = x <= 0
        return F.elu(x, alpha=alpha), torch.where(neg, e, torch.ones_like(x)), torch.where(neg, e, torch.zeros_like(x))

    def softplus(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta, threshold = kw.get("beta", 1.0), kw.get("threshold", 20.0)
        s = torch.sigmoid(beta * x)
        linear = beta * x > threshold
        return (F.softplus(x, beta=beta, threshold=threshold), torch.where(linear, torch.ones_like(x), s),
                torch.where(linear, torch.zeros_like(x), beta * s * (1 - s)))

    table: dict[str, Derivs] = {"relu": sp, "relu6": relu6, "hardswish": hardswish, "leaky_relu": leaky,
                                "silu": silu, "tanh": tanh, "sigmoid": sigmoid, "elu": elu, "softplus": softplus}
    if name == "gelu" and kw.get("approximate", "none") == "none":
        return gelu
    return table.get(name)


class _Step:
    """An elementwise map of the chain: its value and, where known, its closed-form derivatives."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], derivs: Derivs | None) -> None:
        self.fn, self.derivs = fn, derivs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class LocalChain:
    """a(θ; x) of one group: producer with weight θ, then its per-channel chain, all frozen.

    The chain is split at its depthwise conv L (if any) into elementwise maps E1 before and E2
    after it: a = E2(L(E1(conv(x, θ)))). The Hessian-vector product of ⟨g, a⟩ is then computed in
    closed form from first and second derivatives of E1, E2 (elementwise) and forward/transposed
    convolutions (no double backward through the network, which is slow for depthwise convs):

        ḣ = conv(x, V);  ż = L(E1'(h) ḣ);  g_s = Lᵀ(g E2'(z))
        ġh = E1'(h) Lᵀ(g E2''(z) ż) + g_s E1''(h) ḣ;   S·V = ∂⟨ġh, conv(x, θ)⟩/∂θ
    """

    def __init__(self, model: nn.Module, group: NeuronGroup, *, surrogate_beta: float) -> None:
        self.group = group
        self.producer = model.get_submodule(group.producer)
        self.pre: list[_Step] = []
        self.post: list[_Step] = []
        self.dw: nn.Conv2d | None = None
        for op in group.chain:
            stage = self.pre if self.dw is None else self.post
            if op.kind == "bn":
                stage.append(_frozen_bn(model.get_submodule(op.target)))
            elif op.kind == "act":
                kw = dict(op.kwargs)
                stage.append(_Step(activation_fn(op.activation, kw, surrogate_beta=surrogate_beta),
                                   activation_derivatives(op.activation, kw, surrogate_beta=surrogate_beta)))
            elif op.kind == "dwconv":
                self.dw = model.get_submodule(op.target)
        self.kinked = _kinked_activations(group)
        # A surrogate before the depthwise conv moves its input off the network's: the recorded
        # depthwise output is then not L(E1(h)) of the scored chain and must be recomputed.
        dw_at = next((i for i, op in enumerate(group.chain) if op.kind == "dwconv"), len(group.chain))
        self.surrogate_before_dw = self.dw is not None and any(
            op.kind == "act" and op.activation in KINKED for op in group.chain[:dw_at])

    @property
    def weight(self) -> torch.Tensor:
        return self.producer.weight.detach()

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: bool) -> torch.Tensor:
        p = self.producer
        b = p.bias.detach() if bias and p.bias is not None else None
        if isinstance(p, nn.Conv2d):
            return F.conv2d(x, weight, b, p.stride, p.padding, p.dilation, 1)
        return F.linear(x, weight, b)

    def _dw(self, s: torch.Tensor, bias: bool) -> torch.Tensor:
        d = self.dw
        b = d.bias.detach() if bias and d.bias is not None else None
        return F.conv2d(s, d.weight.detach(), b, d.stride, d.padding, d.dilation, d.groups)

    def _dw_transposed(self, grad: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """Lᵀ grad: the depthwise conv's input gradient, as a transposed convolution (measured 1.5–4× faster
        on one CPU thread than ``conv2d_input`` for depthwise kernels, 32×32 to 4×4 maps)."""
        d = self.dw
        if not isinstance(d.padding, str):
            k = d.weight.shape[2:]
            extra = [input_shape[2 + i] - ((grad.shape[2 + i] - 1) * d.stride[i] - 2 * d.padding[i]
                                           + d.dilation[i] * (k[i] - 1) + 1) for i in range(2)]
            if all(0 <= e < max(d.stride[i], d.dilation[i]) for i, e in enumerate(extra)):
                return F.conv_transpose2d(grad, d.weight.detach(), None, d.stride, d.padding, tuple(extra),
                                          d.groups, d.dilation)
        return torch.nn.grad.conv2d_input(input_shape, d.weight.detach(), grad, d.stride, d.padding, d.dilation,
                                          d.groups)

    def _weight_grad(self, x: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
        p = self.producer
        if isinstance(p, nn.Conv2d):
            if p.weight.shape[2:] == (1, 1) and p.stride == (1, 1) and p.padding in ((0, 0), "valid"):
                # a pointwise conv's weight gradient is Σ_samples grad_h xᵀ: one batched matmul (measured
                # 1.2–2.4× faster on one CPU thread than conv2d_weight at 32×32 to 8×8 maps)
                return torch.bmm(grad_h.flatten(2), x.flatten(2).transpose(1, 2)).sum(0).reshape(p.weight.shape)
            return torch.nn.grad.conv2d_weight(x, p.weight.shape, grad_h, p.stride, p.padding, p.dilation, 1)
        return grad_h.reshape(-1, grad_h.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    def __call__(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """a(θ; x) for all channels at once (the reference definition of the chain)."""
        h = self._linear(x, weight, True)
        for step in self.pre:
            h = step(h)
        if self.dw is not None:
            h = self._dw(h, True)
            for step in self.post:
                h = step(h)
        return h

    def prepare(self, x: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None = None,
                z: torch.Tensor | None = None, gs: torch.Tensor | None = None) -> dict[str, Any]:
        """Everything S·V needs that does not depend on V, for one batch. ``h`` (producer output) and
        ``z`` (depthwise output), when the forward pass recorded them, are not computed again; nor is
        g_s = Lᵀ(g E2'(z)) when ``gs``, the network's own gradient at the depthwise input, is given
        (equal only where the scored chain is the network's: no surrogate, see :func:`_gradient_names`)."""
        if h is None:
            h = self._linear(x, self.weight, True)
        s, e1, e1_2 = _elementwise_derivatives(self.pre, h)
        ctx: dict[str, Any] = {"x": x, "e1": e1}
        if self.dw is None:
            ctx["w2"] = g * e1_2  # ġh = g E''(h) ḣ
            return ctx
        if z is None or self.surrogate_before_dw:
            z = self._dw(s, True)
        _, e2, e2_2 = _elementwise_derivatives(self.post, z, need_d1=gs is None)
        if gs is None:
            gs = self._dw_transposed(g * e2, s.shape)
        ctx.update(s_shape=s.shape, gz2=g * e2_2, gs_e1_2=gs * e1_2)
        return ctx

    def hvp_prepared(self, ctx: dict[str, Any], tangent: torch.Tensor) -> torch.Tensor:
        x = ctx["x"]
        h_dot = self._linear(x, tangent, False)
        if self.dw is None:
            return self._weight_grad(x, ctx["w2"] * h_dot)
        z_dot = self._dw(ctx["e1"] * h_dot, False)
        gh_dot = ctx["e1"] * self._dw_transposed(ctx["gz2"] * z_dot, ctx["s_shape"]) + ctx["gs_e1_2"] * h_dot
        return self._weight_grad(x, gh_dot)

    def ritz_prepared(self, ctx: dict[str, Any], basis: torch.Tensor) -> torch.Tensor:
        """Vᵀ S V of every channel for a block of b tangents, without S·V: ``basis`` is (b, *weight.shape)
        (vector i of channel j is ``basis[i, j]``); returns (n, b, b).

        The quadratic form needs only the forward half of the Hessian-vector product:
        v_iᵀ S v_k = Σ ḣ_i g E''(h) ḣ_k without a depthwise conv, and with one
        Σ ż_i g E2''(z) ż_k + Σ ḣ_i g_s E1''(h) ḣ_k, ż = L(E1'(h) ḣ), because
        ⟨E1' ḣ_i, Lᵀ(g E2'' ż_k)⟩ = ⟨ż_i, g E2'' ż_k⟩: no transposed convolutions, and the b tangents
        go through the producer (and depthwise) conv as one convolution of b·n channels. Slicing a
        large batch (the CPU's allocator) is the caller's: :meth:`_Batch.ritz`.
        """
        x, b = ctx["x"], basis.shape[0]
        n = basis.shape[1]
        # output channel j·b + i is vector i of channel j: the b tangents of a channel lie side by side
        h_dot = self._linear(x, basis.transpose(0, 1).reshape(n * b, *basis.shape[2:]), False)
        if not isinstance(self.producer, nn.Conv2d):  # (..., n·b): positions first, channels last
            flat = h_dot.reshape(-1, n, b).permute(1, 2, 0)  # (n, b, P)
            c = ctx["w2"].reshape(-1, n).T.unsqueeze(1)
            return (flat * c) @ flat.transpose(1, 2)
        h_dot = h_dot.unflatten(1, (n, b))  # (N, n, b, H, W)
        if self.dw is None:
            return _channel_gram(h_dot, ctx["w2"])
        d = self.dw
        s_dot = (h_dot * ctx["e1"].unsqueeze(2)).flatten(1, 2)
        z_dot = F.conv2d(s_dot, d.weight.detach().repeat_interleave(b, 0), None, d.stride, d.padding, d.dilation,
                         d.groups * b).unflatten(1, (n, b))
        return _channel_gram(z_dot, ctx["gz2"]) + _channel_gram(h_dot, ctx["gs_e1_2"])

    def hvp(self, x: torch.Tensor, g: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
        """S·V for every channel: the Hessian of ⟨g, a(θ)⟩ at θ = P.weight applied to ``tangent``."""
        return self.hvp_prepared(self.prepare(x, g), tangent)

    def ritz_cost(self, x: torch.Tensor) -> float:
        """Work of one Rayleigh–Ritz vector of every channel on one sample of ``x`` (the producer's input), in
        multiply-adds: the producer (and depthwise) convolution of the tangent, plus RITZ_ELEMENT_MACS per
        element of ḣ (and ż) for the elementwise products and b×b sums. From the shapes alone (one sample's
        convolutions give the output positions)."""
        n = self.weight.shape[0]
        with torch.no_grad():
            h = self._linear(x[:1], self.weight, False)
            positions = h.numel() // n
            work = n * positions * (self.weight[0].numel() + RITZ_ELEMENT_MACS)
            if self.dw is not None:
                z_positions = self._dw(h, False).numel() // n
                work += n * z_positions * (self.dw.weight[0].numel() + RITZ_ELEMENT_MACS)
        return float(work)


def _kinked_activations(group: NeuronGroup) -> list[str]:
    """The chain's activations that are scored through a softplus surrogate (σ'' = 0 almost everywhere)."""
    return [op.activation for op in group.chain if op.kind == "act" and op.activation in KINKED]


def _channel_gram(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ over samples and positions of a_i c a_k per channel: a (N, n, b, ...), c (N, n, ...) → (n, b, b),
    as one batched matmul over (sample, channel) pairs, in a's own layout (no copy), summed over samples:
    measured 1.2–2× faster on one CPU thread than one batched matmul over channels of a transposed copy,
    and that 1.5–2.5× faster than b(b+1)/2 multiply-reductions over a's slices."""
    big_n, n, b = a.shape[:3]
    flat = a.reshape(big_n * n, b, -1)
    weights = c.reshape(big_n * n, 1, -1)
    return torch.bmm(flat * weights, flat.transpose(1, 2)).reshape(big_n, n, b, b).sum(0)


def _elementwise_derivatives(steps: list[_Step], h: torch.Tensor, *,
                             need_d1: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """E(h), E'(h), E''(h) of the composition of elementwise maps ``steps`` (BN affine, activations).

    Closed form by the chain rule, (g∘f)'' = g''(f)·f'² + g'(f)·f'', where every step knows its
    derivatives (autograd's double backward through these ops is several times slower);
    autograd otherwise. ``need_d1=False`` may return None for E' (one pass less where only E'' is used).
    """
    if not steps:
        return h, torch.ones_like(h), torch.zeros_like(h)
    if all(step.derivs is not None for step in steps):
        # None stands for the identity's derivatives (d1 = 1, d2 = 0), which need no memory.
        value, d1, d2 = h, None, None
        for i, step in enumerate(steps):
            value, g1, g2 = step.derivs(value)
            if d1 is None:
                d1, d2 = g1, g2
                continue
            new_d2 = g1 * d2 if d2 is not None else None
            if g2 is not None:
                # d1 is often BatchNorm's per-channel scale: square it before it broadcasts
                new_d2 = g2 * (d1 * d1) if new_d2 is None else new_d2.addcmul_(g2, d1 * d1)
            last = i == len(steps) - 1
            d1, d2 = (None if last and not need_d1 else g1 * d1), new_d2
        d1 = d1.expand_as(value) if d1 is not None else None
        return value, d1, (d2 if d2 is not None else torch.zeros_like(value))
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        out = h
        for step in steps:
            out = step(out)
        (d1,) = torch.autograd.grad(out.sum(), h, create_graph=True)
        # An affine chain (BatchNorm alone) has a constant E' that may still carry a graph.
        d2 = torch.autograd.grad(d1.sum(), h, allow_unused=True)[0] if d1.requires_grad else None
        if d2 is None:
            d2 = torch.zeros_like(h)
    return out.detach(), d1.detach(), d2.detach()


def _frozen_bn(bn: nn.Module) -> _Step:
    """BatchNorm at its running statistics: the affine map h ↦ c·h + d per channel."""
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    w = bn.weight.detach() if bn.weight is not None else None
    b = bn.bias.detach() if bn.bias is not None else None
    c = torch.rsqrt(var + bn.eps) * (w if w is not None else 1.0)

    def derivs(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        scale = c.reshape(1, -1, *([1] * (h.dim() - 2)))  # broadcasts; f'' = 0 (None)
        return F.batch_norm(h, mean, var, w, b, False, 0.0, bn.eps), scale, None

    return _Step(lambda h: F.batch_norm(h, mean, var, w, b, False, 0.0, bn.eps), derivs)


def _frozen_dw(dw: nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    w = dw.weight.detach()
    b = dw.bias.detach() if dw.bias is not None else None
    return lambda h: F.conv2d(h, w, b, dw.stride, dw.padding, dw.dilation, dw.groups)


# --------------------------------------------------------------------------------------------
# One forward/backward of the whole network: producer inputs x and chain-end gradients g
# --------------------------------------------------------------------------------------------

_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def _recording_module(gm: fx.GraphModule, keep: list[str]) -> fx.GraphModule:
    """``gm`` rewritten once so that it returns ``(output, (values of the nodes in keep, in order))``,
    with every in-place op made out-of-place, compiled by fx's code generation (plain Python, no
    per-node interpretation). ``gm`` itself is not modified; parameters are shared with it.

    In-place activations (``nn.ReLU(inplace=True)``, ``out += identity``) would otherwise overwrite
    the tensors scoring reads after the forward pass.
    """
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph)
    clones: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op == "call_function":
            node.target = _INPLACE_FUNCTIONS.get(node.target, node.target)
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method":
            if node.target.endswith("_") and not node.target.startswith("_") and hasattr(torch.Tensor,
                                                                                       node.target[:-1]):
                node.target = node.target[:-1]
        elif node.op == "call_module":
            module = new.get_submodule(node.target)
            if getattr(module, "inplace", False) and not list(module.parameters(recurse=False)):
                if node.target not in clones:
                    clone = copy.copy(module)
                    clone.inplace = False
                    clones[node.target] = f"_out_of_place_{len(clones)}"
                    new.add_submodule(clones[node.target], clone)
                node.target = clones[node.target]
    by_name = {n.name: n for n in graph.nodes}
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = ((out_node.args[0], tuple(by_name[k] for k in keep)),)
    graph.lint()
    new.recompile()
    return new


@dataclass
class _Batch:
    weight: float  # share of this batch in the expectation over the data
    inputs: dict[str, torch.Tensor]  # producer input x per group
    grads: dict[str, torch.Tensor]  # ∂L/∂a at the chain end per group
    # per group: producer output h, depthwise output z, gradient g_s at the depthwise input
    intermediates: dict[str, dict[str, torch.Tensor]]
    # per group: LocalChain.prepare's result, where a batch is scored more than once (descent, then replay)
    contexts: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 0  # images in the batch

    def prepare(self, chain: LocalChain, *, keep: bool = False) -> dict[str, Any]:
        """``chain.prepare`` of this batch; with ``keep`` the result is kept for later calls (and
        :meth:`ritz`) in place of the recorded tensors it was made from."""
        name = chain.group.name
        if name in self.contexts:
            return self.contexts[name]
        ctx = chain.prepare(self.inputs[name], self.grads[name], **self.intermediates[name])
        if keep:
            self.contexts[name] = ctx
            self.grads.pop(name)
            self.intermediates.pop(name)
        return ctx

    def ritz(self, chain: LocalChain, basis: torch.Tensor) -> torch.Tensor:
        """Vᵀ S_b V of this batch (``LocalChain.ritz_prepared``); on the CPU prepared and formed on slices
        of samples (every map of the chain is per sample, BatchNorm frozen), so that no temporary of the
        whole batch is allocated: the allocator then reuses memory instead of mapping and zeroing fresh
        pages for each (measured: a 4× network's call 4.4 → 3.5 s)."""
        name = chain.group.name
        kept = self.contexts.get(name)
        x = self.inputs[name]
        tensors = [t for t in kept.values() if isinstance(t, torch.Tensor)] if kept is not None else \
            [x, self.grads[name], *self.intermediates[name].values()]
        per_sample = max(t[0].numel() for t in tensors) * basis.shape[0] * basis.element_size()
        rows = max(1, RITZ_CHUNK_BYTES // max(per_sample, 1)) if x.device.type == "cpu" else x.shape[0]
        total = None
        for start in range(0, x.shape[0], rows):
            part = slice(start, start + rows)
            if kept is not None:  # ritz_prepared reads only the per-sample tensors (not s_shape)
                ctx = {k: (v[part] if isinstance(v, torch.Tensor) else v) for k, v in kept.items()}
            else:
                ctx = chain.prepare(x[part], self.grads[name][part],
                                    **{k: v[part] for k, v in self.intermediates[name].items()})
            gram = chain.ritz_prepared(ctx, basis)
            total = gram if total is None else total.add_(gram)
        return total


def _intermediate_names(group: NeuronGroup) -> dict[str, str]:
    """fx nodes whose forward values scoring reuses: the producer's output and the depthwise conv's."""
    out = {"h": group.producer_node} if group.producer_node else {}
    dw = [op.node for op in group.chain if op.kind == "dwconv" and op.node]
    if dw:
        out["z"] = dw[0]
    return out


def _intermediate_nodes(groups: list[NeuronGroup]) -> set[str]:
    return {n for g in groups for n in _intermediate_names(g).values()}


def _gradient_names(group: NeuronGroup) -> dict[str, str]:
    """fx nodes whose *gradients* scoring reuses: ∂L/∂s at the depthwise conv's input (g_s of
    :class:`LocalChain`), which the backward pass computes anyway and which otherwise costs a transposed
    depthwise convolution per batch. Only where the scored chain is the network's own: with a softplus
    surrogate for a kinked activation, E2' (and z) of the scored chain differ from the network's."""
    at = next((i for i, op in enumerate(group.chain) if op.kind == "dwconv"), None)
    if at is None or _kinked_activations(group):
        return {}
    node = group.chain[at - 1].node if at > 0 else group.producer_node
    return {"gs": node} if node else {}


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _batches(model: nn.Module, gm: fx.GraphModule, groups: list[NeuronGroup], loader: Iterable,
             loss_fn: Callable, total_samples: int, max_batches: int | None,
             stop: Callable[[], bool] | None = None) -> Iterable[_Batch]:
    """One forward and one backward of the network per batch (only down to the chain ends); no more
    batches are read once ``stop()`` is true (checked before each)."""
    device, dtype = _model_device_dtype(model)
    # ∂L/∂s equals g_s only if the depthwise conv is s's one consumer (else other paths add to it)
    users = {node.name: len(node.users) for node in gm.graph.nodes}
    reused = {g.name: {k: n for k, n in _gradient_names(g).items() if users.get(n) == 1} for g in groups}
    grad_nodes = sorted({n for names in reused.values() for n in names.values()})
    keep = sorted({g.input_node for g in groups} | {g.output_node for g in groups} | _intermediate_nodes(groups)
                  | set(grad_nodes))
    recorder = _recording_module(gm, keep)
    # the first non-finite loss and its batch, as tensors: checked once after the pass (no host sync per batch)
    first_bad: torch.Tensor | None = None
    bad_loss: torch.Tensor | None = None
    batches = iter(loader)
    for i in itertools.count():
        if (max_batches is not None and i >= max_batches) or (stop is not None and stop()):
            break
        batch = next(batches, None)
        if batch is None:
            break
        x, y = batch[0], batch[1]
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        y = y.to(device)
        with torch.enable_grad():
            # Requiring grad at the input makes every chain end differentiable even when the
            # model's parameters are frozen; parameter gradients are never computed.
            x.requires_grad_(x.is_floating_point())
            out, kept = recorder(x)
            values = dict(zip(keep, kept))
            loss = loss_fn(out, y)
            bad = torch.where(torch.isfinite(loss), -1, i)
            if first_bad is None:
                first_bad, bad_loss = bad, loss.detach()
            else:
                new_bad = (first_bad < 0) & (bad >= 0)
                first_bad = torch.where(new_bad, bad, first_bad)
                bad_loss = torch.where(new_bad, loss.detach(), bad_loss)
            ends = [values[g.output_node] for g in groups]
            grads = torch.autograd.grad(loss, ends + [values[n] for n in grad_nodes], allow_unused=True)
        by_node = {n: (torch.zeros_like(values[n]) if gr is None else gr.detach())
                   for n, gr in zip(grad_nodes, grads[len(ends):])}
        yield _Batch(
            weight=x.shape[0] / total_samples,
            samples=int(x.shape[0]),
            inputs={g.name: values[g.input_node].detach() for g in groups},
            intermediates={g.name: {**{k: values[n].detach() for k, n in _intermediate_names(g).items()},
                                    **{k: by_node[n] for k, n in reused[g.name].items()}}
                           for g in groups},
            grads={g.name: (torch.zeros_like(e) if gr is None else gr.detach())
                   for g, e, gr in zip(groups, ends, grads)},
        )
    if first_bad is not None and int(first_bad) >= 0:
        raise FloatingPointError(f"scoring: the loss is {float(bad_loss)} at batch {int(first_bad)}")


def _count_samples(loader: Iterable, max_batches: int | None) -> int:
    # this rank's samples per pass (a sharded loader's shard), else the data set's
    size = getattr(loader, "shard_size", getattr(getattr(loader, "batch_sampler", None), "shard_size", None))
    size = getattr(loader, "dataset_size", None) if size is None else size
    if size is None and hasattr(loader, "dataset"):
        try:
            size = len(loader.dataset)
        except TypeError:
            size = None
    if size is None or max_batches is not None:
        size = 0
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            size += batch[0].shape[0]
    if hasattr(loader, "batch_size") and max_batches is not None and loader.batch_size:
        size = min(size, max_batches * loader.batch_size)
    return int(size)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def splitting_indices(
    model: nn.Module,
    loader: Iterable,
    *,
    method: str = "rayleigh",
    epochs: int = 1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    groups: list[NeuronGroup] | None = None,
    lr: float = 0.05,
    alpha: float = 0.9,
    surrogate_beta: float = 3.0,
    seed: int = 0,
    eigenvalue_pass: bool = False,
    average_last: float = 0.5,
    schedule: str = "cosine",
    steps_per_batch: int = 1,
    average_vectors: bool = True,
    ritz_vectors: int = 6,
    ritz_from: float = 0.35,
    ritz_replay: bool = True,
    ritz_allocation: str = "cost",
    max_batches: int | None = None,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
    adaptive: AdaptiveScoring | None = None,
) -> dict[str, SplitScore]:
    """Splitting index λ_min(S_j) and direction v_j of every channel of every splittable group.

    loader yields ``(inputs, targets)`` batches; ``loss_fn(output, targets)`` must return the
    *mean* loss over the batch (default: cross entropy), so that S is an expectation over samples.
    ``method="rayleigh"`` runs ``epochs`` passes of RMSprop (learning rate ``lr``, squared-gradient
    decay ``alpha``) on the Rayleigh quotient (Wang et al. 2019, §4) and estimates λ in the same passes.

    By default (``ritz_vectors`` = b > 0) with a Rayleigh–Ritz finish (Parlett, *The Symmetric
    Eigenvalue Problem*, §11.4; docs/design.md §2): the descent runs over the first ``ritz_from`` share
    (0 ≤ · < 1) of the batches of all passes (at least over all passes but the last); then, per channel,
    the iterate and the descent's last b − 1 gradients (residuals S_b v − (vᵀS_b v) v of successive
    iterates: an approximate Krylov space; random directions where there are fewer) span a fixed
    b-dimensional subspace V, the b×b matrix Vᵀ S V (units of loss) is averaged over every batch of the
    last pass (``ritz_replay=True``: the descent's batches of that pass, kept in memory up to
    RITZ_REPLAY_BYTES, are added once V exists; False: the remaining batches only), and λ is its smallest
    eigenvalue, the direction its Ritz vector, never above the quotient of any vector of V. Each batch
    costs the forward half of b Hessian-vector products. b is per group (:func:`allocate_ritz_vectors`):
    ``ritz_allocation="cost"`` gives every group at least ``ritz_vectors`` and the groups where a vector is
    cheap more (up to the square-root allocation of the same work), ``"uniform"`` gives every group
    ``ritz_vectors``. Measured on the CIFAR-10 seed MobileNetV1 (BENCHMARKS.md, issues 13f/13g): 6 by cost
    and ``ritz_from=0.35`` at one pass.

    ``ritz_vectors=0`` is the earlier one-pass estimate, from the last ``average_last`` share
    (0 < · ≤ 1) of the batches of all passes: the Rayleigh quotient of the averaged iterate
    (``average_vectors=True``) or the mean quotient of the iterates (False).
    ``eigenvalue_pass=True`` estimates λ in one more pass with v fixed instead (one pass more; the
    Rayleigh–Ritz and averaging options are then unused).
    ``schedule`` decays the learning rate over the descent ("cosine", from ``lr`` to 0) or not
    ("constant", the paper's Algorithm 1). ``steps_per_batch`` descent steps reuse each batch's
    forward/backward (each costs one more S·v).
    ``method="exact"`` makes one pass. ``max_batches`` caps each pass. ``device`` moves the model
    there for the call (default: where its parameters are). Returns ``{producer name: SplitScore}``
    with tensors on the CPU.

    With the Rayleigh–Ritz finish every λ has a standard error (``SplitScore.stderr``, units of loss, from
    the batch-to-batch spread of the quotient along its Ritz vector: :func:`ritz_estimate`).
    ``adaptive`` (:class:`AdaptiveScoring`; one pass, Rayleigh–Ritz) reads only as many of the loader's
    batches as the stopping rule needs, between its minimum and its cap; ``SplitScore.images`` is the
    number of images read, ``SplitScore.stopped`` why it stopped.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    if not lr >= 0:
        raise ValueError(f"lr: expected a number >= 0, got {lr!r}")
    if not isinstance(steps_per_batch, int) or steps_per_batch < 1:
        raise ValueError(f"steps_per_batch: expected a positive integer, got {steps_per_batch!r}")
    if not isinstance(ritz_vectors, int) or ritz_vectors < 0:
        raise ValueError(f"ritz_vectors: expected an integer >= 0, got {ritz_vectors!r}")
    if ritz_allocation not in RITZ_ALLOCATIONS:
        raise ValueError(f"ritz_allocation: expected one of {RITZ_ALLOCATIONS}, got {ritz_allocation!r}")
    if not 0 <= ritz_from < 1:
        raise ValueError(f"ritz_from: expected a share in [0, 1), got {ritz_from!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if not 0 < average_last <= 1:
        raise ValueError(f"average_last: expected a share in (0, 1], got {average_last!r}")
    if not surrogate_beta > 0:
        raise ValueError(f"surrogate_beta: expected a positive number, got {surrogate_beta!r}")
    if adaptive is not None:
        if method != "rayleigh" or ritz_vectors < 1 or eigenvalue_pass or epochs != 1:
            raise ValueError("adaptive: needs method='rayleigh' with a Rayleigh–Ritz finish (ritz_vectors >= 1, "
                             "no eigenvalue pass) and epochs=1")
        if not hasattr(loader, "__len__"):
            raise ValueError("adaptive: the loader must have a len() (its cap and minimum are shares of an epoch)")
    loss_fn = loss_fn or F.cross_entropy
    progress = progress or (lambda it, desc, total: it)

    original_device, _ = _model_device_dtype(model)
    if device is not None:
        model.to(device)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        if groups is None:
            first = next(iter(loader))
            device_now, dtype = _model_device_dtype(model)
            groups = find_neuron_groups(model, first[0][:2].to(device=device_now, dtype=dtype))
        groups = [g for g in groups if g.splittable]
        if not groups:
            log.info("no splittable neuron group in %s", type(model).__name__)
            return {}
        # Without a nonlinearity between producer and consumers a_j is linear in θ_j, so S_j = 0:
        # those groups get λ = 0 (never worth splitting) without any computation.
        linear = {g.name: _zero_score(model, g, method) for g in groups if not any(op.kind == "act" for op in g.chain)}
        groups = [g for g in groups if g.name not in linear]
        if not groups:
            return linear
        chains = {g.name: LocalChain(model, g, surrogate_beta=surrogate_beta) for g in groups}
        for name, chain in chains.items():
            if chain.kinked:
                log.info("%s: scoring kinked %s through a softplus surrogate (beta=%g)", name,
                         "/".join(sorted(set(chain.kinked))), surrogate_beta)
        gm = trace(model)
        n_batches = len(loader) if hasattr(loader, "__len__") else None
        if max_batches is not None and n_batches is not None:
            n_batches = min(n_batches, max_batches)
        # all ranks' samples: each rank's batch weights are then shares of the global expectation
        total = global_sample_count(_count_samples(loader, max_batches), n_batches if method == "rayleigh" else None)
        if total == 0:
            raise ValueError("loader: yielded no samples")

        def passes(desc: str, stop: Callable[[], bool] | None = None) -> Iterable[_Batch]:
            return progress(_batches(model, gm, groups, loader, loss_fn, total, max_batches, stop), desc, n_batches)

        start = time.perf_counter()
        if method == "exact":
            scores = _exact(chains, passes)
        else:
            scores = _rayleigh(chains, passes, epochs=epochs, lr=lr, alpha=alpha, seed=seed,
                               eigenvalue_pass=eigenvalue_pass, average_last=average_last, schedule=schedule,
                               steps_per_batch=steps_per_batch, average_vectors=average_vectors,
                               ritz_vectors=ritz_vectors, ritz_from=ritz_from, ritz_replay=ritz_replay,
                               ritz_allocation=ritz_allocation, n_batches=n_batches, adaptive=adaptive)
        images = next(iter(scores.values())).images
        log.info("scored %d neurons in %d groups (%s) on %s images in %.2f s", sum(len(s) for s in scores.values()),
                 len(scores), method, images, time.perf_counter() - start)
        linear = {name: dataclasses.replace(score, images=images) for name, score in linear.items()}
        return {**scores, **linear}
    finally:
        for m, mode in modes.items():
            m.training = mode
        if device is not None:
            model.to(original_device)


def _zero_score(model: nn.Module, group: NeuronGroup, method: str) -> SplitScore:
    w = model.get_submodule(group.producer).weight.detach()
    v = torch.zeros_like(w).flatten(1)
    v[:, 0] = 1.0
    zeros = torch.zeros(w.shape[0], dtype=w.dtype).cpu()
    return SplitScore(zeros, v.reshape(w.shape).cpu(), method, group, stderr=zeros.clone())


def _exact(chains: dict[str, LocalChain], passes: Callable[[str], Iterable[_Batch]]) -> dict[str, SplitScore]:
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


def _rayleigh(chains: dict[str, LocalChain], passes: Callable[[str], Iterable[_Batch]], *, epochs: int,
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
    batch from there on (the descent's replayed), and reading stops when :func:`_adaptive_check` says the
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
    means = _BatchMeans() if ritz else None  # the Rayleigh–Ritz matrices by groups of batches: the error bars
    images = 0
    residuals: dict[str, list[torch.Tensor]] = {name: [] for name in chains}  # the last b_g − 1 gradients, oldest first
    vectors: dict[str, int] | None = None  # b_g per group, from the first batch's shapes
    basis: dict[str, torch.Tensor] | None = None  # per group (n, d, b'), frozen at the switch
    gram: dict[str, torch.Tensor] = {}
    kept: list[_Batch] = []  # the last pass's descent batches, replayed into the Rayleigh–Ritz sum
    kept_bytes, capped = 0, False
    for epoch in range(epochs):
        # share of this pass done after the current batch: by batch count where the loader has a length
        # (the ranks of a sharded loader run in lockstep), else by this process's batch weights
        seen, seen_batches = 0.0, 0
        for batch in passes(f"rayleigh epoch {epoch + 1}/{epochs}",
                            (lambda: stop["now"]) if adaptive is not None else None):
            images += batch.samples
            if ritz and vectors is None:
                vectors = allocate_ritz_vectors(_ritz_costs(chains, batch),
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
                    basis = {name: _ritz_basis(vs[name], residuals[name], vectors[name], gen)
                             for name in chains}
                    gram = {name: torch.zeros(q.shape[0], q.shape[2], q.shape[2], dtype=q.dtype, device=q.device)
                            for name, q in basis.items()}
                    for b in kept:
                        weight_sum += b.weight
                        _add_ritz_gram(gram, chains, basis, b, means)
                    kept = []
                weight_sum += batch.weight
                _add_ritz_gram(gram, chains, basis, batch, means)
                if adaptive is not None:
                    if seen_batches >= cap_batches:
                        stop.update(now=True, why="cap")
                    elif seen_batches >= min_batches and (seen_batches - min_batches) % adaptive.check_every == 0:
                        if _adaptive_check(means, list(chains), adaptive):
                            stop.update(now=True, why="tolerance")
                continue
            if ritz and ritz_replay and epoch == epochs - 1:
                # the descent's batches of the last pass count in the estimate too, once the basis is frozen:
                # λ from all the data (from the last three quarters only, the noise alone caps Spearman's ρ
                # against exact at 0.63 in a 1× group even with exact's own eigenvector)
                size = _batch_bytes(batch)
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


def _add_ritz_gram(gram: dict[str, torch.Tensor], chains: dict[str, LocalChain], basis: dict[str, torch.Tensor],
                   batch: _Batch, means: _BatchMeans | None = None) -> None:
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


def _adaptive_check(means: _BatchMeans, names: list[str], adaptive: AdaptiveScoring) -> bool:
    """The stopping rule of :class:`AdaptiveScoring` on the batches so far: every λ with its SE
    (:meth:`_BatchMeans.estimate`, the same on every rank), the cut's thresholds t, and whether the neurons
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


def _images_across_ranks(images: int, device: torch.device) -> int:
    return int(sum_across_ranks(torch.tensor(float(images), dtype=torch.float64, device=device)))


def _ritz_costs(chains: dict[str, LocalChain], batch: _Batch) -> dict[str, float]:
    """Every group's :meth:`LocalChain.ritz_cost` on this batch's shapes, summed over the ranks (one
    reduction per call), so that every rank allocates the same vectors even where their shapes differ."""
    names = list(chains)
    local = [chains[name].ritz_cost(batch.inputs[name]) for name in names]
    device = chains[names[0]].weight.device
    total = sum_across_ranks(torch.tensor(local, dtype=torch.float64, device=device))
    return dict(zip(names, total.tolist()))


def _batch_bytes(batch: _Batch) -> int:
    tensors = [*batch.inputs.values(), *batch.grads.values(),
               *(t for inter in batch.intermediates.values() for t in inter.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


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


def allocate_ritz_vectors(costs: dict[str, float], dims: dict[str, int], vectors: int,
                          rule: str = "cost") -> dict[str, int]:
    """Rayleigh–Ritz vectors b_g per group for ``vectors`` = b (docs/design.md §2).

    ``"uniform"``: b_g = b. ``"cost"``: b_g = max(b, b·Σ_h c_h / (√c_g · Σ_h √c_h)), rounded, with c_g the
    work of one vector (:meth:`LocalChain.ritz_cost`): the second term is the allocation of the work of b
    vectors everywhere that minimises Σ_g 1/b_g (an error falling like 1/b; a Lagrange multiplier gives
    b_g ∝ c_g^(-1/2)), i.e. more vectors where they are cheap (small maps, late layers); the floor b keeps
    the dear groups (the stem) at the uniform count, because which groups need vectors depends on the
    net (issue 13g: on a CIFAR-10 net after 2 epochs the stem needs 6–8, after 4 epochs 3). Both rules are
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


def _ritz_basis(v: torch.Tensor, residuals: list[torch.Tensor], size: int, gen: torch.Generator) -> torch.Tensor:
    """Per channel, an orthonormal basis (n, d, min(d, size)) of the iterate v and the descent's last
    ``size`` − 1 gradients 2(S_b v − (vᵀS_b v) v), newest first, filled up with random directions (reduced
    QR: its columns are orthonormal even where these vectors are dependent).

    The gradients are residuals of successive iterates on successive batches, so together with v they span
    an approximate Krylov space {v, S v, S² v, …} of the Rayleigh quotient's descent, which is where the
    eigenvector's remaining error lies (docs/design.md §2). Measured on the 4× CIFAR seed net (issue 13):
    Spearman against exact 0.82 worst group / 0.93 median at b = 5, against 0.80 / 0.89 from the iterate,
    its last gradient and the iterates 2 and 4 and 8 steps back."""
    cols = [v.flatten(1)] + [g.flatten(1) for g in reversed(residuals)]
    cols = cols[:size]
    while len(cols) < size:
        cols.append(torch.randn(cols[0].shape, generator=gen, dtype=torch.float64).to(cols[0]))
    q, _ = torch.linalg.qr(torch.stack(cols, 2))
    return q


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


def predicted_loss_change(eigenvalue: float, step: float) -> float:
    """ε²λ/2: the loss change of splitting a neuron with index λ at step ε (docs/design.md §2)."""
    return 0.5 * step * step * eigenvalue


__all__ = ["SCORINGS", "SPLIT_CANDIDATES", "AdaptiveScoring", "LocalChain", "SplitScore", "activation_fn",
           "allocate_ritz_vectors", "decided", "predicted_loss_change", "scoring_record", "significant_scores",
           "splitting_indices"]
