"""Benchmarks of kfax against Adam, SGD and kfac-jax (see benchmarks/README.md)."""
