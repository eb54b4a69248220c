"""M3AE: one ViT encoder over visible image patches and text tokens, a light decoder that
reconstructs masked pixels (MSE) and masked words (cross-entropy). MAE is the image-only case.

Semantics follow the official code (young-geng/m3ae_public, m3ae/model.py); see DESIGN.md.
Data flow of one forward (T = packed visible rows, R = packed decoder rows):

  image [B,3,H,W] --patchify+Linear--> [B,Li,D] + 2-D sincos + type      \
  text  [B,Lt]    --Embedding-------->  [B,Lt,D] + 1-D sincos + type      --ops.gather--> x [T,D]
  encoder blocks (attention within each sample only) + LayerNorm          --> [T,D]
  decoder_input_projection --> [T,Dd] --ops.unshuffle_rows (+mask tokens, pos, type)--> [R,Dd]
  decoder blocks + LayerNorm --> [R,Dd]
  pixel head at masked patches --ops.masked_mse (target read from the raw image)--> image loss
  vocab head at masked, non-padded text --ops.linear_cross_entropy (no [N,V] logits)--> text loss
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .attention import AttentionContext, attention
from .config import M3AEConfig
from .heads import OutputHead, official_init_
from .masking import MaskingPlan, build_plan
from .pos_embed import position_table
from ..ops.reference import normalize_image, patchify


class InputError(ValueError):
    """A model input has the wrong shape, dtype, device or value range."""


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # output laid out [3][H][Dh], as the official Dense
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t, d = x.shape  # [T, D]
        qkv = self.qkv(x).view(t, 3, self.num_heads, d // self.num_heads)  # [T, 3, H, Dh]
        out = attention(qkv, ctx)  # [T, H, Dh]
        return self.proj(out.reshape(t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def _block_pre(x, ln_w, ln_b, eps: float, qkv_w, qkv_b):
    """LayerNorm + qkv projection: [T, D] -> [T, 3D]."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), qkv_w, qkv_b)


def _block_post(x, attn, proj_w, proj_b, ln_w, ln_b, eps: float, fc1_w, fc1_b, fc2_w, fc2_b, approximate: str):
    """Attention projection + residual, then LayerNorm + MLP + residual: the element-wise work between
    the matmuls is what torch.compile fuses (bias + GELU + cast, LayerNorm + cast, residual adds)."""
    x = x + F.linear(attn, proj_w, proj_b)
    h = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), fc1_w, fc1_b), approximate=approximate)
    return x + F.linear(h, fc2_w, fc2_b)


_COMPILED = {}


