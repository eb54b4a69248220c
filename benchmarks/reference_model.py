"""The baseline a user would write: a plain eager PyTorch M3AE in the style of MAE's public code.

facebookresearch/mae `models_mae.py` + the official M3AE formulation (young-geng/m3ae_public):
- `random_masking` with argsort + `torch.gather` per modality;
- padded sequences: every caption keeps Kt of its Lt positions, padded ones stay in the sequence and
  are excluded from attention with a key-padding mask (F.scaled_dot_product_attention);
- the decoder runs over the full padded length, mask tokens put back with `torch.gather(ids_restore)`;
- the pixel head on ALL patches, then MAE's masked MSE; the vocabulary head on ALL text positions
  (full [B, Lt, 30522] logits), then the official masked cross-entropy.
Mixed precision comes from the caller's `torch.autocast(dtype=torch.bfloat16)`.

Parameter names and shapes are those of `m3ae_engine.model.m3ae.M3AE`, so one state_dict loads into
both and the two start from identical weights; with the same noise both give the same loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3ae_engine.model.config import M3AEConfig
from m3ae_engine.model.m3ae import M3AE, MLP
from m3ae_engine.model.pos_embed import position_table
from m3ae_engine.ops.reference import normalize_image, patchify


def random_masking(x: torch.Tensor, len_keep: int, noise: torch.Tensor):
    """MAE: x [B, L, D], noise [B, L] -> (x_kept [B, K, D], mask [B, L] 1 = removed, ids_restore, ids_keep)."""
    b, l, d = x.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # [B, K]
    x_kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(b, l, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def restore(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """MAE decoder: append mask tokens, unshuffle. [B, K, D] -> [B, L, D]."""
    b, k, d = x_kept.shape
    l = ids_restore.shape[1]
    x = torch.cat([x_kept, mask_token.to(x_kept.dtype).expand(b, l - k, d)], dim=1)
    return torch.gather(x, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, d))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, d = x.shape  # [B, S, D]
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)  # [3, B, H, S, Dh]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)  # [B, H, S, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, eps: float, gelu: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, dim * mlp_ratio, gelu)

    def forward(self, x, attn_mask):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class ReferenceM3AE(nn.Module):
    """Paired image-text M3AE on padded batches. forward(image, text, text_padding_mask) -> loss."""

    def __init__(self, config: M3AEConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        d, dd = c.emb_dim, c.dec_emb_dim
        self.image_embedding = nn.Linear(c.patch_dim, d)
        self.text_embedding = nn.Embedding(c.vocab_size, d)
        if c.use_type_embedding:
            self.encoder_image_type_embedding = nn.Parameter(torch.zeros(1, 1, d))
            self.encoder_text_type_embedding = nn.Parameter(torch.zeros(1, 1, d))
            self.decoder_image_type_embedding = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder_text_type_embedding = nn.Parameter(torch.zeros(1, 1, dd))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.image_mask_embedding = nn.Parameter(torch.zeros(1, 1, dd))
        self.text_mask_embedding = nn.Parameter(torch.zeros(1, 1, dd))
        self.encoder = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, c.layer_norm_eps, c.gelu)
                                     for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.decoder_input_projection = nn.Linear(d, dd)
        self.decoder = nn.ModuleList(Block(dd, c.dec_num_heads, c.mlp_ratio, c.layer_norm_eps, c.gelu)
                                     for _ in range(c.dec_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=c.layer_norm_eps)
        self.decoder_image_output = nn.Linear(dd, c.patch_dim)
        self.decoder_text_output = nn.Linear(dd, c.vocab_size)
        # fixed sin-cos tables (not parameters, not in the state_dict): image rows then text rows
        self.register_buffer("encoder_pos", position_table(d, c.grid_size, c.text_length), persistent=False)
        self.register_buffer("decoder_pos", position_table(dd, c.grid_size, c.text_length), persistent=False)
        self.reset_parameters()

    # same initialisation and AdamW groups as the engine (same parameter names by construction)
    reset_parameters = M3AE.reset_parameters
    NO_DECAY_NAMES = M3AE.NO_DECAY_NAMES
    param_groups = M3AE.param_groups

    def _noise(self, batch: int, length: int, device) -> torch.Tensor:
        rows = batch if self.config.mask_sharing == "sample" else 1
        return torch.rand(rows, length, device=device).expand(batch, length)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_padding_mask: torch.Tensor,
                image_noise: Optional[torch.Tensor] = None, text_noise: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """image [B, C, H, W] uint8 (or normalised float), text [B, Lt] ids, text_padding_mask [B, Lt]
        (1 = padding), on any device (moved here). Returns the weighted total loss (float32 scalar)."""
        c = self.config
        dev = self.cls_token.device
        image = image.to(dev, non_blocking=True)
        text = text.to(dev, non_blocking=True).long()
        pad = text_padding_mask.to(dev, non_blocking=True).float()  # [B, Lt] 1 = padding
        b, li, lt = image.shape[0], c.num_patches, c.text_length
        image_noise = self._noise(b, li, dev) if image_noise is None else image_noise.to(dev)
        text_noise = self._noise(b, lt, dev) if text_noise is None else text_noise.to(dev)

        # ---- encoder: embed, add positions and types, keep a random subset, prepend CLS
        pixels = patchify(normalize_image(image, c.image_mean, c.image_std), c.patch_size)  # [B, Li, P] f32
        x_img = self.image_embedding(pixels) + self.encoder_pos[:li]  # [B, Li, D]
        x_txt = self.text_embedding(text) + self.encoder_pos[li:]  # [B, Lt, D]
        if c.use_type_embedding:
            x_img = x_img + self.encoder_image_type_embedding
            x_txt = x_txt + self.encoder_text_type_embedding
        x_img, image_mask, img_restore, _ = random_masking(x_img, c.image_keep, image_noise)  # [B, Ki, D]
        x_txt, text_mask, txt_restore, txt_keep = random_masking(x_txt, c.text_keep, text_noise)  # [B, Kt, D]
        cls = self.cls_token.expand(b, -1, -1).to(x_img.dtype)
        x = torch.cat([cls, x_img, x_txt.to(x_img.dtype)], dim=1)  # [B, 1 + Ki + Kt, D]
        kept_pad = torch.gather(pad, 1, txt_keep)  # [B, Kt] kept positions that are padding
        enc_valid = torch.cat([torch.ones(b, 1 + c.image_keep, device=dev), 1 - kept_pad], 1) > 0
        enc_mask = enc_valid[:, None, None, :]  # [B, 1, 1, S] True = attend
        for blk in self.encoder:
            x = blk(x, enc_mask)
        x = self.encoder_norm(x)

        # ---- decoder: project, put mask tokens back in original order, full padded length
        y = self.decoder_input_projection(x)  # [B, 1 + Ki + Kt, Dd]
        y_cls, y_img, y_txt = y[:, :1], y[:, 1:1 + c.image_keep], y[:, 1 + c.image_keep:]
        y_img = restore(y_img, img_restore, self.image_mask_embedding) + self.decoder_pos[:li]  # [B, Li, Dd]
        y_txt = restore(y_txt, txt_restore, self.text_mask_embedding) + self.decoder_pos[li:]  # [B, Lt, Dd]
        if c.use_type_embedding:
            y_img = y_img + self.decoder_image_type_embedding
            y_txt = y_txt + self.decoder_text_type_embedding
        y = torch.cat([y_cls, y_img.to(y_cls.dtype), y_txt.to(y_cls.dtype)], dim=1)  # [B, 1 + Li + Lt, Dd]
        dec_valid = torch.cat([torch.ones(b, 1 + li, device=dev), 1 - pad], 1) > 0
        for blk in self.decoder:
            y = blk(y, dec_valid[:, None, None, :])
        y = self.decoder_norm(y)

        # ---- heads on ALL positions, then the masked losses
        pred = self.decoder_image_output(y[:, 1:1 + li])  # [B, Li, P]
        target = pixels
        if c.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, Li]
        image_loss = (per_patch * image_mask).sum() / image_mask.sum()

        logits = self.decoder_text_output(y[:, 1 + li:])  # [B, Lt, V] full vocabulary, all positions
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -torch.gather(logp, -1, text.unsqueeze(-1)).squeeze(-1)  # [B, Lt]
        valid = text_mask * (1 - pad)  # masked and not padding
        text_loss = ((nll * valid).sum(-1) / valid.sum(-1).clamp_min(1e-5)).mean()
        return c.image_loss_weight * image_loss + c.text_loss_weight * text_loss
