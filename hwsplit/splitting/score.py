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

This module is the public entry (:func:`splitting_indices`, its options :class:`ScoringOptions`) and what a
growth step's record says of a scoring call; the work lives in :mod:`hwsplit.splitting.chain` (the local
chain and its activation calculus), :mod:`hwsplit.splitting.recording` (the fx recording pass),
:mod:`hwsplit.splitting.estimators` (exact scoring, the Rayleigh descent) and :mod:`hwsplit.splitting.ritz`
(the Rayleigh–Ritz finish, error bars and the adaptive stopping rule).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwsplit.infra.distributed import global_sample_count
from hwsplit.network.graph import NeuronGroup, find_neuron_groups, trace
from hwsplit.splitting.chain import LocalChain
from hwsplit.splitting.estimators import SCHEDULES, SplitScore, exact_scores, rayleigh_scores
from hwsplit.splitting.recording import Batch, count_samples, model_device_dtype, record_batches
from hwsplit.splitting.ritz import RITZ_ALLOCATIONS, AdaptiveScoring, decided

log = logging.getLogger(__name__)


METHODS = ("rayleigh", "exact")

#: How a growth step scores: every training image once, or an adaptive subsample (:class:`AdaptiveScoring`).
SCORINGS = ("full", "adaptive")

#: Which negative indices are split candidates: all, or those below 0 beyond their error bar
#: (:func:`significant_scores`).
SPLIT_CANDIDATES = ("all", "significant")


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


@dataclass(frozen=True, kw_only=True)
class ScoringOptions:
    """How :func:`splitting_indices` estimates the indices: the method and its settings (docs/design.md §2).

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
    costs the forward half of b Hessian-vector products. b is per group
    (:func:`~hwsplit.splitting.ritz.allocate_ritz_vectors`): ``ritz_allocation="cost"`` gives every group at
    least ``ritz_vectors`` and the groups where a vector is cheap more (up to the square-root allocation of
    the same work), ``"uniform"`` gives every group ``ritz_vectors``.

    ``ritz_vectors=0`` is the earlier one-pass estimate, from the last ``average_last`` share
    (0 < · ≤ 1) of the batches of all passes: the Rayleigh quotient of the averaged iterate
    (``average_vectors=True``) or the mean quotient of the iterates (False).
    ``eigenvalue_pass=True`` estimates λ in one more pass with v fixed instead (one pass more; the
    Rayleigh–Ritz and averaging options are then unused).
    ``schedule`` decays the learning rate over the descent ("cosine", from ``lr`` to 0) or not
    ("constant", the paper's Algorithm 1). ``steps_per_batch`` descent steps reuse each batch's
    forward/backward (each costs one more S·v). ``seed`` seeds the descent's start and the random
    directions. ``surrogate_beta``: sharpness of the softplus surrogate of kinked activations.
    ``method="exact"`` makes one pass. ``max_batches`` caps each pass.

    ``adaptive`` (:class:`~hwsplit.splitting.ritz.AdaptiveScoring`; one pass, Rayleigh–Ritz) reads only as
    many of the loader's batches as the stopping rule needs, between its minimum and its cap.

    A bad value is a ``ValueError`` naming the field.
    """

    method: str = "rayleigh"
    epochs: int = 1
    lr: float = 0.05
    alpha: float = 0.9
    surrogate_beta: float = 3.0
    seed: int = 0
    eigenvalue_pass: bool = False
    average_last: float = 0.5
    schedule: str = "cosine"
    steps_per_batch: int = 1
    average_vectors: bool = True
    ritz_vectors: int = 6
    ritz_from: float = 0.35
    ritz_replay: bool = True
    ritz_allocation: str = "cost"
    max_batches: int | None = None
    adaptive: AdaptiveScoring | None = None

    def __post_init__(self) -> None:
        method, epochs, lr, steps_per_batch = self.method, self.epochs, self.lr, self.steps_per_batch
        ritz_vectors, ritz_allocation, ritz_from = self.ritz_vectors, self.ritz_allocation, self.ritz_from
        schedule, average_last, surrogate_beta = self.schedule, self.average_last, self.surrogate_beta
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
        if self.adaptive is not None and (method != "rayleigh" or ritz_vectors < 1 or self.eigenvalue_pass
                                          or epochs != 1):
            raise ValueError("adaptive: needs method='rayleigh' with a Rayleigh–Ritz finish (ritz_vectors >= 1, "
                             "no eigenvalue pass) and epochs=1")