def _compiled(fn):
    """One compiled graph per function, shared by every block (parameters are inputs; T is dynamic,
    so exact packed sizes that change each step do not recompile)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class Block(nn.Module):
    """Pre-LN transformer block on packed rows [T, D].

    `compiled=True` runs the two attention-free halves through torch.compile (attention itself stays
    the chosen varlen kernel); same math, fewer memory passes."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, eps: float, gelu: str, compiled: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, dim * mlp_ratio, gelu)
        self.compiled = compiled

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.compiled:
            return self._forward_compiled(x, ctx)
        x = x + self.attn(self.norm1(x), ctx)
        return x + self.mlp(self.norm2(x))

    def _forward_compiled(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t, d = x.shape  # [T, D]
        a, m = self.attn, self.mlp
        qkv = _compiled(_block_pre)(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, a.qkv.weight, a.qkv.bias)
        out = attention(qkv.view(t, 3, a.num_heads, d // a.num_heads), ctx).reshape(t, d)  # [T, D]
        return _compiled(_block_post)(x, out, a.proj.weight, a.proj.bias, self.norm2.weight, self.norm2.bias,
                                      self.norm2.eps, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,
                                      m.approximate)


@dataclass
class M3AEOutput:
    loss: torch.Tensor  # weighted total of the terms present
    image_loss: Optional[torch.Tensor]
    text_loss: Optional[torch.Tensor]
    text_accuracy: Optional[torch.Tensor]
    image_mask: Optional[torch.Tensor]  # [B, Li] 1 = masked
    text_mask: Optional[torch.Tensor]  # [B, Lt] 1 = masked (padding included, as the official mask)
    # predicted patches at the loss positions: the masked ones (every patch with image_all_token_loss)
    image_prediction: Optional[torch.Tensor]  # [B, Lm, p*p*3]
    image_masked_positions: Optional[torch.Tensor]  # [B, Lm] their positions (ascending)
    text_logits: Optional[torch.Tensor]  # [Nt, V] only with return_text_logits=True
    text_target_index: Optional[torch.Tensor]  # [Nt] b*Lt + l of each text prediction row
    text_row_weight: Optional[torch.Tensor]  # [Nt] 0 = filler row
    plan: MaskingPlan

    def image_prediction_full(self) -> torch.Tensor:
        """[B, Li, P]: the predictions at their positions, zeros at the others (the visible patches,
        unless image_all_token_loss predicts every patch)."""
        b, lm, p = self.image_prediction.shape
        li = self.image_mask.shape[1]
        full = self.image_prediction.new_zeros(b, li, p)
        return full.scatter(1, self.image_masked_positions[..., None].expand(b, lm, p), self.image_prediction)


class M3AE(nn.Module):
    """The M3AE model (MAE when used image-only). `M3AE.from_pretrained(path)` and `save_pretrained(dir)` are
    given to the class by the package's `__init__` from m3ae_engine/interop/pretrained.py (file formats
    sit above the model layer)."""

    def __init__(self, config: M3AEConfig):
        super().__init__()
        if not isinstance(config, M3AEConfig):
            raise TypeError(f"M3AE needs an M3AEConfig, got {type(config).__name__}")
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
        self.encoder = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, c.layer_norm_eps, c.gelu, c.compile_blocks)
                                     for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.decoder_input_projection = nn.Linear(d, dd)
        self.decoder = nn.ModuleList(Block(dd, c.dec_num_heads, c.mlp_ratio, c.layer_norm_eps, c.gelu,
                                           c.compile_blocks) for _ in range(c.dec_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=c.layer_norm_eps)
        # output heads (official MLP when output_head_depth > 0); their last Linear is .weight/.bias
        self.decoder_image_output = OutputHead(dd, c.patch_dim, c.output_head_depth, c.layer_norm_eps, c.gelu)
        self.decoder_text_output = OutputHead(dd, c.vocab_size, c.output_head_depth, c.layer_norm_eps, c.gelu)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        """Official initialisation: Dense xavier_uniform / zero bias, Embed normal(1.0), tokens normal(0.02)."""
        official_init_(self)
        nn.init.normal_(self.text_embedding.weight, std=1.0)
        for name, p in self.named_parameters():
            if name.endswith("_type_embedding") or name in ("cls_token", "image_mask_embedding",
                                                            "text_mask_embedding"):
                nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------ optimiser helpers
    NO_DECAY_NAMES = ("cls_token", "encoder_image_type_embedding", "encoder_text_type_embedding",
                      "decoder_image_type_embedding", "decoder_text_type_embedding",
                      "image_mask_embedding", "text_mask_embedding", "text_embedding")

    def param_groups(self, weight_decay: float) -> List[dict]:
        """Official no-decay list: CLS/type/mask embeddings, the text embedding and every bias.
        (The official code decays LayerNorm scales; so do we.)"""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            top = name.split(".")[0]
            (no_decay if top in self.NO_DECAY_NAMES or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, image, text, text_padding_mask):
        c = self.config
        if image is None and text is None:
            raise InputError("M3AE.forward needs an image batch, a text batch, or both")
        b = None
        if image is not None:
            if not isinstance(image, torch.Tensor) or image.dim() != 4:
                raise InputError(f"image must be a [B, {c.in_channels}, {c.image_size}, {c.image_size}] tensor, "
                                 f"got {getattr(image, 'shape', type(image))}")
            if tuple(image.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
                raise InputError(f"image must be [B, {c.in_channels}, {c.image_size}, {c.image_size}], "
                                 f"got {tuple(image.shape)}")
            if image.dtype != torch.uint8 and not image.is_floating_point():
                raise InputError(f"image must be uint8 (0-255, normalised inside) or float (already "
                                 f"normalised), got {image.dtype}")
            b = image.shape[0]
        if text is not None:
            if not isinstance(text, torch.Tensor) or text.dim() != 2:
                raise InputError(f"text must be a [B, {c.text_length}] tensor of token ids, "
                                 f"got {getattr(text, 'shape', type(text))}")
            if text.shape[1] != c.text_length:
                raise InputError(f"text must be [B, {c.text_length}] (config.text_length), got {tuple(text.shape)}")
            if text.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
                raise InputError(f"text must hold integer token ids, got {text.dtype}")
            if b is not None and text.shape[0] != b:
                raise InputError(f"image and text batch sizes differ: {b} vs {text.shape[0]}")
            b = text.shape[0]
            if text_padding_mask is None:
                raise InputError("text needs its text_padding_mask [B, Lt] (1 = padding)")
            if tuple(text_padding_mask.shape) != tuple(text.shape):
                raise InputError(f"text_padding_mask must be {tuple(text.shape)} like text, "
                                 f"got {tuple(text_padding_mask.shape)}")
            if text.device.type == "cpu":
                if text.numel() and (int(text.min()) < 0 or int(text.max()) >= c.vocab_size):
                    raise InputError(f"text token ids must be in [0, {c.vocab_size}), got min {int(text.min())} "
                                     f"max {int(text.max())}")
            else:  # no host sync on the GPU: an asynchronous device-side assert
                torch._assert_async(((text >= 0) & (text < c.vocab_size)).all(),
                                    f"text token ids must be in [0, {c.vocab_size})")
        if b == 0:
            raise InputError("empty batch")
        return b

    # ------------------------------------------------------------------ embeddings
    def _type(self, name: str):
        return getattr(self, name).reshape(-1) if self.config.use_type_embedding else None

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B,C,H,W] uint8/float -> tokens [B, Li, D] with position and type embeddings."""
        c = self.config
        x = self.image_embedding(patchify(normalize_image(image, c.image_mean, c.image_std), c.patch_size))
        pos = position_table(c.emb_dim, c.grid_size, 0, x.device)  # [Li, D]
        x = x + pos
        if c.use_type_embedding:
            x = x + self.encoder_image_type_embedding
        return x

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text [B, Lt] ids -> tokens [B, Lt, D] with position and type embeddings."""
        c = self.config
        x = self.text_embedding(text.long())
        x = x + position_table(c.emb_dim, 0, c.text_length, x.device)
        if c.use_type_embedding:
            x = x + self.encoder_text_type_embedding
        return x

    # ------------------------------------------------------------------ forward
    def make_plan(self, batch: int, has_image: bool, text_padding_mask: Optional[torch.Tensor],
                  generator=None, image_noise=None, text_noise=None) -> MaskingPlan:
        c = self.config
        return build_plan(batch, c.num_patches, c.image_keep, text_padding_mask, c.text_length, c.text_keep,
                          has_image=has_image, packed=c.packed, sharing=c.mask_sharing, device=self.cls_token.device,
                          generator=generator, image_noise=image_noise, text_noise=text_noise,
                          image_all_tokens=c.image_all_token_loss, text_all_tokens=c.text_all_token_loss)

    def encode(self, image, text, plan: MaskingPlan) -> torch.Tensor:
        """Encoder over the plan's visible rows -> [T, D] (after the final LayerNorm)."""
        c = self.config
        dev = self.cls_token.device
        img_tok = self.embed_image(image.to(dev, non_blocking=True)) if image is not None else None
        txt_tok = self.embed_text(text.to(dev, non_blocking=True)) if text is not None else None
        x = ops.gather(img_tok, txt_tok, self.cls_token.reshape(-1), plan.enc_row_source,
                       plan.image_row_of, plan.text_row_of, backend=self._kernels())  # [T, D]
        ctx = AttentionContext.build(plan.enc, c.attention, dev)
        for blk in self.encoder:
            x = blk(x, ctx)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, plan: MaskingPlan) -> torch.Tensor:
        """[T, D] encoder rows -> [R, Dd] decoder rows (after the final LayerNorm)."""
        c = self.config
        y = self.decoder_input_projection(x)  # [T, Dd]: project only the visible rows
        # as the official/MAE code under autocast (concatenating with fp32 mask tokens promotes): the
        # decoder's residual stream stays in the parameters' dtype, not the autocast dtype
        y = y.to(torch.promote_types(y.dtype, self.image_mask_embedding.dtype))
        mask_tokens = torch.cat([self.image_mask_embedding.reshape(1, -1), self.text_mask_embedding.reshape(1, -1)])
        types = None
        if c.use_type_embedding:
            types = torch.cat([self.decoder_image_type_embedding.reshape(1, -1),
                               self.decoder_text_type_embedding.reshape(1, -1)])
        pos = position_table(c.dec_emb_dim, c.grid_size if plan.num_patches else 0, plan.text_length, y.device)
        d = ops.unshuffle_rows(y, mask_tokens, types, pos, plan.dec_row_visible, plan.dec_row_kind,
                               plan.dec_row_pos, plan.dec_row_of_visible, backend=self._kernels())  # [R, Dd]
        ctx = AttentionContext.build(plan.dec, c.attention, y.device)
        for blk in self.decoder:
            d = blk(d, ctx)
        return self.decoder_norm(d)

    def _kernels(self):
        k = self.config.kernels
        return None if k == "auto" else k

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                text_padding_mask: Optional[torch.Tensor] = None, *, generator: Optional[torch.Generator] = None,
                image_noise: Optional[torch.Tensor] = None, text_noise: Optional[torch.Tensor] = None,
                return_text_logits: bool = False, plan: Optional[MaskingPlan] = None) -> M3AEOutput:
        """Masked reconstruction of a paired (image + text), image-only or text-only batch.

        image: [B, C, H, W] uint8 (normalised inside with config.image_mean/std) or float (already
        normalised); text: [B, Lt] ids; text_padding_mask: [B, Lt], 1 = padding. Keep text and its
        mask on the CPU (as the loaders yield them) for exact packed sizes without a device sync.
        """
        c = self.config
        b = self._check_inputs(image, text, text_padding_mask)
        dev = self.cls_token.device
        if plan is None:
            plan = self.make_plan(b, image is not None, text_padding_mask, generator, image_noise, text_noise)
        plan = plan.to(dev)
        # once on the device: the encoder embeds them, the losses read them (text ids come from the CPU)
        image = image.to(dev, non_blocking=True) if image is not None else None
        text = text.to(dev, non_blocking=True) if text is not None else None
        x = self.encode(image, text, plan)
        d = self.decode(x, plan)

        image_loss = image_pred = masked_pos = None
        if image is not None:
            lm = plan.image_patch_index.numel() // b  # masked patches per sample (all with image_all_token_loss)
            pred = self.decoder_image_output(d[plan.image_pred_rows])  # [B*Lm, P]
            image_loss = ops.masked_mse(pred, image, plan.image_patch_index,
                                        plan.image_row_weight, c.patch_size, c.norm_pix_loss,
                                        c.image_mean, c.image_std, backend=self._kernels())
            image_pred = pred.view(b, lm, -1)
            masked_pos = (plan.image_patch_index.long() % plan.num_patches).view(b, lm)
        text_loss = text_acc = logits = None
        if text is not None:
            h = self.decoder_text_output.hidden(d[plan.text_pred_rows])  # [Nt, Dd]: the MLP head before its last Linear
            targets = text.reshape(-1).long()[plan.text_target_index]
            text_loss, text_acc = ops.linear_cross_entropy(h, self.decoder_text_output.weight,
                                                           self.decoder_text_output.bias, targets,
                                                           plan.text_row_weight, backend=self._kernels())
            if return_text_logits:
                logits = F.linear(h, self.decoder_text_output.weight, self.decoder_text_output.bias)
        loss = 0.0
        if image_loss is not None:
            loss = loss + c.image_loss_weight * image_loss
        if text_loss is not None:
            loss = loss + c.text_loss_weight * text_loss
        return M3AEOutput(loss=loss, image_loss=image_loss, text_loss=text_loss, text_accuracy=text_acc,
                          image_mask=plan.image_mask, text_mask=plan.text_mask, image_prediction=image_pred,
                          image_masked_positions=masked_pos, text_logits=logits,
                          text_target_index=plan.text_target_index, text_row_weight=plan.text_row_weight,
                          plan=plan)

    @torch.no_grad()
    def forward_representation(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                               text_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder on the unmasked inputs (for evaluation): [B, 1 + Li + Lt, D], CLS first, padded
        layout (outputs at padded text positions are meaningless: they were never keys)."""
        c = self.config
        b = self._check_inputs(image, text, text_padding_mask)
        dev = self.cls_token.device
        li = c.num_patches if image is not None else 0
        lt = c.text_length if text is not None else 0
        pdev = text_padding_mask.device if text is not None else dev
        ident = lambda n: torch.arange(n, dtype=torch.float32, device=pdev)[None].expand(b, n)  # noqa: E731
        plan = build_plan(b, c.num_patches, c.num_patches, text_padding_mask, c.text_length, c.text_length,
                          has_image=image is not None, packed=False, sharing="sample", device=dev,
                          image_noise=ident(li) if li else None, text_noise=ident(lt) if lt else None).to(dev)
        x = self.encode(image, text, plan)
        return x.view(b, 1 + li + lt, -1)

    TEXT_ONLY_PREFIXES = ("text_embedding", "encoder_text_type_embedding", "decoder_text_type_embedding",
                          "text_mask_embedding", "decoder_text_output")

    def text_parameters(self):
        """Parameters used only by the text path (frozen for image-only MAE training)."""
        return [p for n, p in self.named_parameters() if n.split(".")[0] in self.TEXT_ONLY_PREFIXES]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
