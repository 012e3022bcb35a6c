"""Neuron groups of a plain nn.Module, found by tracing with torch.fx, and the model's LayerSpecs.

A *neuron group* (docs/design.md §2) is a producer layer P (Conv2d with groups=1, or Linear) together
with everything that is duplicated when one of its output channels is split: the per-channel ops
after it (BatchNorm, an elementwise activation, optionally a depthwise Conv2d → BatchNorm →
activation chain) and the consumers (Conv2d/Linear, possibly behind pooling, flatten or dropout)
whose input column is halved and duplicated. Channels tied by a residual add or a concat, or by an
op this module does not understand, are reported as not splittable with the reason.

Coupling is found here, by tracing; scoring (:mod:`hwsplit.splitting.score`) and surgery
(:mod:`hwsplit.splitting.surgery`) consume the groups and never walk the model themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hwsplit.network.specs import LayerSpec

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# LayerSpecs
# --------------------------------------------------------------------------------------------

def _conv_kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        return "dwconv"
    if conv.groups == 1 and conv.kernel_size == (1, 1):
        return "pwconv"
    return "conv"


def layer_specs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerSpec]:
    """LayerSpecs of every Conv2d and Linear call in one forward pass of a zero input.

    ``input_shape`` includes the batch dimension, e.g. ``(1, 3, 32, 32)``; the batch becomes each
    spec's ``batch``. A module called twice yields two specs. Square kernels, strides and paddings
    are assumed for convolutions (non-square ones raise ``ValueError`` naming the module).
    """
    specs: list[LayerSpec] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0]
        name = names[module]
        if isinstance(module, nn.Conv2d):
            k, s, p = module.kernel_size, module.stride, module.padding
            if isinstance(p, str) or k[0] != k[1] or s[0] != s[1] or p[0] != p[1] or module.dilation != (1, 1):
                raise ValueError(f"{name}: only square, undilated convolutions with numeric padding are priced")
            specs.append(LayerSpec(kind=_conv_kind(module), in_channels=module.in_channels,
                                   out_channels=module.out_channels, kernel=k[0], stride=s[0],
                                   groups=module.groups, height=int(x.shape[-2]), width=int(x.shape[-1]),
                                   batch=int(x.shape[0]), padding=p[0], bias=module.bias is not None, name=name))
        else:
            rows = int(x.numel() // x.shape[-1])
            specs.append(LayerSpec(kind="linear", in_channels=module.in_features, out_channels=module.out_features,
                                   batch=rows, bias=module.bias is not None, name=name))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return specs


# --------------------------------------------------------------------------------------------
# Neuron groups
# --------------------------------------------------------------------------------------------

# Canonical activation names. "Kinked" ones have σ'' = 0 almost everywhere and are scored through
# a smooth surrogate (see hwsplit.splitting.chain.activation_fn).
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu",
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus", nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu", nn.Mish: "mish",
}
_ACT_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish", F.silu: "silu",
    F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.softplus: "softplus", F.elu: "elu", F.leaky_relu: "leaky_relu", F.mish: "mish",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, torch.dropout}
# Ops between a chain's end and its consumers that act on each channel separately and linearly
# (or piecewise linearly, like max pooling): halving a consumer column stays exact behind them.
_POOL_MODULES = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool1d,
                 nn.MaxPool1d, nn.AdaptiveAvgPool1d)
_POOL_FUNCTIONS = {F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool1d,
                   F.max_pool1d, torch.mean}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_ADD_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, torch.add,
            torch.sub, torch.mul}
_ADD_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_CAT_OPS = {torch.cat, torch.concat, torch.stack}
ACTIVATION_KWARGS = ("approximate", "negative_slope", "alpha", "beta", "threshold")


@dataclass(frozen=True)
class ChainOp:
    """One per-channel op after a producer: ``kind`` is "bn", "act", "dwconv" or "identity".

    ``target`` is the module path for module calls (None for functions); ``activation`` the
    canonical activation name ("silu", "relu", ...) with its keyword arguments in ``kwargs``;
    ``node`` the fx node's name (scoring reads the op's output there instead of recomputing it).
    """

    kind: str
    target: str | None = None
    activation: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    node: str = ""


@dataclass(frozen=True)
class Consumer:
    """A layer whose input columns are halved and duplicated when a channel is split.

    ``columns`` is the number of input features that belong to one channel: 1 for a Conv2d or a
    Linear on channel vectors, H·W for a Linear behind a flatten of an H×W map.
    """

    name: str
    columns: int = 1


@dataclass
class NeuronGroup:
    """A producer layer and everything that changes when one of its output channels is split.

    ``name`` (= ``producer``) is the producer's module path. ``chain`` lists the per-channel ops
    from the producer's output to ``a_j`` (docs/design.md §2), ``consumers`` the layers that read it.
    ``input_node``/``output_node`` are the fx node names of the producer's input and of the chain's
    end (where scoring reads x and ∂L/∂a), ``producer_node`` that of the producer's output. Not
    splittable groups carry the ``reason``.
    """

    name: str
    producer: str
    width: int
    fan_in: int
    chain: list[ChainOp] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    splittable: bool = True
    reason: str = ""
    input_node: str = ""
    output_node: str = ""
    producer_node: str = ""

    @property
    def depthwise(self) -> list[str]:
        """Module paths of depthwise convolutions in the chain."""
        return [op.target for op in self.chain if op.kind == "dwconv"]

    @property
    def batchnorms(self) -> list[str]:
        return [op.target for op in self.chain if op.kind == "bn"]

    @property
    def activations(self) -> list[str]:
        return [op.activation for op in self.chain if op.kind == "act"]


class _Tracer(fx.Tracer):
    """Keeps torch.nn's own modules (and anything the user marks) as leaves."""

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx trace of ``model`` sharing its parameters; ``ValueError`` if it is not traceable."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many kinds; the user needs one message
        raise ValueError(
            f"model: {type(model).__name__} cannot be traced by torch.fx ({type(err).__name__}: {err}); "
            "hwsplit needs a forward without data-dependent control flow"
        ) from err
    return fx.GraphModule(model, graph)


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple] | None:
    if node.op == "call_module":
        m = _module_of(gm, node)
        name = _ACT_MODULES.get(type(m))
        if name is None:
            return None
        kwargs = tuple((k, getattr(m, k)) for k in ACTIVATION_KWARGS if hasattr(m, k))
        return name, kwargs
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        if len(node.args) != 1:
            extra = {"leaky_relu": "negative_slope", "elu": "alpha", "softplus": "beta"}
            name = _ACT_FUNCTIONS[node.target]
            if name not in extra or len(node.args) != 2:
                return None
            return name, ((extra[name], node.args[1]),)
        kwargs = tuple((k, v) for k, v in node.kwargs.items() if k in ACTIVATION_KWARGS)
        return _ACT_FUNCTIONS[node.target], kwargs
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target], ()
    return None


