"""Benchmarks: the serving load generator (``optimus bench serve``), the policy sweep
(``optimus bench sweep``) and their datasets, metrics and plots."""
