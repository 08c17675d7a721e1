"""Rerunnable benchmarks. Each prints JSON lines; none is a timed test."""
