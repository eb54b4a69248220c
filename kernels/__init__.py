"""Triton kernels, one file per op; imported as `m3ae_engine.kernels` (setuptools package_dir)."""
