"""Example data and models shared by the demo, tests, notebooks and benchmarks."""
