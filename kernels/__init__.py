"""Triton kernels of r3f-opt, installed as ``r3f_opt.kernels``.

Empty until the fused symmetric-KL and spectral-norm kernels land; ``r3f_opt`` uses its exact
PyTorch path meanwhile.
"""
