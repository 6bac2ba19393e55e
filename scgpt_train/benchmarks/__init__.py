"""Benchmarks: ``scripts/benchmark.py benchmark=<name>`` runs the runner that configs/benchmark/<name>.yaml names;
:mod:`.harness` holds what every runner shares."""
