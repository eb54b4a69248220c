"""Plain-PyTorch references of every op: the specification the Triton and CUDA kernels must match.

Two families:
- MAE drop-in contracts (facebookresearch/mae, models_mae.py): `random_masking`, `unshuffle`,
  `masked_mse_loss`, and the official M3AE text loss `masked_linear_cross_entropy`.
- Engine ops on index maps (what the fused kernels compute). Every map is precomputed by
  `m3ae_engine.model.masking` so the kernels are pure gathers/reductions with no host synchronisation:
  * `gather`: packed rows from (CLS, image tokens, text tokens) by a per-row source code;
  * `unshuffle`: decoder input rows = visible row or modality mask token, + position + type;
  * `masked_mse`: weighted per-patch MSE against patches read straight from the raw image;
  * `masked_linear_cross_entropy`: weighted CE of a linear vocabulary head on selected rows.

Source codes for `gather` rows: -1 = CLS, -2 = filler (zero row),
0 <= s < B*Li = image row s of the flattened [B*Li, D] image tokens,
B*Li <= s < B*Li + B*Lt = text row s - B*Li of the flattened [B*Lt, D] text tokens.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

CLS_SOURCE = -1
FILLER_SOURCE = -2
KIND_IMAGE, KIND_TEXT, KIND_CLS = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# images <-> patches, (p, p, c) order
# ----------------------------------------------------------------------------------------------
def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs [B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], patch vector in (p, p, c) order (MAE/official)."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W] for a square grid."""
    b, l, _ = x.shape
    p = patch_size
    g = int(round(l ** 0.5))
    assert g * g == l, f"unpatchify needs a square number of patches, got {l}"
    x = x.reshape(b, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


@functools.lru_cache(maxsize=32)
def _channel_constant(values: tuple, device: str) -> torch.Tensor:
    # cached: building it anew each call would be a pageable host->device copy that waits for the stream
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)


def normalize_image(imgs: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
                    ) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32 (x/255 - mean)/std; float input is taken as already normalised."""
    if imgs.dtype == torch.uint8:
        assert mean is not None and std is not None, "uint8 images need mean and std"
        dev = str(imgs.device)
        m = _channel_constant(tuple(float(v) for v in mean), dev)
        s = _channel_constant(tuple(float(v) for v in std), dev)
        return (imgs.float() / 255.0 - m) / s
    return imgs.float()


# ----------------------------------------------------------------------------------------------
# MAE drop-in contracts
# ----------------------------------------------------------------------------------------------
def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
    """MAE's random_masking. x [N, L, D] -> (x_masked [N, K, D], mask [N, L] 0 keep / 1 removed, ids_restore [N, L])."""
    n, l, d = x.shape
    len_keep = int(l * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, l, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, l], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def unshuffle_mae(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                  cls_first: bool = False) -> torch.Tensor:
    """MAE decoder's append-mask-tokens-and-unshuffle. x_visible [N, K(+1), D], ids_restore [N, L]
    -> [N, L(+1), D]. With cls_first the first visible token is CLS and is kept in front."""
    if cls_first:
        cls, x_visible = x_visible[:, :1], x_visible[:, 1:]
    n, k, d = x_visible.shape
    l = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, d).to(x_visible.dtype).expand(n, l - k, d)
    x_ = torch.cat([x_visible, mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, d))
    return torch.cat([cls, x_], dim=1) if cls_first else x_


