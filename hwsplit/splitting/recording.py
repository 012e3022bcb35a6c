"""The recording pass of scoring: one forward and one backward of the whole network per batch.

The traced model is rewritten once (in-place ops made out-of-place, the kept values returned) and
compiled by fx's code generation (:func:`_recording_module`); :func:`record_batches` yields, per batch, every
group's producer input x, the gradient ∂L/∂a at its chain end and the intermediate values the local
chain reuses (:class:`Batch`), with no host synchronisation per batch (docs/design.md §2).
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from hwsplit.network.graph import NeuronGroup
from hwsplit.splitting.chain import LocalChain, kinked_activations

RITZ_CHUNK_BYTES = 4 << 20  # CPU: the Rayleigh–Ritz quadratic forms run on slices of samples of this size

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
class Batch:
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
        pages for each."""
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
    if at is None or kinked_activations(group):
        return {}
    node = group.chain[at - 1].node if at > 0 else group.producer_node
    return {"gs": node} if node else {}


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def record_batches(model: nn.Module, gm: fx.GraphModule, groups: list[NeuronGroup], loader: Iterable,
             loss_fn: Callable, total_samples: int, max_batches: int | None,
             stop: Callable[[], bool] | None = None) -> Iterable[Batch]:
    """One forward and one backward of the network per batch (only down to the chain ends); no more
    batches are read once ``stop()`` is true (checked before each)."""
    device, dtype = model_device_dtype(model)
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
        yield Batch(
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


def count_samples(loader: Iterable, max_batches: int | None) -> int:
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


def batch_bytes(batch: Batch) -> int:
    tensors = [*batch.inputs.values(), *batch.grads.values(),
               *(t for inter in batch.intermediates.values() for t in inter.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["RITZ_CHUNK_BYTES", "Batch", "batch_bytes", "count_samples", "model_device_dtype", "record_batches"]
