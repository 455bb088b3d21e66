"""Adapters for peer optimizer libraries used in kfax benchmarks."""
