"""Layer 2 of hwsplit, beside splitting: data sets and loaders, the training loop, post-split schedules.

Imports only ``hwsplit.infra`` and ``hwsplit.network`` (docs/design.md §1).
"""
