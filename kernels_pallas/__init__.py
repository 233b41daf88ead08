"""Packed low-bit matmul kernels (pure-jnp reference, Pallas TPU/GPU, interpret mode).

The kernels arrive with their own issue; the package exists so that ``qjax`` installs with its layout.
"""
