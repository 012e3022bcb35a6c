"""Layer 4 of hwsplit: what a run is — settings, run directories, the Grower, grow, fine-tune, baselines, reports.

Above the cost models (layer 3, ``cost_models/``), below the command line (docs/design.md §1).
"""
