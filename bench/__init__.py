"""Benchmarks: edgeproxy against the real baselines, side by side in one run (`bench/run`)."""
