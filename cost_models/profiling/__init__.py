"""Measuring a device: meters, runners, the layer grid, the profiler and onnxruntime's channel block.

Everything here runs networks on hardware; the pricing modules one level up (``cost_models``) only read
what it wrote (a profile) and never import this package.
"""
