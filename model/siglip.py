"""SigLIP vision tower as PaliGemma uses it (So400m/14, no pooling head).

Conv patch embedding (no CLS token) + learned positions, pre-LN encoder blocks with tanh-GELU MLPs, then the
post-layernorm; the output is the last hidden state (B, N, C). References: Zhai et al. 2023 (SigLIP); transformers
5.24 `models/siglip/modeling_siglip.py` (eager attention); big_vision `models/vit.py`.
Shapes: B batch, N patches, C vision width, H heads, D head dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from pgconv.model import ops
from pgconv.model.config import VisionConfig
from pgconv.model.cpu_kernels import Linear  # nn.Linear on the fastest CPU kernel for its shape

__all__ = ["SiglipVision", "VisionBlock", "VisionAttention", "VisionMLP"]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q, self.k, self.v, self.o = (Linear(c, c) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape

        def heads(t: Tensor) -> Tensor:  # (B, N, C) -> (B, H, N, D)
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = ops.attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), None, self.scale)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(ops.gelu_tanh(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN encoder block: `x + attn(norm1(x))`, then `+ mlp(norm2(.))`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipVision(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) pixels -> (B, N, C) patch embeddings plus learned positions."""
        # Pixels (float32 from the processor) are cast to the weights' dtype, as transformers does.
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, N, C), row-major patches
        return x + self.pos_embed.weight[None]

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
