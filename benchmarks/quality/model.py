"""A small pre-LN GPT with rotary positions and pluggable attention.

Attention runs in `Attend`, a parameter-free module that every block owns: it receives q, k, v after
RoPE ([B, H, S, D]) and returns the attention output, through torch SDPA (`backend="sdpa"`, `is_causal`) or
AdaAttn (`backend="adaattn"`, `adaattn_adapters.torch.attention(causal=True, policy=...)`). `set_attention`
switches every block; forward hooks on the `Attend` modules see the post-RoPE q, k, v (`activations`).
RoPE lets the model run at contexts longer than it was trained at (perplexity there measures
extrapolation, but the policies are still compared on the same model and text).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "adaattn")


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. head_dim = d_model / heads."""

    layers: int = 6
    d_model: int = 384
    heads: int = 6
    context: int = 2048
    vocab: int = 256
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "head_dim": self.head_dim}


def rope_tables(seq: int, dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [seq, dim/2] float32, of the rotary embedding."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of [B, H, S, D] by the position's angles; keeps x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attend(nn.Module):
    """Causal attention of post-RoPE q, k, v [B, H, S, D] → [B, H, S, D], by `backend` under `policy`."""

    def __init__(self, backend: str = "sdpa", policy: str = "exact") -> None:
        super().__init__()
        self.backend, self.policy = backend, policy

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from adaattn_adapters.torch import attention

        return attention(q, k, v, causal=True, policy=self.policy)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, policy={self.policy!r}"


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4× GELU MLP."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.ln1, self.ln2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.attend = Attend()
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model, bias=False), nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model, bias=False),
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level GPT: token embedding (tied with the output layer), `layers` blocks, final LayerNorm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for linear in (block.proj, block.mlp[2]):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, vocab] of tokens [B, S] (float32)."""
        cos, sin = rope_tables(tokens.shape[1], self.config.head_dim, self.config.rope_base, tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.ln_f(x), self.embed.weight).float()

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy (nats) of windows [B, S + 1]."""
        logits = self(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def attends(self) -> list[Attend]:
        """The blocks' attention modules, layer order."""
        return [block.attend for block in self.blocks]

    def set_attention(self, backend: str, policy: str = "exact") -> None:
        """Route every block's attention to `backend` ("sdpa" or "adaattn") under `policy`."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for attend in self.attends():
            attend.backend, attend.policy = backend, policy
