"""Layer 1 of hwsplit: what a network is — layer specs, neuron groups, model families, resizing, checkpoints.

Imports only ``hwsplit.infra`` (docs/design.md §1).
"""
