"""Pallas kernels and their pure-jnp references, one folder per op family."""
