"""Benchmarks: measurements against anchors, never timed assertions."""
