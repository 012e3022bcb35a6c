"""Closed-form activation derivatives of hwsplit/splitting/chain.py against autograd, value by value.

Scoring never differentiates an activation twice through autograd when it knows f' and f'' in closed
form (docs/design.md §2); a wrong factor there changes every splitting index without any error. Each
closed form is checked here against double backward through the scoring activation itself, and the
surrogates against their documented formulas.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hwsplit.splitting.chain import _elementwise_derivatives, _frozen_bn, _Step, activation_derivatives, activation_fn

# softplus_β switches to its linear branch at βx > 20 (torch's threshold), where the surrogates'
# closed forms keep σ(βx) ≈ 1 − 2e-9 (β·2e-9 in f''): hence tolerances of 1e-8 to 1e-7, far below
# the effect of any wrong factor.
# Off the kinks (0, ±3, 6) so that ELU's f'' (a jump at 0) and softplus's linear branch are compared
# where both sides are defined; wide enough that every surrogate's curved part and tails are covered.
X = torch.linspace(-9.0, 9.0, 721, dtype=torch.float64) + 0.0123

CASES = [
    ("relu", {}, 3.0),
    ("relu", {}, 7.0),
    ("relu6", {}, 3.0),
    ("relu6", {}, 1.5),
    ("hardswish", {}, 3.0),
    ("hardswish", {}, 5.0),
    ("leaky_relu", {}, 3.0),
    ("leaky_relu", {"negative_slope": 0.2}, 2.0),
    ("silu", {}, 3.0),
    ("gelu", {}, 3.0),
    ("tanh", {}, 3.0),
    ("sigmoid", {}, 3.0),
    ("elu", {}, 3.0),
    ("elu", {"alpha": 0.4}, 3.0),
    ("softplus", {}, 3.0),
    ("softplus", {"beta": 2.0, "threshold": 5.0}, 3.0),  # x > 2.5 is on the linear branch
]


def autograd_derivatives(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), x, allow_unused=True)[0] if d1.requires_grad else None
    return y.detach(), d1.detach(), (torch.zeros_like(x) if d2 is None else d2.detach())


@pytest.mark.parametrize("name, kwargs, beta", CASES, ids=[f"{n}-{k}-b{b}" for n, k, b in CASES])
def test_closed_form_matches_autograd(name, kwargs, beta):
    derivs = activation_derivatives(name, kwargs, surrogate_beta=beta)
    assert derivs is not None, f"{name} has a closed form"
    f, f1, f2 = derivs(X)
    g, g1, g2 = autograd_derivatives(activation_fn(name, kwargs, surrogate_beta=beta), X)
    torch.testing.assert_close(f, g, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(f1.expand_as(X), g1, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(f2.expand_as(X), g2, rtol=1e-7, atol=1e-7)
    # a value check, not only agreement: f'' is not identically zero on this grid (except nowhere)
    assert g2.abs().max() > 1e-3


def test_surrogates_are_the_documented_formulas():
    """The module docstring's surrogates, written out independently of chain.py."""
    b = 3.0

    def sp(x):
        return torch.log1p(torch.exp(b * x)) / b

    x = torch.linspace(-5, 8, 131, dtype=torch.float64)
    want = {
        "relu": sp(x),
        "relu6": sp(x) - sp(x - 6),
        "hardswish": x * (sp(x + 3) - sp(x - 3)) / 6,
        "leaky_relu": 0.01 * x + 0.99 * sp(x),
    }
    for name, value in want.items():
        torch.testing.assert_close(activation_fn(name, surrogate_beta=b)(x), value, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(activation_fn("leaky_relu", {"negative_slope": 0.3}, surrogate_beta=b)(x),
                               0.3 * x + 0.7 * sp(x), rtol=1e-7, atol=1e-8)
    # hand-checked values of the hardswish surrogate's f'' at 0: (2 q'(0) + 0·q''(0)) / 6, q' = σ(9) − σ(−9)
    _, _, f2 = activation_derivatives("hardswish", surrogate_beta=b)(torch.zeros(1, dtype=torch.float64))
    s = torch.sigmoid(torch.tensor(9.0, dtype=torch.float64))
    assert f2.item() == pytest.approx(2 * (s - (1 - s)).item() / 6, rel=1e-12)


@pytest.mark.parametrize("name, kwargs", [("mish", {}), ("gelu", {"approximate": "tanh"})])
def test_autograd_fallback_where_no_closed_form(name, kwargs):
    """mish and tanh-GELU have no closed form: the chain falls back to autograd, with the same values."""
    assert activation_derivatives(name, kwargs) is None
    fn = activation_fn(name, kwargs)
    h = X.reshape(1, 1, -1)
    value, d1, d2 = _elementwise_derivatives([_Step(fn, None)], h)
    g, g1, g2 = autograd_derivatives(fn, h)
    torch.testing.assert_close((value, d1, d2), (g, g1, g2))
    assert g2.abs().max() > 1e-2


@pytest.mark.parametrize("acts", [("silu",), ("hardswish", "relu6"), ("tanh", "sigmoid", "elu")])
def test_chain_rule_of_composed_steps(acts):
    """E'' of BN → act → BN → act … by the closed-form chain rule equals double backward of the composition."""
    torch.manual_seed(0)
    steps, fns = [], []
    for name in acts:
        bn = torch.nn.BatchNorm2d(3).double().eval()
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        steps += [_frozen_bn(bn), _Step(activation_fn(name), activation_derivatives(name))]
        fns += [bn, activation_fn(name)]
    h = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3

    def composed(t):
        for fn in fns:
            t = fn(t)
        return t

    value, d1, d2 = _elementwise_derivatives(steps, h)
    g, g1, g2 = autograd_derivatives(composed, h)
    torch.testing.assert_close(value, g, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(d1, g1, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(d2, g2, rtol=1e-7, atol=1e-8)


def test_elu_and_softplus_branches_are_exact():
    """At x ≤ 0 ELU's f'' = α eˣ (f'' = 0 above); softplus is linear above threshold/β."""
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64)
    _, f1, f2 = activation_derivatives("elu", {"alpha": 0.5})(x)
    torch.testing.assert_close(f2, torch.tensor([0.5 * torch.e ** -2, 0.5 * torch.e ** -0.5, 0, 0],
                                                dtype=torch.float64))
    torch.testing.assert_close(f1, torch.tensor([0.5 * torch.e ** -2, 0.5 * torch.e ** -0.5, 1, 1],
                                                dtype=torch.float64))
    _, f1, f2 = activation_derivatives("softplus", {"beta": 2.0, "threshold": 3.0})(x)
    s = torch.sigmoid(2 * x)
    torch.testing.assert_close(f1, torch.where(2 * x > 3, 1.0, s))
    torch.testing.assert_close(f2, torch.where(2 * x > 3, 0.0, 2 * s * (1 - s)))
    assert F.softplus(x, beta=2.0, threshold=3.0)[-1].item() == 2.0  # and torch agrees it is linear there
