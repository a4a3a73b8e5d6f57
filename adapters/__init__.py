"""Framework adapters (installed as `adaattn_adapters`): thin DLPack bridges from torch, JAX and NumPy
callers to `adaattn_core`. They hold no validation, kernels or policy; those live in the core.

- `adaattn_adapters.torch`: `attention`, `scaled_dot_product_attention` (SDPA drop-in), `AdaAttention`,
  `register_transformers` (Hugging Face attention implementation "adaattn"); autograd and torch.compile.
- `adaattn_adapters.jax`: `attention` ([B, T, N, H] like `jax.nn.dot_product_attention`), jit and grad.
- `adaattn_adapters.numpy`: `attention`, `attention_backward` on host arrays, on the GPU when one is usable.

Importing this package imports no framework; each module imports its own.
"""
