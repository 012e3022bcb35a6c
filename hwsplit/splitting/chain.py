"""The local chain of a neuron group as a function of its producer weight, and its activation calculus.

For a neuron group with producer P and per-channel chain a_j(θ_j; x) (BatchNorm, activation,
optionally depthwise conv → BatchNorm → activation), :class:`LocalChain` computes a(θ; x), the
Hessian-vector product S·V of the scalar ⟨g, a(θ)⟩ with the downstream gradient g held fixed (closed
form, docs/design.md §2) and the Rayleigh–Ritz quadratic forms Vᵀ S V, for every channel at once.

Kinked activations (ReLU, ReLU6, Hardswish, LeakyReLU) have σ'' = 0 almost everywhere; they are
scored through a softplus surrogate of sharpness ``surrogate_beta`` (3, as in the paper's code):
relu → softplus_β(x); relu6 → softplus_β(x) − softplus_β(x − 6); hardswish → x·(softplus_β(x + 3) −
softplus_β(x − 3))/6; leaky_relu(s) → s·x + (1 − s)·softplus_β(x). SiLU, GELU, tanh, sigmoid, ELU,
softplus and mish are used exactly (:func:`activation_fn`, :func:`activation_derivatives`).
BatchNorm is frozen at its running statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hwsplit.network.graph import NeuronGroup

KINKED = ("relu", "relu6", "hardswish", "leaky_relu")

# Per element of the tangents ḣ and ż, the Rayleigh–Ritz forms' elementwise products and b×b sums cost
# about as much as this many multiply-adds of their convolutions: least squares over the 14 groups' measured
# times on the 4× CIFAR seed net, one CPU thread (the forms are memory-bound on maps ≥ 8×8; BENCHMARKS.md,
# "Splitting core").
RITZ_ELEMENT_MACS = 20  # not tuned for GPUs (there the split only shifts vectors between groups)


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
        self.kinked = kinked_activations(group)
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
        """Lᵀ grad: the depthwise conv's input gradient, as a transposed convolution (faster on the CPU than
        ``conv2d_input`` for depthwise kernels: docs/design.md §2)."""
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
        large batch (the CPU's allocator) is the caller's: :meth:`Batch.ritz`.
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


def kinked_activations(group: NeuronGroup) -> list[str]:
    """The chain's activations that are scored through a softplus surrogate (σ'' = 0 almost everywhere)."""
    return [op.activation for op in group.chain if op.kind == "act" and op.activation in KINKED]


def _channel_gram(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ over samples and positions of a_i c a_k per channel: a (N, n, b, ...), c (N, n, ...) → (n, b, b),
    as one batched matmul over (sample, channel) pairs, in a's own layout (no copy), summed over samples
    (the fastest of the forms compared in docs/design.md §2)."""
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


__all__ = ["KINKED", "RITZ_ELEMENT_MACS", "Derivs", "LocalChain", "activation_derivatives", "activation_fn",
           "kinked_activations"]
