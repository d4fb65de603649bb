"""Triton kernels of r3f-opt, installed as ``r3f_opt.kernels``.

* ``sym_kl``: fused symmetric KL over rows of two logits tensors (forward + backward);
* ``spectral_norm``: fused power-iteration spectral norm for the R4F head (forward + backward).

``r3f_opt.symmetric_kl`` and ``r3f_opt.apply_r4f`` dispatch to them (``R3F_KERNELS``, see
``r3f_opt._dispatch``); importing this package does not import Triton. Every launch of both goes
through the module's ``_launch``, and the device is asked only through its ``_sm_count``: that is how
``python -m bench.sm90`` records, and compiles for sm_90a, exactly what the launchers would run on an H200.
"""
