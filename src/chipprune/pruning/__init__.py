"""Pruning: the registry path, the dependency-graph path, budgets, latency and sensitivity."""
