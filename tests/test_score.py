"""Splitting indices: exact vs an independent brute force, the ε²λ/2 identity, Rayleigh vs exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import batches, synthetic_data, tiny_mobilenet, train_briefly
from scipy.stats import spearmanr

from hwsplit import apply_split, find_neuron_groups, splitting_indices
from hwsplit.splitting.chain import activation_fn

# -- an independent brute force: per-sample Hessians of the composite neuron with torch.func ----

def _chain_end_grads(model, data, groups):
    """x at each producer and ∂L/∂a at each chain end, from hooks on the plain model (no fx)."""
    per_batch = []
    for x, y in data:
        inputs, ends = {}, {}
        handles = []
        for g in groups:
            producer = model.get_submodule(g.producer)
            def keep_input(m, inp, out, name=g.name, inputs=inputs):
                inputs[name] = inp[0].detach()

            handles.append(producer.register_forward_hook(keep_input))
            def keep_end(m, inp, out, name=g.name, ends=ends):
                out.retain_grad()
                ends[name] = out

            handles.append(model.get_submodule(g.chain[-1].target).register_forward_hook(keep_end))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for h in handles:
            h.remove()
        per_batch.append((len(x), {n: (inputs[n], ends[n].grad.detach()) for n in inputs}))
    model.zero_grad(set_to_none=True)
    return per_batch


def _neuron(model, group, j):
    """a_j(θ_j; x): channel j alone through conv, BN, act, depthwise, BN, act (plain tensors)."""
    conv = model.get_submodule(group.producer)
    ops = []
    for op in group.chain:
        m = model.get_submodule(op.target)
        if op.kind == "bn":
            ops.append(lambda h, m=m: (h - m.running_mean[j]) / torch.sqrt(m.running_var[j] + m.eps)
                       * m.weight[j] + m.bias[j])
        elif op.kind == "act":
            ops.append(lambda h, m=m: m(h))
        elif op.kind == "dwconv":
            ops.append(lambda h, m=m: F.conv2d(h[None, None], m.weight[j:j + 1].detach(), None, m.stride,
                                               m.padding)[0, 0])

    def a(theta, x):  # x: one sample (C, H, W)
        h = F.conv2d(x[None], theta[None], None, conv.stride, conv.padding)[0, 0]
        for f in ops:
            h = f(h)
        return h
    return a


def brute_force_S(model, data, group):
    groups = [group]
    recorded = _chain_end_grads(model, data, groups)
    n_total = sum(n for n, _ in recorded)
    w = model.get_submodule(group.producer).weight.detach()
    mats = []
    for j in range(w.shape[0]):
        a = _neuron(model, group, j)
        s = torch.zeros(w[j].numel(), w[j].numel(), dtype=w.dtype)
        for n, rec in recorded:
            x, g = rec[group.name]

            def scalar(theta, xi, gi, j=j, a=a):
                return (gi[j] * a(theta, xi)).sum()
            per_sample = torch.func.vmap(torch.func.hessian(scalar), in_dims=(None, 0, 0))(w[j].detach(), x, g)
            # g is ∂(batch mean loss)/∂a, so Σ over the batch is this batch's estimate of S;
            # weight batches by their size to average over all samples.
            s += per_sample.sum(0).reshape(s.shape) * (n / n_total)
        mats.append(s)
    return torch.stack(mats)


def test_exact_matches_brute_force_hessians(trained_tiny64):
    model, data = trained_tiny64
    data = data[:2]
    scores = splitting_indices(model, data, method="exact")
    groups = {g.name: g for g in find_neuron_groups(model, data[0][0][:2]) if g.splittable}
    for name in ("stem.conv", "blocks.0.pw.conv"):  # both have depthwise chains
        assert groups[name].depthwise
        s = brute_force_S(model, data, groups[name])
        evals, evecs = torch.linalg.eigh(0.5 * (s + s.transpose(1, 2)))
        ours = scores[name].eigenvalues
        rel = (ours - evals[:, 0]).abs().max() / evals[:, 0].abs().max()
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"
        # eigenvectors agree up to sign where the eigenvalue is isolated
        v = scores[name].eigenvectors.flatten(1)
        cos = (v * evecs[:, :, 0]).sum(1).abs()
        gap = evals[:, 1] - evals[:, 0]
        assert (cos[gap > 1e-3 * evals[:, 0].abs().max()] > 0.999).all()


def test_split_changes_loss_by_eps2_lambda_over_2(trained_tiny64):
    """The defining identity (docs/design.md §2), in float64, on a net with depthwise chains."""
    model, data = trained_tiny64
    scores = splitting_indices(model, data, method="exact")

    def loss(m):
        with torch.no_grad():
            return sum(F.cross_entropy(m(x), y, reduction="sum") for x, y in data).item() / sum(len(y) for _, y in data)

    base = loss(model)
    eps = 1e-3
    checked = 0
    for name, score in scores.items():
        j = int(score.eigenvalues.argmin())
        lam = score.eigenvalues[j].item()
        if lam > -1e-4:
            continue
        new = apply_split(model, {name: torch.tensor([j])}, scores, step=eps)
        new.eval()
        measured = loss(new) - base
        predicted = 0.5 * eps**2 * lam
        assert measured == pytest.approx(predicted, rel=0.05), name
        checked += 1
    assert checked >= 3


def test_rayleigh_agrees_with_exact(trained_tiny):
    model, data = trained_tiny
    exact = splitting_indices(model, data, method="exact")
    ritz = splitting_indices(model, data, method="rayleigh", epochs=20, seed=1)  # the default: Rayleigh–Ritz
    fused = splitting_indices(model, data, method="rayleigh", epochs=20, seed=1, ritz_vectors=0)
    separate = splitting_indices(model, data, method="rayleigh", epochs=20, seed=1, eigenvalue_pass=True)
    assert exact.keys() == ritz.keys() == fused.keys()
    for fast in (ritz, fused):
        for name in exact:
            e, r = exact[name].eigenvalues, fast[name].eigenvalues
            rho = spearmanr(e.numpy(), r.numpy())[0]
            assert rho >= 0.9, f"{name}: Spearman {rho:.3f}"
            assert int(e.argmin()) == int(r.argmin()), name
            # a Rayleigh quotient (or Ritz value) over the same data can only be ≥ the minimum eigenvalue
            assert (r >= e - 1e-3 * e.abs().max()).all()
            assert fast[name].eigenvectors.flatten(1).norm(dim=1).sub(1).abs().max() < 1e-5
    for name in exact:
        # once v has converged, the in-pass λ (of the averaged iterate) is close to the fixed-v one
        assert (separate[name].eigenvectors * fused[name].eigenvectors).flatten(1).sum(1).min() > 0.99, name
        gap = (fused[name].eigenvalues - separate[name].eigenvalues).abs().max()
        assert gap < 0.1 * exact[name].eigenvalues.abs().max()


def test_scoring_leaves_model_untouched(trained_tiny):
    model, data = trained_tiny
    model = copy.deepcopy(model).train()
    model.blocks[0].eval()  # a mixed mode must be restored as it was
    before = copy.deepcopy(model.state_dict())
    splitting_indices(model, data[:1], method="rayleigh", epochs=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and not model.blocks[0].training and model.blocks[1].training
    assert all(p.grad is None for p in model.parameters())


class _InplaceNet(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        y = F.relu(y, inplace=True) if self.act.inplace else F.relu(y)
        return self.fc(y.mean((2, 3)))


def test_inplace_activations_do_not_corrupt_scores():
    x, y = synthetic_data(64, resolution=8)
    torch.manual_seed(3)
    a = _InplaceNet(True)
    b = _InplaceNet(False)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    sa = splitting_indices(a, batches(x, y, 32), method="exact")
    sb = splitting_indices(b, batches(x, y, 32), method="exact")
    assert sa.keys() == sb.keys() == {"conv1", "conv2"}
    for k in sa:
        torch.testing.assert_close(sa[k].eigenvalues, sb[k].eigenvalues)
    assert a.act.inplace  # and the user's module is left as it was


def test_relu_is_scored_through_a_documented_surrogate():
    x, y = synthetic_data(64, resolution=8)
    data = batches(x, y, 32)
    model = train_briefly(tiny_mobilenet(activation="relu"), data, epochs=3)
    s3 = splitting_indices(model, data, method="exact")
    s10 = splitting_indices(model, data, method="exact", surrogate_beta=10.0)
    name = "blocks.0.pw.conv"
    assert s3[name].eigenvalues.abs().max() > 0  # σ'' = 0 a.e. would give exactly zero
    assert not torch.allclose(s3[name].eigenvalues, s10[name].eigenvalues)
    t = torch.linspace(-10, 10, 101)
    assert torch.allclose(activation_fn("relu", surrogate_beta=50.0)(t), F.relu(t), atol=0.02)
    assert torch.allclose(activation_fn("relu6", surrogate_beta=50.0)(t), F.relu6(t), atol=0.03)
    assert torch.allclose(activation_fn("hardswish", surrogate_beta=50.0)(t), F.hardswish(t), atol=0.03)
    assert torch.equal(activation_fn("silu")(t), F.silu(t))


def test_mlp_and_bad_arguments():
    from hwsplit import build_model

    torch.manual_seed(0)
    model = build_model("mlp", in_features=12, widths=[7, 5], num_classes=3, batchnorm=True).eval()
    x = torch.randn(40, 12)
    y = torch.randint(0, 3, (40,))
    exact = splitting_indices(model, [(x, y)], method="exact")
    assert set(exact) == {"hidden.0.fc", "hidden.1.fc"}
    assert exact["hidden.0.fc"].eigenvectors.shape == (7, 12)
    with pytest.raises(ValueError, match="method"):
        splitting_indices(model, [(x, y)], method="power")
    with pytest.raises(ValueError, match="epochs"):
        splitting_indices(model, [(x, y)], epochs=0)


def test_affine_only_chains_have_zero_index_without_crashing():
    """A producer followed by BatchNorm alone (MobileNetV2's projections) is linear: S = 0."""
    from hwsplit.splitting.chain import _elementwise_derivatives, _frozen_bn

    bn = nn.BatchNorm2d(3).eval()
    h = torch.randn(2, 3, 4, 4)
    _, d1, d2 = _elementwise_derivatives([_frozen_bn(bn)], h)
    assert torch.all(d2 == 0) and torch.allclose(d1, torch.full_like(h, 1 / (1 + bn.eps) ** 0.5))

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    for method in ("exact", "rayleigh"):
        scores = splitting_indices(net, [(x, y)], method=method)
        assert torch.all(scores["0"].eigenvalues == 0)
        assert scores["2"].eigenvalues.abs().max() > 0


def test_fused_eigenvalue_equals_separate_pass_on_a_fixed_v(trained_tiny):
    """lr = 0 keeps v at its random start: the in-pass estimate over all batches is then the same
    expectation as the separate pass's, and over the last half it is that of half the data."""
    model, data = trained_tiny
    data = data[:4]
    sep = splitting_indices(model, data, lr=0.0, eigenvalue_pass=True)
    full = splitting_indices(model, data, lr=0.0, average_last=1.0, ritz_vectors=0)
    half = splitting_indices(model, data, lr=0.0, ritz_vectors=0)  # default: the last half of the batches
    quotients = splitting_indices(model, data, lr=0.0, average_vectors=False, ritz_vectors=0)
    last = splitting_indices(model, data[2:], lr=0.0, eigenvalue_pass=True)
    for name in sep:
        torch.testing.assert_close(full[name].eigenvectors, sep[name].eigenvectors)
        torch.testing.assert_close(full[name].eigenvalues, sep[name].eigenvalues, rtol=1e-5, atol=1e-7)
        # the last half of the batches is exactly data[2:], whose own expectation it must equal
        torch.testing.assert_close(half[name].eigenvalues, last[name].eigenvalues, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(quotients[name].eigenvalues, last[name].eigenvalues, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(half[name].eigenvalues, sep[name].eigenvalues, rtol=1e-3)
    with pytest.raises(ValueError, match="average_last"):
        splitting_indices(model, data, average_last=0.0)



def test_ritz_quadratic_form_equals_the_hessian_vector_products(trained_tiny):
    """LocalChain.ritz_prepared (forward half of the HVP only) gives Vᵀ S_b V as hvp_prepared does,
    for a plain chain, a depthwise chain and a Linear producer."""
    from hwsplit import build_model
    from hwsplit.network.graph import trace
    from hwsplit.splitting.chain import LocalChain
    from hwsplit.splitting.recording import record_batches

    torch.manual_seed(0)
    mlp = build_model("mlp", in_features=12, widths=[7, 5], num_classes=3, batchnorm=True, activation="silu").eval()
    x = torch.randn(40, 12)
    cases = [(trained_tiny[0], trained_tiny[1][:1]), (mlp, [(x, torch.randint(0, 3, (40,)))])]
    checked = 0
    for model, data in cases:
        model.eval()
        groups = [g for g in find_neuron_groups(model, data[0][0][:2]) if g.splittable]
        batch = next(iter(record_batches(model, trace(model), groups, data, F.cross_entropy, len(data[0][0]), None)))
        for g in groups:
            chain = LocalChain(model, g, surrogate_beta=3.0)
            ctx = batch.prepare(chain)
            basis = torch.randn(3, *chain.weight.shape)
            gram = chain.ritz_prepared(ctx, basis)
            products = [chain.hvp_prepared(ctx, basis[k]) for k in range(3)]
            ref = torch.stack([torch.stack([(basis[i] * products[k]).flatten(1).sum(1) for k in range(3)], -1)
                               for i in range(3)], 1)
            torch.testing.assert_close(gram, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
            checked += 1
    assert checked >= 4


def test_rayleigh_ritz_bounds_and_fixed_subspace(trained_tiny):
    """The Rayleigh–Ritz finish (the default): on a fixed one-vector subspace (lr = 0, one vector) it is
    the separate pass's quotient over the same batches (all of them: the descent's batch is replayed into
    the sum; only the later ones with ``ritz_replay=False``); with more vectors its λ lies between exact
    λ_min of those batches and that quotient; with a basis spanning every direction it is exact."""
    model, data = trained_tiny
    data = data[:4]  # ritz_from = 0.25: batch 0 descends, batches 1-3 (and 0 replayed) accumulate Vᵀ S V
    for replay, scored in ((True, data), (False, data[1:])):
        kw = dict(lr=0.0, ritz_from=0.25, ritz_replay=replay, ritz_allocation="uniform")
        one = splitting_indices(model, data, ritz_vectors=1, **kw)
        separate = splitting_indices(model, scored, lr=0.0, eigenvalue_pass=True)
        three = splitting_indices(model, data, ritz_vectors=3, **kw)
        exact_scored = splitting_indices(model, scored, method="exact")
        for name in one:
            torch.testing.assert_close(one[name].eigenvalues, separate[name].eigenvalues, rtol=1e-4, atol=1e-6)
            cos = (one[name].eigenvectors * separate[name].eigenvectors).flatten(1).sum(1).abs()
            assert (cos > 1 - 1e-5).all(), name
            scale = float(exact_scored[name].eigenvalues.abs().max())
            lam = three[name].eigenvalues
            assert (lam <= one[name].eigenvalues + 1e-5 * scale).all(), name
            assert (lam >= exact_scored[name].eigenvalues - 1e-5 * scale).all(), name
            assert (lam < one[name].eigenvalues - 1e-3 * scale).any(), name
    # ritz_from = 0: every batch in the Rayleigh–Ritz sum; as many random vectors as the fan-in: exact
    d = max(s.eigenvectors[0].numel() for s in one.values())
    full = splitting_indices(model, data, ritz_from=0.0, ritz_vectors=d, ritz_allocation="uniform")
    exact = splitting_indices(model, data, method="exact")
    for name in full:
        scale = float(exact[name].eigenvalues.abs().max())
        torch.testing.assert_close(full[name].eigenvalues, exact[name].eigenvalues, rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="ritz_from"):
        splitting_indices(model, data, ritz_from=1.0)
    with pytest.raises(ValueError, match="ritz_vectors"):
        splitting_indices(model, data, ritz_vectors=-1)
    with pytest.raises(ValueError, match="ritz_allocation"):
        splitting_indices(model, data, ritz_allocation="even")


def test_ritz_vectors_are_allocated_by_cost():
    """b_g = max(b, b·Σc/(√c_g·Σ√c)) within d_g: at least b, more where a vector is cheap; uniform is b (≤ d_g)."""
    from hwsplit.splitting.ritz import allocate_ritz_vectors

    costs = {"stem": 400.0, "mid": 100.0, "late": 36.0, "narrow": 25.0}
    dims = {"stem": 27, "mid": 64, "late": 128, "narrow": 6}
    got = allocate_ritz_vectors(costs, dims, 6)
    # Σc = 561, Σ√c = 41: b·Σc/Σ√c/√c_g = 82.1/√c_g → 4.1 (below b: 6), 8.2, 13.7, 16.4 (capped at d = 6)
    assert got == {"stem": 6, "mid": 8, "late": 14, "narrow": 6}
    many = {"a": 900.0, **{f"g{i}": 100.0 for i in range(20)}}  # a: 3·2900/230/30 = 1.26 → b = 3; others 3.8
    assert allocate_ritz_vectors(many, dict.fromkeys(many, 50), 3) == {"a": 3, **{f"g{i}": 4 for i in range(20)}}
    assert allocate_ritz_vectors(costs, dims, 6, "uniform") == {"stem": 6, "mid": 6, "late": 6, "narrow": 6}
    assert allocate_ritz_vectors(costs, dims, 1) == {"stem": 1, "mid": 1, "late": 2, "narrow": 3}
    equal = allocate_ritz_vectors({"a": 5.0, "b": 5.0}, {"a": 9, "b": 9}, 4)
    assert equal == {"a": 4, "b": 4}  # equal costs: the uniform allocation
    # a group whose vectors cost almost nothing (a Linear head) gets RITZ_MAX_FACTOR·b, not its whole fan-in
    head = allocate_ritz_vectors({"conv": 1e6, "head": 1.0}, {"conv": 50, "head": 4096}, 6)
    assert head == {"conv": 6, "head": 4 * 6}
    with pytest.raises(ValueError, match="ritz_allocation"):
        allocate_ritz_vectors(costs, dims, 6, "even")


def test_splitting_indices_uses_the_allocation_per_group(trained_tiny, monkeypatch):
    """The allocation decides each group's basis: b_g − 1 residuals kept and a basis of b_g columns; it is
    made once per call (on the first batch), and not at all without the Rayleigh–Ritz finish."""
    import hwsplit.splitting.estimators as estimators
    import hwsplit.splitting.score as score

    model, data = trained_tiny
    data = data[:4]  # ritz_from = 0.5: two descent steps, then the Rayleigh–Ritz sum
    calls, bases = [], []
    real_basis = estimators.ritz_basis

    def fake_allocation(costs, dims, vectors, rule="cost"):
        calls.append((vectors, rule))
        names = list(dims)
        return {name: (1 if i == 0 else 3) for i, name in enumerate(names)}

    def spy_basis(v, residuals, size, gen):
        q = real_basis(v, residuals, size, gen)
        bases.append((size, len(residuals), q.shape[2]))  # in the groups' order, as allocated
        return q

    monkeypatch.setattr(estimators, "allocate_ritz_vectors", fake_allocation)
    monkeypatch.setattr(estimators, "ritz_basis", spy_basis)
    scores = score.splitting_indices(model, data, ritz_from=0.5)
    assert calls == [(6, "cost")]
    assert len(bases) == len(scores) >= 2
    assert bases[0] == (1, 0, 1)  # one vector: the iterate, no residual kept
    assert set(bases[1:]) == {(3, 2, 3)}  # three: the iterate and the two descent steps' residuals
    calls.clear()
    score.splitting_indices(model, data, ritz_from=0.5, epochs=2)
    assert len(calls) == 1
    calls.clear()
    score.splitting_indices(model, data, eigenvalue_pass=True)
    score.splitting_indices(model, data, ritz_vectors=0)
    assert calls == []


def test_ritz_cost_counts_the_tangent_work(trained_tiny):
    """LocalChain.ritz_cost: n·P_h·(d + RITZ_ELEMENT_MACS) + n·P_z·(k² + RITZ_ELEMENT_MACS) per sample."""
    from hwsplit.network.graph import find_neuron_groups
    from hwsplit.splitting.chain import RITZ_ELEMENT_MACS, LocalChain

    model, data = trained_tiny
    x = data[0][0]
    inputs = {}
    groups = [g for g in find_neuron_groups(model, x[:2]) if g.splittable]
    hooks = [model.get_submodule(g.producer).register_forward_hook(
        lambda m, i, o, name=g.name: inputs.__setitem__(name, (i[0], o))) for g in groups]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    checked = 0
    for g in groups:
        chain = LocalChain(model, g, surrogate_beta=3.0)
        xin, out = inputs[g.name]
        n, d = chain.weight.shape[0], chain.weight[0].numel()
        expected = n * out[0, 0].numel() * (d + RITZ_ELEMENT_MACS)
        if chain.dw is not None:
            z = chain.dw(torch.zeros_like(out[:1]))
            expected += n * z[0, 0].numel() * (chain.dw.weight[0].numel() + RITZ_ELEMENT_MACS)
            checked += 1
        assert chain.ritz_cost(xin) == pytest.approx(expected), g.name
    assert checked >= 1


def test_depthwise_input_gradient_is_reused_only_where_it_equals_g_s(trained_tiny):
    """The backward pass's ∂L/∂s at the depthwise input stands in for g_s = Lᵀ(g E2'(z)) where the scored
    chain is the network's (SiLU): the prepared products are the same as with g_s computed; with a
    surrogate (ReLU) it is not reused."""
    from hwsplit.network.graph import trace
    from hwsplit.splitting.chain import LocalChain
    from hwsplit.splitting.recording import record_batches

    model, data = trained_tiny
    model.eval()
    groups = [g for g in find_neuron_groups(model, data[0][0][:2]) if g.splittable]
    batch = next(iter(record_batches(model, trace(model), groups, data[:1], F.cross_entropy, len(data[0][0]), None)))
    reused = 0
    for g in groups:
        chain = LocalChain(model, g, surrogate_beta=3.0)
        inter = batch.intermediates[g.name]
        if chain.dw is None:
            assert "gs" not in inter
            continue
        assert "gs" in inter
        computed = {k: v for k, v in inter.items() if k != "gs"}
        with_gs = chain.prepare(batch.inputs[g.name], batch.grads[g.name], **inter)
        without = chain.prepare(batch.inputs[g.name], batch.grads[g.name], **computed)
        torch.testing.assert_close(with_gs["gs_e1_2"], without["gs_e1_2"], rtol=1e-4,
                                   atol=1e-6 * float(without["gs_e1_2"].abs().max()))
        reused += 1
    assert reused >= 2
    relu = tiny_mobilenet(activation="relu").eval()
    relu_groups = [g for g in find_neuron_groups(relu, data[0][0][:2]) if g.splittable]
    batch = next(iter(record_batches(relu, trace(relu), relu_groups, data[:1], F.cross_entropy, len(data[0][0]), None)))
    assert all("gs" not in inter for inter in batch.intermediates.values())


def test_replay_memory_cap_falls_back_to_the_later_batches(trained_tiny, monkeypatch, caplog):
    """With no memory for the replay, the descent's batches are left out of the Rayleigh–Ritz sum: the
    result is ``ritz_replay=False``'s, and the cap is logged once."""
    import logging

    import hwsplit.splitting.estimators as estimators

    model, data = trained_tiny
    data = data[:4]
    off = splitting_indices(model, data, ritz_replay=False)
    monkeypatch.setattr(estimators, "RITZ_REPLAY_BYTES", 0)
    with caplog.at_level(logging.INFO, logger=estimators.log.name):
        capped = splitting_indices(model, data)
    assert sum("not replayed" in r.getMessage() for r in caplog.records) == 1
    for name in off:
        torch.testing.assert_close(capped[name].eigenvalues, off[name].eigenvalues)