def splitting_indices(
    model: nn.Module,
    loader: Iterable,
    options: ScoringOptions | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    groups: list[NeuronGroup] | None = None,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
    **settings: Any,
) -> dict[str, SplitScore]:
    """Splitting index λ_min(S_j) and direction v_j of every channel of every splittable group.

    loader yields ``(inputs, targets)`` batches; ``loss_fn(output, targets)`` must return the
    *mean* loss over the batch (default: cross entropy), so that S is an expectation over samples.
    ``options`` (:class:`ScoringOptions`, default its defaults) says how; its fields may also be given as
    keywords (``splitting_indices(model, loader, ritz_vectors=8)``), which replace those of ``options``.
    ``groups``: the model's neuron groups if already traced (default: traced on the first batch).
    ``device`` moves the model there for the call (default: where its parameters are). ``progress`` wraps
    each pass (tqdm-like). Returns ``{producer name: SplitScore}`` with tensors on the CPU.

    With the Rayleigh–Ritz finish every λ has a standard error (``SplitScore.stderr``, units of loss, from
    the batch-to-batch spread of the quotient along its Ritz vector:
    :func:`~hwsplit.splitting.ritz.ritz_estimate`). With ``adaptive`` (:class:`ScoringOptions`; the loader
    must have a ``len()``) ``SplitScore.images`` is the number of images read, ``SplitScore.stopped`` why
    it stopped. The defaults (6 vectors by cost, ``ritz_from=0.35``, one pass) were chosen by measurement
    (BENCHMARKS.md, "Splitting core").

    The model's parameters, buffers, gradients and train/eval modes are exactly as before afterwards.
    """
    o = dataclasses.replace(options, **settings) if options is not None else ScoringOptions(**settings)
    if o.adaptive is not None and not hasattr(loader, "__len__"):
        raise ValueError("adaptive: the loader must have a len() (its cap and minimum are shares of an epoch)")
    loss_fn = loss_fn or F.cross_entropy
    progress = progress or (lambda it, desc, total: it)

    original_device, _ = model_device_dtype(model)
    if device is not None:
        model.to(device)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        if groups is None:
            first = next(iter(loader))
            device_now, dtype = model_device_dtype(model)
            groups = find_neuron_groups(model, first[0][:2].to(device=device_now, dtype=dtype))
        groups = [g for g in groups if g.splittable]
        if not groups:
            log.info("no splittable neuron group in %s", type(model).__name__)
            return {}
        # Without a nonlinearity between producer and consumers a_j is linear in θ_j, so S_j = 0:
        # those groups get λ = 0 (never worth splitting) without any computation.
        linear = {g.name: _zero_score(model, g, o.method) for g in groups
                  if not any(op.kind == "act" for op in g.chain)}
        groups = [g for g in groups if g.name not in linear]
        if not groups:
            return linear
        chains = {g.name: LocalChain(model, g, surrogate_beta=o.surrogate_beta) for g in groups}
        for name, chain in chains.items():
            if chain.kinked:
                log.info("%s: scoring kinked %s through a softplus surrogate (beta=%g)", name,
                         "/".join(sorted(set(chain.kinked))), o.surrogate_beta)
        gm = trace(model)
        n_batches = len(loader) if hasattr(loader, "__len__") else None
        if o.max_batches is not None and n_batches is not None:
            n_batches = min(n_batches, o.max_batches)
        # all ranks' samples: each rank's batch weights are then shares of the global expectation
        total = global_sample_count(count_samples(loader, o.max_batches),
                                    n_batches if o.method == "rayleigh" else None)
        if total == 0:
            raise ValueError("loader: yielded no samples")

        def passes(desc: str, stop: Callable[[], bool] | None = None) -> Iterable[Batch]:
            return progress(record_batches(model, gm, groups, loader, loss_fn, total, o.max_batches, stop), desc,
                            n_batches)

        start = time.perf_counter()
        if o.method == "exact":
            scores = exact_scores(chains, passes)
        else:
            scores = rayleigh_scores(chains, passes, epochs=o.epochs, lr=o.lr, alpha=o.alpha, seed=o.seed,
                               eigenvalue_pass=o.eigenvalue_pass, average_last=o.average_last, schedule=o.schedule,
                               steps_per_batch=o.steps_per_batch, average_vectors=o.average_vectors,
                               ritz_vectors=o.ritz_vectors, ritz_from=o.ritz_from, ritz_replay=o.ritz_replay,
                               ritz_allocation=o.ritz_allocation, n_batches=n_batches, adaptive=o.adaptive)
        images = next(iter(scores.values())).images
        log.info("scored %d neurons in %d groups (%s) on %s images in %.2f s", sum(len(s) for s in scores.values()),
                 len(scores), o.method, images, time.perf_counter() - start)
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


def predicted_loss_change(eigenvalue: float, step: float) -> float:
    """ε²λ/2: the loss change of splitting a neuron with index λ at step ε (docs/design.md §2)."""
    return 0.5 * step * step * eigenvalue


__all__ = ["METHODS", "SCORINGS", "SPLIT_CANDIDATES", "ScoringOptions", "predicted_loss_change", "scoring_record",
           "significant_scores", "splitting_indices"]
