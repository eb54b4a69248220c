"""Decoder output heads: the official `MLP` of young-geng/m3ae_public (m3ae/model.py) for pixels and words.

Depth k = 0 (official default) is one Dense. Depth k > 0:

    x = LayerNorm_0(x)
    for i in range(k):
        y = LayerNorm_{i+1}(gelu(Dense_i(x)))      # Dense_i: Dd -> Dd
        x = y if i == 0 else x + y                  # residual from the second layer on
    out = Dense_k(x)                                # Dd -> output size

The final Dense's `weight` / `bias` sit on the head itself (so depth 0 keeps the state-dict keys of a
plain nn.Linear, `decoder_text_output.weight`), because the vocabulary head's last Dense is never called
as a module: the fused cross-entropy (ops.linear_cross_entropy) takes it with the rows `hidden(x)` made.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def official_init_(root: nn.Module) -> None:
    """Official init of every Dense below `root` (xavier_uniform, zero bias; an output head's last
    Dense included) and every LayerNorm (scale 1, bias 0)."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, OutputHead):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class HeadLayer(nn.Module):
    """One hidden layer of the head: LayerNorm(gelu(Linear(x))) -- [N, Dd] -> [N, Dd]."""

    def __init__(self, dim: int, eps: float, approximate: str):
        super().__init__()
        self.fc = nn.Linear(dim, dim)  # official Dense_i
        self.norm = nn.LayerNorm(dim, eps=eps)  # official LayerNorm_{i+1}
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.fc(x), approximate=self.approximate))


class OutputHead(nn.Module):
    """Official MLP output head; `weight` [out, Dd] and `bias` [out] are the last Dense (Dense_k)."""

    def __init__(self, dim: int, out_dim: int, depth: int, eps: float, gelu: str):
        super().__init__()
        if depth < 0:
            raise ValueError(f"output head depth must be >= 0, got {depth}")
        self.depth = depth
        approximate = "tanh" if gelu == "tanh" else "none"
        # official: input_norm = depth > 0, so depth 0 has no LayerNorm_0
        self.input_norm = nn.LayerNorm(dim, eps=eps) if depth > 0 else None
        self.layers = nn.ModuleList(HeadLayer(dim, eps, approximate) for _ in range(depth))
        self.weight = nn.Parameter(torch.empty(out_dim, dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self):
        official_init_(self)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the last Dense: [N, Dd] -> [N, Dd] (identity at depth 0)."""
        if self.input_norm is None:
            return x
        x = self.input_norm(x)
        for i, layer in enumerate(self.layers):
            y = layer(x)
            x = y if i == 0 else x + y
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x), self.weight, self.bias)  # [N, out]

    def extra_repr(self) -> str:
        return f"depth={self.depth}, in={self.weight.shape[1]}, out={self.weight.shape[0]}"


def official_head_keys(prefix: str, depth: int) -> List[Tuple[str, str, bool]]:
    """(state-dict key, official flax param path, transpose) for one head of depth k.

    prefix is the module name (`decoder_image_output` / `decoder_text_output`); the flax path is
    relative to the model's `params` tree. `transpose` is True for Dense kernels ([in, out] in flax,
    [out, in] in torch)."""
    keys = []
    if depth > 0:
        keys += [(f"{prefix}.input_norm.weight", f"{prefix}/LayerNorm_0/scale", False),
                 (f"{prefix}.input_norm.bias", f"{prefix}/LayerNorm_0/bias", False)]
    for i in range(depth):
        keys += [(f"{prefix}.layers.{i}.fc.weight", f"{prefix}/Dense_{i}/kernel", True),
                 (f"{prefix}.layers.{i}.fc.bias", f"{prefix}/Dense_{i}/bias", False),
                 (f"{prefix}.layers.{i}.norm.weight", f"{prefix}/LayerNorm_{i + 1}/scale", False),
                 (f"{prefix}.layers.{i}.norm.bias", f"{prefix}/LayerNorm_{i + 1}/bias", False)]
    keys += [(f"{prefix}.weight", f"{prefix}/Dense_{depth}/kernel", True),
             (f"{prefix}.bias", f"{prefix}/Dense_{depth}/bias", False)]
    return keys