def masked_mse_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_pix_loss: bool = False) -> torch.Tensor:
    """MAE's forward_loss: imgs [N, 3, H, W], pred [N, L, p*p*3], mask [N, L] (1 = removed)."""
    target = patchify(imgs.float(), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred.float() - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def masked_linear_cross_entropy_official(hidden: torch.Tensor, weight: torch.Tensor,
                                         bias: Optional[torch.Tensor], targets: torch.Tensor,
                                         valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official `cross_entropy_loss_and_accuracy` on full logits. hidden [B, L, D], weight [V, D],
    targets/valid [B, L]. Per-sample sum / max(count, 1e-5), then batch mean."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())  # [B, L, V]
    valid = valid.float()
    count = valid.sum(-1).clamp_min(1e-5)
    logp = torch.log_softmax(logits, -1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid > 0, logp, torch.zeros_like(logp))
    loss = -(logp.sum(-1) / count).mean()
    correct = (logits.argmax(-1) == targets) & (valid > 0)
    acc = (correct.float().sum(-1) / count).mean()
    return loss, acc


# ----------------------------------------------------------------------------------------------
# engine ops on index maps
# ----------------------------------------------------------------------------------------------
def gather(image_tokens: Optional[torch.Tensor], text_tokens: Optional[torch.Tensor],
           cls: Optional[torch.Tensor], row_source: torch.Tensor) -> torch.Tensor:
    """Packed rows [T, D] from CLS [D], image [B, Li, D] and text [B, Lt, D] by source code [T]."""
    parts = []
    ref = image_tokens if image_tokens is not None else text_tokens
    d = ref.shape[-1]
    dtype = ref.dtype
    parts.append(torch.zeros(1, d, dtype=dtype, device=ref.device))  # index 0: filler
    parts.append((cls.reshape(1, d) if cls is not None else torch.zeros(1, d, device=ref.device)).to(dtype))
    if image_tokens is not None:
        parts.append(image_tokens.reshape(-1, d))
    if text_tokens is not None:
        parts.append(text_tokens.reshape(-1, d).to(dtype))
    table = torch.cat(parts, 0)  # [2 + B*Li + B*Lt, D]
    return table[row_source.long() + 2]


def unshuffle(visible: torch.Tensor, mask_tokens: torch.Tensor, type_embeddings: Optional[torch.Tensor],
              pos_table: Optional[torch.Tensor], row_visible: torch.Tensor, row_kind: torch.Tensor,
              row_pos: torch.Tensor) -> torch.Tensor:
    """Decoder input rows [R, D].

    visible [T, D]: visible tokens (already projected to decoder width);
    mask_tokens [2, D]: image / text mask token; type_embeddings [2, D] or None: image / text type;
    pos_table [P, D] or None (fixed, no gradient); row_visible [R]: visible row or -1 (mask token);
    row_kind [R]: 0 image, 1 text, 2 CLS (no mask/pos/type), -1 filler (zero row);
    row_pos [R]: row of pos_table (ignored for CLS and filler).
    """
    vis = row_visible.long()
    kind = row_kind.long()
    out_dtype = visible.dtype
    is_tok = (kind == KIND_IMAGE) | (kind == KIND_TEXT)
    kind_c = kind.clamp(0, 1)
    if visible.shape[0]:  # rows without a visible token (vis -1) read row 0; torch.where drops it below
        picked = visible[vis.clamp_min(0)].float()
    else:  # T = 0 (keep count 0, no CLS row): nothing to index, every row is a mask token, CLS or filler
        picked = visible.new_zeros(vis.shape[0], visible.shape[-1], dtype=torch.float32)
    base = torch.where((vis >= 0).unsqueeze(-1), picked, mask_tokens.float()[kind_c])
    if type_embeddings is not None:
        base = base + torch.where(is_tok.unsqueeze(-1), type_embeddings.float()[kind_c], 0.0)
    if pos_table is not None:
        base = base + torch.where(is_tok.unsqueeze(-1), pos_table.float()[row_pos.long().clamp_min(0)], 0.0)
    keep = (kind >= 0) & ((vis >= 0) | is_tok)
    base = torch.where(keep.unsqueeze(-1), base, 0.0)
    return base.to(out_dtype)


def masked_mse(pred: torch.Tensor, imgs: torch.Tensor, patch_index: torch.Tensor, row_weight: torch.Tensor,
               patch_size: int, norm_pix_loss: bool = False, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """sum_r row_weight[r] * mean_j (pred[r, j] - target[r, j])^2.

    pred [M, p*p*C]; imgs [B, C, H, W] raw (uint8 with mean/std, or already-normalised float);
    patch_index [M] = b * L + l (which patch of which image); target read from imgs in (p, p, c)
    order, optionally per-patch normalised (MAE norm_pix_loss: (t - mean) / sqrt(var + 1e-6),
    unbiased var). Accumulation in float32; returns a float32 scalar.
    """
    target = patchify(normalize_image(imgs, mean, std), patch_size)  # [B, L, P]
    target = target.reshape(-1, target.shape[-1])[patch_index.long()]  # [M, P]
    if norm_pix_loss and target.shape[0]:  # (no rows: nothing to normalise)
        mu = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mu) / (var + 1.0e-6) ** 0.5
    per_row = ((pred.float() - target) ** 2).mean(-1)
    return (per_row * row_weight.float()).sum()


def masked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                targets: torch.Tensor, row_weight: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_r w_r * CE(hidden_r @ weight.T + bias, t_r), sum_r w_r * [argmax == t_r]).

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] in [0, V), row_weight [N] float.
    Logits in float32 (the kernels never materialise them; this reference does).
    """
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())  # [N, V]
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    w = row_weight.float()
    loss = (ce * w).sum()
    correct = (logits.argmax(-1) == targets.long()).float()
    return loss, (correct * w).sum().detach()