def _is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module_of(gm, node), _DROPOUT_MODULES)
    return node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS


def _is_producer_module(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _is_depthwise(m: nn.Module | None, channels: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels == channels
            and m.padding_mode == "zeros")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _chain_op(gm: fx.GraphModule, node: fx.Node, channels: int, dw_seen: bool) -> ChainOp | None:
    m = _module_of(gm, node)
    if isinstance(m, _BN):
        return ChainOp("bn", node.target)
    act = _activation_of(gm, node)
    if act is not None:
        return ChainOp("act", node.target if node.op == "call_module" else None, act[0], act[1])
    if _is_dropout(gm, node):
        return ChainOp("identity", node.target if node.op == "call_module" else None)
    if not dw_seen and _is_depthwise(m, channels):
        return ChainOp("dwconv", node.target)
    return None


def _classify_user(gm: fx.GraphModule, node: fx.Node) -> str:
    """What a node that reads a channel's output does with it: consumer, pass, add, cat, output, other."""
    if node.op == "output":
        return "output"
    m = _module_of(gm, node)
    if _is_producer_module(m):
        return "consumer"
    if isinstance(m, _POOL_MODULES + _DROPOUT_MODULES + (nn.Flatten,)):
        return "pass"
    if node.op == "call_function":
        if node.target in _POOL_FUNCTIONS | _DROPOUT_FUNCTIONS | _RESHAPE_FUNCTIONS:
            return "pass"
        if node.target in _ADD_OPS:
            return "add"
        if node.target in _CAT_OPS:
            return "cat"
    if node.op == "call_method":
        if node.target in _RESHAPE_METHODS | {"mean"}:
            return "pass"
        if node.target in _ADD_METHODS:
            return "add"
    return "other"


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def find_neuron_groups(model: nn.Module, example_input: torch.Tensor) -> list[NeuronGroup]:
    """Trace ``model`` and return its neuron groups (docs/design.md §2), in graph order.

    ``example_input`` is one batch the model accepts (its values do not matter; shapes do). The
    model is run once in eval mode without gradients; its train/eval modes are restored. Groups
    that cannot be split are returned with ``splittable=False`` and a ``reason``.
    """
    gm = trace(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            fx.passes.shape_prop.ShapeProp(gm).propagate(example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode

    call_counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_counts[node.target] = call_counts.get(node.target, 0) + 1

    groups = []
    for node in gm.graph.nodes:
        producer = _module_of(gm, node)
        if not _is_producer_module(producer):
            continue
        groups.append(_group_of(gm, node, producer, call_counts))
    for g in groups:
        if not g.splittable:
            log.debug("%s: not splittable: %s", g.name, g.reason)
    return groups


def _group_of(gm: fx.GraphModule, node: fx.Node, producer: nn.Module,
              call_counts: dict[str, int]) -> NeuronGroup:
    is_conv = isinstance(producer, nn.Conv2d)
    width = producer.out_channels if is_conv else producer.out_features
    fan_in = producer.weight[0].numel()
    group = NeuronGroup(name=node.target, producer=node.target, width=width, fan_in=fan_in,
                        input_node=node.args[0].name if node.args and isinstance(node.args[0], fx.Node) else "",
                        output_node=node.name, producer_node=node.name)

    def refuse(reason: str) -> NeuronGroup:
        group.splittable = False
        group.reason = reason
        group.consumers = []
        return group

    if call_counts[node.target] > 1:
        return refuse("the producer is called more than once (shared weights)")
    if len(node.args) != 1 or node.kwargs:
        return refuse("the producer is called with more than one argument")
    if is_conv and producer.padding_mode != "zeros":
        return refuse(f"padding_mode {producer.padding_mode!r} is not supported")

    # Walk the per-channel chain while each value has exactly one reader.
    end = node
    dw_seen = False
    while len(end.users) == 1:
        (user,) = end.users
        op = _chain_op(gm, user, width, dw_seen)
        if op is None:
            break
        if op.kind == "bn":
            bn = gm.get_submodule(op.target)
            if bn.running_mean is None or bn.num_features != width:
                return refuse(f"{op.target}: BatchNorm without running statistics is not supported")
        if op.kind == "dwconv":
            dw_seen = True
        if op.target is not None and op.kind in ("bn", "dwconv") and call_counts[op.target] > 1:
            return refuse(f"{op.target} is called more than once (shared weights)")
        group.chain.append(dataclasses.replace(op, node=user.name))
        end = user
    group.output_node = end.name

    # Everything that reads the chain's end must be a consumer, possibly behind pooling/flatten.
    end_shape = _shape(end)
    frontier = list(end.users)
    seen: set[str] = set()
    while frontier:
        user = frontier.pop(0)
        if user.name in seen:
            continue
        seen.add(user.name)
        kind = _classify_user(gm, user)
        if kind == "output":
            return refuse("its channels are outputs of the model")
        if kind == "add":
            return refuse(f"its channels are tied by a residual add ({user.name})")
        if kind == "cat":
            return refuse(f"its channels are tied by a concat ({user.name})")
        if kind == "other":
            return refuse(f"its channels feed an unsupported op ({_describe(user)})")
        if kind == "pass":
            out = _shape(user)
            if is_conv and (out is None or out[0] != (end_shape or (None,))[0] or len(out) not in (2, 4)):
                return refuse(f"its channels are reshaped in an unsupported way ({_describe(user)})")
            if not is_conv and (out is None or out[-1] != width):
                # a Linear's channels are the last dim; flattening (N, T, C) interleaves them
                return refuse(f"its channels are reshaped in an unsupported way ({_describe(user)})")
            frontier.extend(user.users)
            continue
        consumer = _module_of(gm, user)
        if call_counts[user.target] > 1:
            return refuse(f"consumer {user.target} is called more than once (shared weights)")
        if len(user.args) != 1 or user.kwargs:
            return refuse(f"consumer {user.target} is called with more than one argument")
        in_shape = _shape(user.args[0])
        if isinstance(consumer, nn.Conv2d):
            if consumer.groups != 1 or not is_conv or in_shape is None or in_shape[1] != width:
                return refuse(f"consumer {user.target} does not read the channels one-to-one")
            group.consumers.append(Consumer(user.target, 1))
        else:
            features = consumer.in_features
            if in_shape is None or (is_conv and len(in_shape) != 2) or features % width:
                return refuse(f"consumer {user.target} does not read the channels one-to-one")
            group.consumers.append(Consumer(user.target, features // width))
    if not group.consumers:
        return refuse("nothing reads its channels")
    return group
