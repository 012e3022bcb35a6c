"""Layer 2 of hwsplit: what splitting does — splitting indices, selection, the grouped knapsack, recipes, surgery.

Imports only ``hwsplit.infra`` and ``hwsplit.network`` (docs/design.md §1).
"""
