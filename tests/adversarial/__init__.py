"""The adversarial test matrix's parts (issue #25): ``faults`` (what can be wrong with an input, an output location or
a corpus), ``entry_points`` (every entry point and the outcome each fault must have there), ``table`` (the tables in
docs/reliability.md). ``tests/test_adversarial_matrix.py`` runs every cell."""
