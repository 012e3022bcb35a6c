"""Issue 11: the backend's channel block, repeatable measurement, layers timed in context."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cost_models.context import ContextFit, device_terms, padded, weight_elems
from cost_models.predictor import TERMS, LayerRegressor
from cost_models.profile_io import ProfileError, channel_block, validate_profile
from cost_models.profiling.channel_block import NCHWC_DOMAIN, detect_channel_block, optimized_graph, probe_net
from cost_models.profiling.grid import aligned_architecture, make_divisible
from cost_models.profiling.measure import measure_rounds, repeatability
from cost_models.profiling.meters import Measurement, Stats
from cost_models.profiling.node_trace import attribute_nodes, parse_trace
from hwsplit.network.specs import LayerSpec

# -- the channel block, from a real onnxruntime session ---------------------------------------------

def test_block_detection_explains_what_onnxruntime_runs() -> None:
    found = detect_channel_block(channels=(20, 24, 50))
    block = found["channel_block"]
    assert block >= 1 and block & (block - 1) == 0  # a power of two
    blocked = [(e["channels"], c["weight"][0]) for e in found["evidence"] for c in e["convs"] if c["blocked"]]
    assert all(p == padded(c, block) for c, p in blocked)
    if block > 1:  # a blocked backend: the 24-channel net runs in the NCHWc domain
        nodes = optimized_graph(probe_net(24), torch.zeros(1, 3, 8, 8))
        assert any(n["domain"] == NCHWC_DOMAIN for n in nodes)
        # 50 is not a multiple of the depthwise granularity: that depthwise conv fell back
        assert found["depthwise_multiple"] in (2, 4, 8, 16) and 50 % found["depthwise_multiple"] != 0


def test_padding_and_make_divisible() -> None:
    assert [padded(c, 16) for c in (1, 16, 17, 30)] == [16, 16, 32, 32]
    assert padded(30, 1) == 30
    assert [make_divisible(w, 16) for w in (8, 20, 24, 30, 100)] == [16, 32, 32, 32, 96]
    arch = {"stem_width": 12, "widths": [20, 33]}
    assert aligned_architecture(arch, 8) == {"stem_width": 16, "widths": [24, 32]}


def test_profile_channel_block_field() -> None:
    base = {"schema": "hwsplit.profile/1", "device": {}, "backend": "onnxruntime", "meter": "latency", "batch": 1,
            "rows": []}
    assert channel_block(validate_profile(dict(base))) == 1
    assert channel_block(validate_profile({**base, "channel_block": 16})) == 16
    with pytest.raises(ProfileError, match="channel_block"):
        validate_profile({**base, "channel_block": 0})


# -- repeatability ------------------------------------------------------------------------------------

class FakeMeter:
    """Returns the next median of ``medians`` per call (an injected noise pattern)."""

    def __init__(self, medians: list[float]) -> None:
        self.medians = list(medians)
        self.calls = 0

    def measure(self, run_once, *, time_budget_s: float, warmup: int, sync=None) -> Measurement:
        value = self.medians[self.calls % len(self.medians)]
        self.calls += 1
        return Measurement(latency_ms=Stats(median=value, p25=value, p75=value, n=3))


def test_noisy_machine_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    runs = [lambda: None] * 3
    # one round per measurement: the first pass reads 1.0, the second 1.2 (a drift of the machine)
    with caplog.at_level(logging.WARNING):
        noisy = repeatability(runs, meter=FakeMeter([1.0, 1.0, 1.0, 1.2, 1.2, 1.2]), rounds=1, warmup=0)
    assert noisy["noisy"] and noisy["noise_floor_pct"] == pytest.approx(100 * (1 / 1.2 - 1) * -1)
    assert "does not repeat" in caplog.text and noisy["networks"] == 3
    quiet = repeatability(runs, meter=FakeMeter([1.0, 1.01]), rounds=1, warmup=0)
    assert not quiet["noisy"] and quiet["worst_pct"] == pytest.approx(1.0, rel=0.02)


def test_one_disturbed_round_is_not_noise() -> None:
    # every measurement has one round 5x slow (another job): the median of rounds does not move, so
    # the machine repeats, although single rounds disagree by 400 % (the old check flagged this)
    out = repeatability([lambda: None] * 4, meter=FakeMeter([1.0, 5.0, 1.02, 0.98, 1.0]), rounds=5, warmup=0)
    assert not out["noisy"] and out["worst_pct"] < 5 and out["round_spread_pct"] > 100


def test_median_of_round_medians() -> None:
    out = measure_rounds(lambda: None, meter=FakeMeter([1.0, 5.0, 1.1, 0.9, 1.05]), rounds=5, warmup=0)
    assert out["latency_ms"]["median"] == pytest.approx(1.05)  # the disturbed round (5.0) does not move it
    assert out["latency_ms"]["rounds"] == [1.0, 5.0, 1.1, 0.9, 1.05]
    assert out["latency_ms"]["spread_pct"] == pytest.approx(100 * 4.1 / 1.05)
    assert out["latency_ms"]["n"] == 15


# -- in context ---------------------------------------------------------------------------------------

def test_trace_parsing_and_attribution() -> None:
    names = ["/stem/conv/Conv_output_0_nchwc", "/stem/act/Mul/QuickGeluFusion/", "ReorderOutput",
             "/blocks/blocks.0/dw/conv/Conv", "/blocks/blocks.0/dw/act/Mul", "ReorderOutput_token_1",
             "/pool/GlobalAveragePool", "/classifier/Gemm"]
    ops = ["Conv", "QuickGelu", "ReorderOutput", "Conv", "QuickGelu", "ReorderOutput", "GlobalAveragePool", "Gemm"]
    events = [{"cat": "Session", "name": "model_run", "dur": 999}]
    for run in range(3):  # run 0 is warm-up, skipped
        for i, (n, op) in enumerate(zip(names, ops)):
            events.append({"cat": "Node", "name": f"{n}_kernel_time", "dur": 1000 * (i + 1) * (10 if run == 0 else 1),
                           "args": {"op_name": op}})
    nodes = parse_trace(events, skip=len(names), runs=2)
    assert [n["ms"] for n in nodes] == pytest.approx([1, 2, 3, 4, 5, 6, 7, 8])
    per = attribute_nodes(nodes, ["stem.conv", "blocks.0.dw.conv", "classifier"], ["classifier"])
    # stem: conv + act + the reorder after it; dw: conv + act; classifier: last reorder + pool + gemm
    assert per == {"stem.conv": {"ms": 6.0, "nodes": 3}, "blocks.0.dw.conv": {"ms": 9.0, "nodes": 2},
                   "classifier": {"ms": 21.0, "nodes": 3}}


def _spec(kind: str, ci: int, co: int, h: int = 8) -> LayerSpec:
    if kind == "dwconv":
        return LayerSpec(kind=kind, in_channels=ci, out_channels=ci, kernel=3, stride=1, groups=ci, height=h, width=h)
    return LayerSpec(kind=kind, in_channels=ci, out_channels=co, kernel=1, stride=1, height=h, width=h)


# -- a synthetic device whose true costs are known -------------------------------------------------
#
# Kernels: a blocked kernel costs per padded MAC, a kernel that falls back costs more per (unpadded)
# MAC; a layer whose output changes layout pays a reorder per element; every node pays a real
# dispatch cost; weights beyond W0 stream from memory at every inference; each run pays a fixed
# overhead. The node trace lengthens every node by a profiler cost larger than small layers' work.
SYNTH = {"blocked_per_mac": 2e-8, "plain_per_mac": 6e-8, "dw_blocked_per_mac": 4e-8, "dw_plain_per_mac": 3e-7,
         "reorder_per_elem": 2e-7, "node_ms": 0.0008, "profiler_node_ms": 0.004, "per_weight_ms": 4e-7,
         "w0": 131072, "net_ms": 0.03}


def _synthetic_specs(rng: np.random.Generator, aligned: bool) -> list[LayerSpec]:
    """A MobileNetV1-CIFAR-like chain: stem, 13 depthwise/pointwise pairs, the classifier."""
    level = rng.uniform(0, 1)
    widths = [int(round(np.exp(np.log(lo) + np.clip(level + rng.normal(0, 0.15), 0, 1) * np.log(hi / lo))))
              for lo, hi in zip([8, 8, 16, 16, 32, 32] + [64] * 8, [32, 64, 128, 128, 256, 256] + [512] * 7 + [1024])]
    if aligned:
        widths = [make_divisible(w, 16) for w in widths]
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    specs, h = [LayerSpec(kind="conv", in_channels=3, out_channels=widths[0], kernel=3, stride=1, height=32,
                          width=32)], 32
    for c_in, c_out, s in zip(widths[:-1], widths[1:], strides):
        specs.append(LayerSpec(kind="dwconv", in_channels=c_in, out_channels=c_in, kernel=3, stride=s, groups=c_in,
                               height=h, width=h))
        h = (h - 1) // s + 1
        specs.append(LayerSpec(kind="pwconv", in_channels=c_in, out_channels=c_out, kernel=1, stride=1, height=h,
                               width=h))
    specs.append(LayerSpec(kind="linear", in_channels=widths[-1], out_channels=10, kernel=1, stride=1, height=1,
                           width=1))
    return specs


def _synthetic_layer_ms(spec: LayerSpec) -> float:
    """The synthetic device's true in-context time of one layer (ms), its nodes' dispatch included."""
    t = dict(zip(("blocked", "unblocked", "padded_macs", "unblocked_macs", "padded_out_elems", "unblocked_out_elems",
                  "reorder_elems", "in_elems"), device_terms(spec, 16, 4)))
    dw = spec.kind == "dwconv"
    work = (t["padded_macs"] * SYNTH["dw_blocked_per_mac" if dw else "blocked_per_mac"]
            + t["unblocked_macs"] * SYNTH["dw_plain_per_mac" if dw else "plain_per_mac"])
    return work + t["reorder_elems"] * SYNTH["reorder_per_elem"] + SYNTH["node_ms"] * _synthetic_nodes(spec)


def _synthetic_nodes(spec: LayerSpec) -> int:
    return 2 + (device_terms(spec, 16, 4)[6] > 0)


def _synthetic_network(rng: np.random.Generator, aligned: bool) -> dict:
    specs = _synthetic_specs(rng, aligned)
    weights = sum(weight_elems(s, 16, 4) for s in specs)
    total = (sum(_synthetic_layer_ms(s) for s in specs) + SYNTH["net_ms"]
             + SYNTH["per_weight_ms"] * max(0.0, weights - SYNTH["w0"]))
    layers = [{"layer": s.to_dict(), "nodes": _synthetic_nodes(s),
               "latency_ms": _synthetic_layer_ms(s) + SYNTH["profiler_node_ms"] * _synthetic_nodes(s)}
              for s in specs]
    return {"latency_ms": {"median": total, "p25": total, "p75": total, "n": 1}, "layers": layers, "specs": specs}


def test_in_context_fit_recovers_a_synthetic_device() -> None:
    """Blocked and fallback kernels, reorders, per-node and per-network overhead, weights that spill
    out of the cache, and a profiler that lengthens every traced node by more than a small layer's
    work: fitted on 48 simulated context networks (half aligned), the model prices held-out aligned
    and arbitrary networks within 3 %, finds the cache threshold, and sees where padding makes a
    channel free and where crossing a block costs."""
    rng = np.random.default_rng(0)
    fit = ContextFit([_synthetic_network(rng, aligned=i % 2 == 0) for i in range(48)], block=16, dw_multiple=4)
    assert fit.network.threshold_elems == pytest.approx(SYNTH["w0"], rel=0.42)  # one √2 step of the grid
    assert fit.network.per_weight_ms == pytest.approx(SYNTH["per_weight_ms"], rel=0.25)
    for aligned in (True, False):
        for _ in range(10):
            net = _synthetic_network(rng, aligned)
            pred = fit.overhead_network_ms + fit.memory_ms(net["specs"]) + sum(fit.predict(s) for s in net["specs"])
            assert pred == pytest.approx(net["latency_ms"]["median"], rel=0.03), aligned
    # marginals: inside a block the padded kernel does the same work; across a boundary it steps
    a, b, c = (fit.predict(_spec("pwconv", 32, co)) for co in (20, 32, 33))
    assert b - a == pytest.approx(0.0, abs=1e-6) and c - b > 0.2 * b
    # the fallback depthwise kernel (18 channels) costs more than the blocked one with 20
    assert fit.predict(_spec("dwconv", 18, 18, h=16)) > fit.predict(_spec("dwconv", 20, 20, h=16))


def test_device_terms_see_padding_fallback_and_reorders() -> None:
    d = dict(zip(("blocked", "unblocked", "padded_macs", "unblocked_macs", "padded_out_elems",
                  "unblocked_out_elems", "reorder_elems", "in_elems"), device_terms(_spec("pwconv", 20, 30), 16, 4)))
    assert d["blocked"] == 1 and d["padded_macs"] == 32 * 32 * 64 and d["unblocked_macs"] == 0
    assert d["reorder_elems"] == 30 * 64  # 30 is no multiple of 4: a ReorderOutput follows
    dw = device_terms(_spec("dwconv", 18, 18), 16, 4)
    assert dw[0] == 0 and dw[3] == 18 * 9 * 64  # 18 channels: the depthwise conv falls back, unpadded
    assert device_terms(_spec("pwconv", 20, 30), 1, 4)[0] == 0  # no block: nothing is blocked


def test_predictor_features_follow_the_block() -> None:
    specs = [_spec("pwconv", ci, co) for ci in (16, 20, 24, 48) for co in (16, 30, 32, 64)]
    y = np.array([1e-3 + 1e-7 * padded(s.in_channels, 16) * padded(s.out_channels, 16) * 64 for s in specs])
    reg = LayerRegressor(channel_block=16, depthwise_multiple=4, alpha=0.0, min_mac_share=0.0).fit(specs, y)
    assert set(reg.coefficients()["pwconv"]) == set(TERMS)
    # inside one block the prediction does not move; across a block boundary it steps
    a, b, c = reg.predict([_spec("pwconv", 20, 17), _spec("pwconv", 20, 32), _spec("pwconv", 20, 33)])
    assert a == pytest.approx(b, rel=0.02) and c > 1.3 * b


def test_context_networks_include_growth_shaped_ones() -> None:
    """A third of the context networks look like what growth makes (early layers near the CIFAR seed,
    the last ones wider), half of each kind aligned; the first 64 are the previous default's, so a profile
    made with 64 resumes by measuring only the new ones."""
    from cost_models.profiling.grid import aligned_architecture, calibration_architectures, growth_architectures
    from cost_models.profiling.profiler import context_architectures
    from hwsplit.network.models import MOBILENET_V1_CIFAR_SEED

    archs = context_architectures("mobilenet_v1", 32, 96, 16)
    before = calibration_architectures("mobilenet_v1", 32, 64, seed=20261202)
    assert len(archs) == 96
    assert archs[:64] == [aligned_architecture(a, 16) if i % 2 == 0 else a for i, a in enumerate(before)]
    grown = growth_architectures("mobilenet_v1", 32, 32)
    assert grown == growth_architectures("mobilenet_v1", 32, 32)  # deterministic
    seed = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    ratios = np.array([[w / s for w, s in zip([a["stem_width"]] + a["widths"], seed)] for a in grown])
    assert np.median(ratios[:, 0]) < 1.5 and np.median(ratios[:, -1]) > 2.0
    assert [a["widths"] for a in archs[64:]][1::2] == [a["widths"] for a in grown][1::2]
    assert all(w % 16 == 0 for a in archs[64::2] for w in a["widths"])


def test_profile_drift_compares_context_networks_now_and_then() -> None:
    """The drift check times a spread of the profile's context networks again and flags a machine whose
    whole networks run more than 10 % faster or slower than when the profile was made."""
    from cost_models.profiling.grid import calibration_architectures
    from cost_models.profiling.profiler import profile_drift

    archs = calibration_architectures("mobilenet_v1", 32, 8)
    profile = {"backend": "onnxruntime", "device": {"threads": 1},
               "context": {"networks": [{"architecture": a, "input_shape": [1, 3, 32, 32],
                                         "latency_ms": {"median": 0.1 * (i + 1)}} for i, a in enumerate(archs)]}}
    calls = []

    def timer(factor):
        def measure(model, shape, **kw):
            then = next(n["latency_ms"]["median"] for n in profile["context"]["networks"]
                        if n["architecture"]["widths"] == [m.out_channels for m in model.modules()
                                                           if getattr(m, "groups", 0) == 1 and
                                                           getattr(m, "kernel_size", None) == (1, 1)])
            calls.append(kw)
            return {"latency_ms": {"median": factor * then}}
        return measure

    same = profile_drift(profile, networks=4, measure=timer(1.05))
    assert same["ratio"] == pytest.approx(1.05) and not same["drifted"] and len(same["networks"]) == 4
    assert len({r["then_ms"] for r in same["networks"]}) == 4  # spread over the sizes, no repeats
    assert calls[0]["threads"] == 1 and calls[0]["meter"] == "latency"
    fast = profile_drift(profile, networks=3, measure=timer(0.7))
    assert fast["drifted"] and fast["ratio"] == pytest.approx(0.7)
    assert same["same_device"] and fast["same_device"]  # a profile naming no device is taken as this one's
    other = profile_drift({**profile, "device": {"threads": 1, "name": "Another CPU"}}, networks=2, measure=timer(1))
    assert not other["same_device"] and other["profile_device"] == "Another CPU"
    with pytest.raises(ValueError, match="context"):
        profile_drift({"context": {"networks": []}})


def test_profile_drift_times_aligned_and_other_networks_apart(caplog) -> None:
    """Networks on the blocked kernels (every width a multiple of the profile's depthwise multiple) and the others
    are sampled half and half and judged apart: a machine whose aligned networks sped up 30 % while the others
    moved 5 % (made up) has drifted, and its table's rankings between the two kinds are said not to hold."""
    from cost_models.profiling.profiler import profile_drift

    def arch(widths):
        return {"family": "mobilenet_v1", "stem_width": widths[0], "widths": widths[1:],
                "strides": [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1], "stem_stride": 1, "num_classes": 10,
                "in_channels": 3, "activation": "silu", "dropout": 0.0}

    nets = [{"architecture": arch([4 * (i + 2)] * 14), "latency_ms": {"median": 0.1 + 0.01 * i}} for i in range(6)]
    nets += [{"architecture": arch([4 * (i + 2) + 1] * 14), "latency_ms": {"median": 0.1 + 0.01 * i}}
             for i in range(6)]
    profile = {"backend": "onnxruntime", "device": {"threads": 1}, "blocks": {"depthwise_multiple": 4},
               "context": {"networks": nets}}

    def measure(model, shape, **kw):
        width = model.stem[0].out_channels if hasattr(model, "stem") else next(
            m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        then = next(n["latency_ms"]["median"] for n in nets if n["architecture"]["stem_width"] == width)
        return {"latency_ms": {"median": then * (0.7 if width % 4 == 0 else 1.05)}}

    with caplog.at_level("WARNING"):
        result = profile_drift(profile, networks=4, measure=measure)
    assert [r["aligned"] for r in result["networks"]] == [True, True, False, False]
    assert result["kinds"] == {"aligned": pytest.approx(0.7), "other": pytest.approx(1.05)}
    assert result["drifted"] and "moved apart" in caplog.text
    # a profile without a block multiple: one kind, as before
    plain = profile_drift({**profile, "blocks": {}}, networks=4, measure=measure)
    assert list(plain["kinds"]) == ["other"] and len(plain["networks"]) == 4


def test_a_run_measuring_on_the_profiles_device_records_the_drift_once(monkeypatch) -> None:
    """End-to-end measurement on the profile's own device checks the drift once per run and puts now ÷ then
    in every measured record; a profile of another machine gets no drift check."""
    import cost_models.profiling.measure as measure_mod
    import cost_models.profiling.profiler as profiler_mod
    from cost_models.profiling.machine import cpu_name
    from hwsplit.run.config import GrowConfig
    from hwsplit.run.measurement import end_to_end_measurer

    checks = []
    monkeypatch.setattr(profiler_mod, "profile_drift", lambda p, **kw: checks.append(kw) or {"ratio": 0.7})
    monkeypatch.setattr(measure_mod, "measure_model", lambda *a, **kw: {"latency_ms": {"median": 0.1}})
    profile = {"backend": "onnxruntime", "meter": "latency",
               "device": {"kind": "cpu", "name": cpu_name(), "threads": 1},
               "context": {"networks": [{"architecture": {}, "latency_ms": {"median": 0.1}}]}}
    config = GrowConfig(cost="lut", cost_options={"profile": "p.json"}, measure=True, measure_time_s=0.05)
    measure = end_to_end_measurer(config, profile)
    first, second = (measure(torch.nn.Identity(), (1, 3, 32, 32)) for _ in range(2))
    assert first["profile_drift"] == second["profile_drift"] == 0.7 and len(checks) == 1
    other = end_to_end_measurer(config, {**profile, "device": {**profile["device"], "name": "another CPU"}})
    assert "profile_drift" not in other(torch.nn.Identity(), (1, 3, 32, 32)) and len(checks) == 1
