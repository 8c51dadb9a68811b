"""Pallas kernels, each with a pure-JAX reference it is tested against."""
