"""Framework adapters (installed as `adaattn_adapters`): thin DLPack bridges from torch, JAX and NumPy
callers to `adaattn_core`. They hold no validation, kernels or policy; those live in the core."""
