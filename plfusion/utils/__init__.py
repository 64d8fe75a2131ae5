"""Utilities: checkpoint IO, FLOP counting, benchmarking, visualisation."""
