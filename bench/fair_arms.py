"""bench_fair.py's arms: the settings each growth arm grows with, the pruning methods, the comparisons they enter.

One record per arm in :data:`ARMS`: ``GrowConfig`` overrides of :func:`base_config` (the protocol's settings), or a
function of the options that returns them; :func:`arm_overrides` resolves them (and the lut arm's profile, channel
multiple and budget).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def channel_multiple(args: argparse.Namespace) -> int | None:
    """``--channel-multiple`` as a number (``auto``: the profile's channel block), the same for every arm."""
    from hwsplit.run.config import GrowConfig, resolve_channel_multiple

    if args.channel_multiple is None:
        return None
    if args.channel_multiple != "auto":
        return int(args.channel_multiple)
    from cost_models.profile_io import load_profile

    path = str(common.resolve(args.profile))
    return resolve_channel_multiple(GrowConfig(cost="lut", cost_options={"profile": path}, channel_multiple="auto"),
                                    load_profile(path))


def base_config(args: argparse.Namespace, seed: int):
    from hwsplit.run.config import GrowConfig

    return GrowConfig(model="mobilenet_v1_cifar", dataset="npz", data_dir=args.data_dir, data_limit=args.limit,
                      test_limit=args.test_limit, val_fraction=args.val_fraction, post_split=args.post_split,
                      seed=seed, stages=args.stages, epochs=args.epochs, seed_epochs=args.seed_epochs, measure=False,
                      batch_size=args.batch_size, channel_multiple=channel_multiple(args),
                      max_widths=None)  # no width ceiling (as before the option existed); the authors arm sets its own


def _authors(args: argparse.Namespace) -> dict:
    from hwsplit.run.config import recipe_settings

    return recipe_settings("authors", {})


def _long(args: argparse.Namespace) -> dict:
    return {"epochs": 2 * args.epochs}


ARMS = {"flops": {}, "vanilla": {"cost": "none"}, "random": {"selection": "random"}, "lut": {"cost": "lut"},
        # the selection recipe of the method's authors (issue 26): √ΔMACs price, group budgets, caps, β >= 0.99
        "authors": _authors,
        # the MACs price, growing in multiples of 4 channels: widths onnxruntime's blocked (NCHWc) kernels take on
        # an AVX-512 CPU (depthwise multiple 4), so the grown network runs as fast as its MACs allow; the CIFAR
        # seed's widths are multiples of 4 already, so it shares the flops arm's trained seed
        "aligned": {"channel_multiple": 4}}

#: Issue 26's one-factor comparisons: one element of the authors' recipe at a time on today's default (the √ΔMACs
#: price; the stage budget split over their two resolution groups; their caps: at most doubling per stage, their
#: width ceilings), and the per-stage training length (twice ``--epochs`` per stage: 10 in the full preset). Each
#: shares the flops arm's trained seed; the description is the fragment's.
ONE_FACTOR_ARMS = {"sqrt": ({"price": "sqrt"}, "√ΔMACs price only"),
                   "groups": ({"group_budgets": "authors"}, "group budgets only"),
                   "caps": ({"max_layer_growth": 1.0, "max_widths": "authors"}, "the authors' caps only"),
                   "long": (_long, "twice the epochs per stage")}
ARMS.update({arm: overrides for arm, (overrides, _) in ONE_FACTOR_ARMS.items()})


#: The settings compared with today's default (the flops arm) on validation at matched MACs (issue 26).
VALIDATION_ARMS = ("authors", "aligned", *ONE_FACTOR_ARMS)


#: The pruning arms (issue 27), steps ``prune-<method>``.
PRUNE_METHODS = ("slimming", "l1")


def lut_multiple(args: argparse.Namespace) -> int:
    """The lut arm's channel multiple when ``--channel-multiple`` is not given (the full preset): the smallest
    multiple that puts every convolution of the profiled CPU on its blocked kernels — the profile's
    ``blocks.depthwise_multiple`` (4 on an AVX-512 CPU, as the ``aligned`` arm), else its ``channel_block``."""
    from cost_models.profile_io import channel_block, depthwise_multiple, load_profile

    profile = load_profile(str(common.resolve(args.profile)))
    return depthwise_multiple(profile) or channel_block(profile)


def lut_budget_ms(args: argparse.Namespace, channel_multiple: int | None) -> float:
    """The lut arm's total budget when ``--channel-multiple`` is not given (the full preset): the table's latency
    (ms) of the widest width multiplier. On a CPU where a channel costs far less latency than its MACs (small
    networks, overhead-bound), a budget of ``growth_ratio`` × the current latency per stage lets every layer grow
    to its per-stage cap; the widest multiplier's latency keeps the arm in the range the widths span and asks the
    user's question: the most accuracy at that latency."""
    import cost_models
    from hwsplit.network.families import build_seed
    from hwsplit.run.baselines import parse_multipliers

    model = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10, width_mult=max(parse_multipliers(args.multipliers)),
                       channel_multiple=channel_multiple)
    lut = cost_models.get_cost_model("lut", profile=str(common.resolve(args.profile)))
    return float(lut.total(model, (1, 3, 32, 32)))


def arm_overrides(arm: str, args: argparse.Namespace) -> dict:
    if arm == "lut":
        extra = {}
        if args.channel_multiple is None:
            n = lut_multiple(args)
            extra = {"channel_multiple": n, "budget": round(lut_budget_ms(args, n), 6)}
        return {**ARMS[arm], "cost_options": {"profile": str(common.resolve(args.profile))}, **extra}
    return ARMS[arm](args) if callable(ARMS[arm]) else ARMS[arm]


GROW_STEPS = ("flops", "random", "vanilla", "lut", "authors", "aligned", *ONE_FACTOR_ARMS)


#: Comparisons at matched measured latency when ``<out>/latency.json`` exists (the full preset's arms; claim 4 has
#: its own): summary key -> (the points' arm, the curve: ``width`` or a pruning method and kind).
LATENCY_COMPARISONS = {"flops_vs_width": ("flops", "width"), "authors_vs_width": ("authors", "width"),
                       "aligned_vs_width": ("aligned", "width"), "lut_vs_width": ("lut", "width"),
                       **{f"flops_vs_prune_{m}{suffix}": ("flops", f"prune-{m}{suffix}") for m in PRUNE_METHODS
                          for suffix in ("", "_retrained")}}
