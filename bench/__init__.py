"""Microbenchmarks of effssl_kernels: `python -m bench` runs the suite."""
