"""Masking plans: which tokens each sample keeps, and the index maps of the packed layouts.

Everything the fused kernels need is computed here with a handful of small integer ops, so the
kernels themselves are plain gathers with no host synchronisation.

Layouts (per sample b; rows of all samples are concatenated, `cu_seqlens` marks the boundaries):
  encoder  [CLS, kept image tokens (keep order), kept text tokens (keep order)]
  decoder  [CLS, all Li image positions (original order), text positions (original order)]
In the "packed" layout padded text positions are dropped (no FLOPs on them); in the "padded"
layout every sample has the same slot length and a key-padding mask excludes padded text (the
official formulation). Both give the same loss.

Where the sizes come from: if `text_padding_mask` lives on the CPU (the loaders yield it there,
the tokenizer runs on the CPU), the plan is built on the CPU and the packed row counts are exact;
the maps then travel to the GPU in ONE non-blocking copy. If the mask is already on the GPU, the
plan is built there without reading anything back: rows are sized for the worst case ("capacity")
and the unused tail rows are fillers (zero rows, zero loss weight, outside every `cu_seqlens`
segment).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..ops.index_maps import decoder_row_of_visible, inverse_map, scatter_rows  # noqa: F401 (re-exported)
from ..ops.reference import CLS_SOURCE, FILLER_SOURCE, KIND_CLS, KIND_IMAGE, KIND_TEXT


def draw_shuffle(batch: int, length: int, sharing: str, device, generator=None, noise=None):
    """ids_shuffle, ids_restore [B, L] int64 from uniform noise: MAE (per sample) or official (batch)."""
    if noise is None:
        rows = batch if sharing == "sample" else 1
        noise = torch.rand(rows, length, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise.to(device), dim=1)
    if ids_shuffle.shape[0] != batch:
        ids_shuffle = ids_shuffle.expand(batch, length)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


@dataclass
class SequenceLayout:
    """Rows of one transformer stack (encoder or decoder)."""
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int  # static upper bound of a sample's length
    rows: int  # rows of the packed tensor (exact, or capacity with filler tail)
    exact: bool  # False: rows >= cu_seqlens[-1], the tail is filler
    batch: int
    slot: int  # padded layout: every sample occupies `slot` rows
    packed: bool
    key_padding_mask: Optional[torch.Tensor] = None  # padded layout: [B, slot] bool, True = ignore


@dataclass
class MaskingPlan:
    batch: int
    num_patches: int
    text_length: int
    image_keep: int
    text_keep: int
    # masks in the official convention, original order: 1 = masked (predicted), 0 = visible
    image_mask: Optional[torch.Tensor]  # [B, Li] float
    text_mask: Optional[torch.Tensor]  # [B, Lt] float
    image_ids_restore: Optional[torch.Tensor]  # [B, Li] int64
    text_ids_restore: Optional[torch.Tensor]  # [B, Lt] int64
    # encoder gather maps
    enc: SequenceLayout
    enc_row_source: torch.Tensor  # [T] int32 (codes in reference.py)
    image_row_of: Optional[torch.Tensor]  # [B*Li] int32: packed row of each image token, -1 masked
    text_row_of: Optional[torch.Tensor]  # [B*Lt] int32: packed row of each text token, -1 dropped
    # decoder unshuffle maps
    dec: SequenceLayout
    dec_row_visible: torch.Tensor  # [R] int32: encoder row, or -1 for a mask token
    dec_row_kind: torch.Tensor  # [R] int32: 0 image, 1 text, 2 CLS, -1 filler
    dec_row_pos: torch.Tensor  # [R] int32: row of the position table
    dec_row_of_visible: torch.Tensor  # [T] int32: decoder row fed by each encoder row (-1 filler)
    # heads: the loss rows (masked positions; every position with the all-token losses)
    image_pred_rows: Optional[torch.Tensor]  # [B*Lm] int64: decoder rows of masked patches
    image_patch_index: Optional[torch.Tensor]  # [B*Lm] int32: b*Li + l
    image_row_weight: Optional[torch.Tensor]  # [B*Lm] float32
    text_pred_rows: Optional[torch.Tensor]  # [Nt] int64: decoder rows of masked (all) non-padded text
    text_target_index: Optional[torch.Tensor]  # [Nt] int64: b*Lt + l (into the text ids)
    text_row_weight: Optional[torch.Tensor]  # [Nt] float32 (0 for filler rows)

    def to(self, device) -> "MaskingPlan":
        """Move every tensor to `device` in one pinned, non-blocking copy (see transfer)."""
        device = torch.device(device)
        fields, items, layouts = {}, [], {}

        def visit(name, value):
            if isinstance(value, torch.Tensor) and value.device != device:
                items.append((name, value))
            else:
                fields[name] = value

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, SequenceLayout):
                layouts[f.name] = v
                for lf in dataclasses.fields(v):
                    visit(f"{f.name}.{lf.name}", getattr(v, lf.name))
            else:
                visit(f.name, v)
        fields.update(zip([name for name, _ in items], transfer([t for _, t in items], device)))
        out = {}
        for name, layout in layouts.items():
            out[name] = SequenceLayout(**{lf.name: fields.pop(f"{name}.{lf.name}")
                                          for lf in dataclasses.fields(layout)})
        out.update(fields)
        return MaskingPlan(**out)


def transfer(tensors: List[torch.Tensor], device) -> List[torch.Tensor]:
    """The tensors on `device` after one copy: their raw bytes packed into one buffer (each segment 8-byte
    aligned, so every dtype can view its own), pinned and copied non-blocking to a GPU, then viewed back in
    each tensor's dtype and shape. No casts, one launch, whatever the mix of dtypes."""
    device = torch.device(device)
    if not tensors:
        return []
    segments, offsets, offset = [], [], 0
    for t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        segments += [raw, raw.new_zeros(pad)]
        offsets.append(offset)
        offset += raw.numel() + pad
    flat = torch.cat(segments)
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return [flat[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, o in zip(tensors, offsets)]


def _layout_rows(lengths: torch.Tensor, slot: int, packed: bool, batch: int, exact: bool):
    """cu_seqlens [B+1] int64, rows, exact, lengths for the given per-sample lengths."""
    exact = exact or not packed
    if not packed:
        lengths = torch.full_like(lengths, slot)
    cu = torch.zeros(batch + 1, dtype=torch.int64, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    rows = int(cu[-1]) if exact else batch * slot
    return cu, rows, exact, lengths


def build_plan(batch: int, num_patches: int, image_keep: int, text_padding_mask: Optional[torch.Tensor],
               text_length: int, text_keep: int, *, has_image: bool = True, packed: bool = True,
               sharing: str = "sample", device=None, generator=None,
               image_noise: Optional[torch.Tensor] = None, text_noise: Optional[torch.Tensor] = None,
               exact_sizes: Optional[bool] = None, image_all_tokens: bool = False,
               text_all_tokens: bool = False) -> MaskingPlan:
    """Draw the masks and build every index map (see module docstring).

    text_padding_mask: [B, Lt] (1/True = padding) or None for an image-only forward.
    The plan is built on `text_padding_mask.device` if given, else on the image noise's or the
    generator's device, else on `device`.
    exact_sizes: size packed rows exactly (reads counts on the host); default: only when the plan is
    built on the CPU. False forces the capacity layout with a filler tail (no host sync).
    image_all_tokens / text_all_tokens: the loss rows are every patch / every non-padded text position
    instead of the masked ones (official image_all_token_loss / text_all_token_loss).
    Keep counts 0 (everything masked) and L (nothing masked) are valid: the maps are then empty where
    nothing is kept / nothing is predicted.
    """
    has_text = text_padding_mask is not None
    assert has_image or has_text, "a forward needs an image, a text, or both"
    if has_text:
        dev = text_padding_mask.device
    elif image_noise is not None:  # image-only: build where the caller's noise (or generator) lives
        dev = image_noise.device
    elif generator is not None:
        dev = generator.device
    else:
        dev = torch.device(device if device is not None else "cpu")
    B = batch
    Li = num_patches if has_image else 0
    Ki = image_keep if has_image else 0
    Lt = text_length if has_text else 0
    Kt = text_keep if has_text else 0
    i64 = dict(dtype=torch.int64, device=dev)
    exact = (dev.type == "cpu") if exact_sizes is None else bool(exact_sizes)
    ar_b = torch.arange(B, **i64)

    # ---- draw the masks ----
    if has_image:
        img_shuffle, img_restore = draw_shuffle(B, Li, sharing, dev, generator, image_noise)
        img_keep = img_shuffle[:, :Ki]  # [B, Ki], keep order
        image_mask = (img_restore >= Ki).float()
    else:
        img_keep = torch.zeros(B, 0, **i64)
        img_restore = image_mask = None
    if has_text:
        pad = text_padding_mask.to(dev) > 0  # [B, Lt] bool
        txt_shuffle, txt_restore = draw_shuffle(B, Lt, sharing, dev, generator, text_noise)
        txt_keep = txt_shuffle[:, :Kt]  # [B, Kt]
        keep_pad = pad.gather(1, txt_keep)  # [B, Kt] kept positions that are padding
        text_mask = (txt_restore >= Kt).float()
        if packed:  # stable partition: kept non-padded first, in keep order
            part = torch.argsort(keep_pad.to(torch.int8), dim=1, stable=True)
            txt_keep = txt_keep.gather(1, part)
            keep_pad = keep_pad.gather(1, part)
            n_text = (~keep_pad).sum(1)  # [B]
        else:
            n_text = torch.full((B,), Kt, **i64)
    else:
        pad = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        txt_keep = torch.zeros(B, 0, **i64)
        keep_pad = pad
        txt_restore = text_mask = None
        n_text = torch.zeros(B, **i64)

    # ---- encoder: [CLS, kept image, kept text] ----
    enc_slot = 1 + Ki + Kt
    enc_len = 1 + Ki + n_text
    cu_enc, enc_rows, enc_exact, enc_len = _layout_rows(enc_len, enc_slot, packed, B, exact)
    src = torch.cat([torch.full((B, 1), CLS_SOURCE, **i64),
                     ar_b[:, None] * Li + img_keep,
                     B * Li + ar_b[:, None] * Lt + txt_keep], 1)  # [B, slot]
    j = torch.arange(enc_slot, **i64)[None, :]
    slot_valid = j < enc_len[:, None]
    enc_dest = cu_enc[:-1, None] + j
    enc_row_source = scatter_rows(enc_dest, src, slot_valid, enc_rows, FILLER_SOURCE)
    image_row_of = text_row_of = None
    if has_image:
        image_row_of = scatter_rows(ar_b[:, None] * Li + img_keep, enc_dest[:, 1:1 + Ki],
                                     torch.ones_like(img_keep, dtype=torch.bool), B * Li, -1)
    if has_text:
        text_row_of = scatter_rows(ar_b[:, None] * Lt + txt_keep, enc_dest[:, 1 + Ki:],
                                    slot_valid[:, 1 + Ki:], B * Lt, -1)
    enc_kpm = None
    if not packed:
        enc_kpm = torch.cat([torch.zeros(B, 1 + Ki, dtype=torch.bool, device=dev), keep_pad], 1)
    enc = SequenceLayout(cu_enc.to(torch.int32), enc_slot, enc_rows, enc_exact, B, enc_slot, packed, enc_kpm)

    # ---- decoder: [CLS, Li image positions, text positions] ----
    if packed and has_text:  # non-padded text positions first, original order
        txt_pos = torch.argsort(pad.to(torch.int8), dim=1, stable=True)  # [B, Lt]
        n_dec_text = (~pad).sum(1)
    else:
        txt_pos = torch.arange(Lt, **i64)[None, :].expand(B, Lt)
        n_dec_text = torch.full((B,), Lt, **i64)
    dec_slot = 1 + Li + Lt
    dec_len = 1 + Li + n_dec_text
    cu_dec, dec_rows, dec_exact, dec_len = _layout_rows(dec_len, dec_slot, packed, B, exact)
    jd = torch.arange(dec_slot, **i64)[None, :]
    dec_valid = jd < dec_len[:, None]
    dec_dest = cu_dec[:-1, None] + jd  # [B, dec_slot]
    img_pos = torch.arange(Li, **i64)[None, :].expand(B, Li)
    vis_img = (image_row_of.view(B, Li).long() if has_image else torch.zeros(B, 0, **i64))
    vis_txt = (text_row_of.view(B, Lt).long().gather(1, txt_pos) if has_text else torch.zeros(B, 0, **i64))
    visible = torch.cat([cu_enc[:-1, None], vis_img, vis_txt], 1)  # [B, dec_slot]
    kind = torch.cat([torch.full((B, 1), KIND_CLS, **i64), torch.full((B, Li), KIND_IMAGE, **i64),
                      torch.full((B, Lt), KIND_TEXT, **i64)], 1)
    pos = torch.cat([torch.zeros(B, 1, **i64), img_pos, num_patches * int(has_image) + txt_pos], 1)
    dec_row_visible = scatter_rows(dec_dest, visible, dec_valid, dec_rows, -1)
    dec_row_kind = scatter_rows(dec_dest, kind, dec_valid, dec_rows, -1)
    dec_row_pos = scatter_rows(dec_dest, pos, dec_valid, dec_rows, 0)
    dec_row_of_visible = scatter_rows(visible, dec_dest, dec_valid & (visible >= 0), enc_rows, -1)
    dec_kpm = None
    if not packed:
        dec_kpm = torch.cat([torch.zeros(B, 1 + Li, dtype=torch.bool, device=dev), pad], 1)
    dec = SequenceLayout(cu_dec.to(torch.int32), dec_slot, dec_rows, dec_exact, B, dec_slot, packed, dec_kpm)

    # ---- heads: masked image patches (static count) ----
    image_pred_rows = image_patch_index = image_row_weight = None
    if has_image:
        if image_all_tokens:  # official patch_mse_loss without a mask: mean over every patch
            masked = torch.arange(Li, **i64)[None, :].expand(B, Li)
        else:
            masked = torch.sort(img_shuffle[:, Ki:], dim=1).values  # [B, Lm] original positions
        lm = masked.shape[1]
        image_pred_rows = (cu_dec[:-1, None] + 1 + masked).reshape(-1)
        image_patch_index = (ar_b[:, None] * Li + masked).reshape(-1).to(torch.int32)
        # official: per sample sum / (Lm / Li) / Li, then batch mean = 1 / (B * Lm) per row; Lm = 0 gives
        # no rows (the official 0/0 is refused by M3AEConfig.validate)
        image_row_weight = torch.full((B * lm,), 1.0 / (B * max(lm, 1)), dtype=torch.float32, device=dev)

    # ---- heads: masked (or, text_all_tokens, all), non-padded text positions (data-dependent count) ----
    text_pred_rows = text_target_index = text_row_weight = None
    if has_text:
        if text_all_tokens:  # official: mask_intersection(all_mask, not padding)
            m_pos = torch.arange(Lt, **i64)[None, :].expand(B, Lt)
        else:
            m_pos = txt_shuffle[:, Kt:]  # [B, Lm_t] masked positions
        lm_t = m_pos.shape[1]
        m_valid = ~pad.gather(1, m_pos)
        part = torch.argsort((~m_valid).to(torch.int8), dim=1, stable=True)
        m_pos, m_valid = m_pos.gather(1, part), m_valid.gather(1, part)
        m_count = m_valid.sum(1)  # [B]
        cu_t = torch.zeros(B + 1, **i64)
        cu_t[1:] = torch.cumsum(m_count, 0)
        t_exact = exact
        t_rows = int(cu_t[-1]) if t_exact else B * lm_t
        t_dest = cu_t[:-1, None] + torch.arange(lm_t, **i64)[None, :]
        if packed:  # decoder row of text position p = start + 1 + Li + rank of p among non-padded
            rank = torch.cumsum((~pad).long(), 1) - 1  # [B, Lt]
            dec_row = cu_dec[:-1, None] + 1 + Li + rank.gather(1, m_pos)
        else:
            dec_row = cu_dec[:-1, None] + 1 + Li + m_pos
        # filler rows point at row 0 with weight 0 and target index 0
        text_pred_rows = scatter_rows(t_dest, dec_row, m_valid, t_rows, 0, torch.int64)
        text_target_index = scatter_rows(t_dest, ar_b[:, None] * Lt + m_pos, m_valid, t_rows, 0, torch.int64)
        w = (1.0 / m_count.clamp_min(1).double() / B).float()  # official: / max(count, 1e-5); count 0 -> no rows
        text_row_weight = scatter_rows(t_dest, w[:, None].expand(B, lm_t), m_valid, t_rows, 0.0, torch.float32)

    return MaskingPlan(
        batch=B, num_patches=Li, text_length=Lt, image_keep=Ki, text_keep=Kt,
        image_mask=image_mask, text_mask=text_mask, image_ids_restore=img_restore, text_ids_restore=txt_restore,
        enc=enc, enc_row_source=enc_row_source, image_row_of=image_row_of, text_row_of=text_row_of,
        dec=dec, dec_row_visible=dec_row_visible, dec_row_kind=dec_row_kind, dec_row_pos=dec_row_pos,
        dec_row_of_visible=dec_row_of_visible,
        image_pred_rows=image_pred_rows, image_patch_index=image_patch_index, image_row_weight=image_row_weight,
        text_pred_rows=text_pred_rows, text_target_index=text_target_index, text_row_weight=text_row_weight,
    )
