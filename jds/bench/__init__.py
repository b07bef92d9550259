"""Benchmarks: workloads, the load generator, SLO metrics and goodput, reports (``python -m jds.bench``)."""
