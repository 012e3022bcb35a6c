"""Layer 0 of hwsplit: errors, atomic file writes, units, device checks and cross-rank plumbing.

Nothing here imports the rest of the project (docs/design.md §1).
"""
