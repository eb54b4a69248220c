"""Attention maps: which image patches each caption word (and CLS) attends to.

    python -m m3ae_engine.eval.attention --checkpoint RUN_DIR --synthetic 4 --output-dir attn/
    python -m m3ae_engine.eval.attention --checkpoint RUN_DIR --image dog.jpg --caption "a dog on a sofa"
    python -m m3ae_engine.eval.attention --checkpoint RUN_DIR --shards 'cc12m/{00000..00009}.tar' --layers 0,5,-1

The encoder runs on the unmasked image and caption (as `M3AE.forward_representation`) on a plain path
that keeps the attention probabilities (the fused kernels training may have used do not return them);
its output is checked against `forward_representation` before anything is drawn.
Writes, per sample, OUTPUT_DIR/sample_NNN.png: one row for CLS and one per caption word (WordPiece
pieces of a word merged, their rows averaged; special tokens and padding skipped), one column per
chosen layer (attention averaged over heads) and one for the attention rollout over all layers
(Abnar & Zuidema 2020), each a heat map over the image patches laid on the image, titled with the
share of the row's attention that lands on the image; OUTPUT_DIR/sample_NNN.npz with the maps as
numbers; and OUTPUT_DIR/index.html showing them with the captions.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..storage.atomic import atomic_write_stream
from ..model.attention import HALF_ONLY, AttentionBackendUnavailable, resolve_backend
from .attention_maps import (SampleMaps, attention_rollout, caption_words, encoder_attention, head_average,
                             max_encoder_difference, resolve_layers, sample_maps)
from .features import add_model_args, load_image, model_from_args
from .reconstruct import add_sample_source_args, samples_from_folder, samples_from_shards, samples_synthetic

# |plain path - forward_representation| / max(1, |x|) allowed: fp32 kernels differ from the plain
# matmul + softmax only by rounding order; half-precision-only kernels round q, k, v to bf16
TOLERANCE_FP32, TOLERANCE_HALF = 1e-3, 5e-2


class AttentionPathMismatch(RuntimeError):
    """The plain path's encoder output is not the model's: its maps would describe another computation."""


# ------------------------------------------------------------------------------------------ compute
def _check_tolerance(model, device) -> float:
    c = model.config
    name = resolve_backend(None if c.attention == "auto" else c.attention, device, torch.float32,
                           c.emb_dim // c.num_heads)
    return TOLERANCE_HALF if name in HALF_ONLY else TOLERANCE_FP32


@torch.no_grad()
def attention_maps(model, image: torch.Tensor, caption: Optional[str], layers: List[int], tokenizer=None
                   ) -> tuple:
    """One sample: image uint8 [3, H, W], caption or None (CLS only) -> (SampleMaps, relative max
    difference of the plain path's encoder output from forward_representation's). A caption the
    tokenizer keeps no word of gives CLS maps only."""
    c = model.config
    text = pad = None
    words = []
    if caption is not None:
        text, pad = tokenizer.encode_batch([caption])  # [1, Lt] ids, [1, Lt] 1 = padding
        if int(text.max()) >= c.vocab_size:
            raise ValueError(f"tokenizer ids reach {int(text.max())} but the model's vocabulary has {c.vocab_size}")
        words = caption_words(text[0].tolist(), pad[0].tolist(), tokenizer.id_to_token)
    images = image[None]
    x, probs = encoder_attention(model, images, text, pad)
    diff = max_encoder_difference(model, x, images, text, pad)
    mean = head_average(probs)  # [L, 1, S, S]
    return sample_maps(mean, attention_rollout(mean), 0, c.num_patches, layers, words), diff


# ------------------------------------------------------------------------------------------ drawing
CELL, TITLE_BAND, GAP = 128, 30, 6  # pixels of a map tile, of the two title lines above it, between tiles
ALPHA = 0.6  # heat map opacity over the image


def _resize(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """[h, w(, 3)] uint8 -> [size, size(, 3)]: nearest for patch grids (one flat block per patch)."""
    from PIL import Image
    im = Image.fromarray(arr)
    return np.asarray(im.resize((size, size), Image.NEAREST if nearest else Image.BICUBIC))


def overlay_tile(image_tile: np.ndarray, grid: np.ndarray, colormap) -> np.ndarray:
    """[CELL, CELL, 3] uint8 image and a [G, G] map -> the map (coloured from 0 to its own maximum,
    one flat block per patch) blended over the image."""
    top = float(grid.max())
    rgb = (colormap(grid / top if top > 0 else grid)[..., :3] * 255).round().astype(np.uint8)  # [G, G, 3]
    heat = _resize(rgb, image_tile.shape[0], nearest=True).astype(np.float32)
    return (ALPHA * heat + (1 - ALPHA) * image_tile.astype(np.float32)).round().astype(np.uint8)


def render_png(path: Path, image: torch.Tensor, maps: SampleMaps) -> None:
    """Rows: CLS, then words; columns: the image (CLS row) or the word, each chosen layer, rollout.
    The tiles are composed as one array and drawn on a single matplotlib axes (one axes per tile costs
    seconds per sample for long captions)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    colormap = matplotlib.colormaps["inferno"]
    image_tile = _resize(image.permute(1, 2, 0).cpu().numpy(), CELL, nearest=image.shape[-1] < CELL)
    titles = [f"layer {l}" for l in maps.layers] + ["rollout"]
    rows, cols = len(maps.labels), 1 + len(titles)
    row_h, col_w = TITLE_BAND + CELL + GAP, CELL + GAP
    canvas = np.full((rows * row_h, cols * col_w, 3), 255, np.uint8)
    texts = []  # (x, y, text, fontsize) in canvas pixels

    def put(tile, r, c):
        y, x = r * row_h + TITLE_BAND, c * col_w + GAP // 2
        canvas[y:y + CELL, x:x + CELL] = tile

    put(image_tile, 0, 0)
    texts.append((GAP // 2 + CELL / 2, TITLE_BAND - 4, "image", 9))
    for r, label in enumerate(maps.labels):
        if r > 0:
            texts.append((GAP // 2 + CELL / 2, r * row_h + TITLE_BAND + CELL / 2, label, 12))
        grids = [maps.layer_maps[r, j] for j in range(len(maps.layers))] + [maps.rollout_maps[r]]
        for j, (grid, title) in enumerate(zip(grids, titles)):
            put(overlay_tile(image_tile, grid, colormap), r, 1 + j)
            head = f"{label} {title}" if r == 0 else title
            texts.append(((1 + j) * col_w + GAP // 2 + CELL / 2, r * row_h + TITLE_BAND - 4,
                          f"{head}\n{100 * float(grid.sum()):.0f}% on image", 8))
    height, width = canvas.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for x, y, text, size in texts:
        ax.text(x, y, text, ha="center", va="bottom" if size < 12 else "center", fontsize=size)
    atomic_write_stream(path, lambda f: fig.savefig(f, format="png", dpi=100))


def save_npz(path: Path, maps: SampleMaps) -> None:
    atomic_write_stream(path, lambda f: np.savez(f, labels=np.array(maps.labels), layers=np.array(maps.layers),
                                           layer_maps=maps.layer_maps, rollout_maps=maps.rollout_maps))


def write_html(path: Path, entries: List[dict], meta: dict) -> None:
    meta_html = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    sections = []
    for e in entries:
        words = (" ".join(f'<span class="w">{html.escape(w)}</span>' for w in e["words"])
                 or "<i>no caption: CLS only</i>")
        caption = html.escape(e["caption"]) if e["caption"] is not None else "<i>none</i>"
        sections.append(
            f'<h2>Sample {e["index"]}</h2><p><b>caption</b>: {caption}<br><b>words</b>: {words}<br>'
            f'<small>plain path vs forward_representation: max relative difference {e["difference"]:.2e}</small></p>'
            f'<img src="{html.escape(e["png"])}" alt="attention maps of sample {e["index"]}">')
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>M3AE attention maps</title>
<style>body{{font-family:sans-serif}} .w{{background:#eef;padding:0 3px;margin:0 1px;border-radius:3px}}
img{{max-width:100%}}</style></head><body>
<h1>M3AE attention maps</h1><ul>{meta_html}</ul>
<p>Rows: CLS, then each caption word (WordPiece pieces merged, their attention rows averaged). Columns:
attention to the image patches averaged over heads at each chosen layer, then the attention rollout over
all encoder layers (Abnar &amp; Zuidema 2020). Each map has its own colour scale (inferno: dark = 0, bright =
its maximum); its title gives the share of the row's attention that lands on image patches.</p>
{chr(10).join(sections)}
</body></html>
"""
    atomic_write_stream(path, lambda f: f.write(page.encode("utf-8")))


# ------------------------------------------------------------------------------------------ CLI
def _samples(args, image_size: int) -> list:
    n = args.synthetic if args.synthetic is not None else args.num_samples
    if args.shards:
        return samples_from_shards(args.shards, n, image_size)
    if args.folder:
        return samples_from_folder(args.folder, n, image_size)
    if args.synthetic is not None:
        return samples_synthetic(n, image_size, args.seed)
    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: file not found")
    return [(load_image(path, image_size, 1.0), args.caption)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.eval.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = add_sample_source_args(p)
    src.add_argument("--image", metavar="FILE", help="one image (with --caption)")
    p.add_argument("--caption", help="the caption of --image (without it: CLS maps only)")
    p.add_argument("--layers", default="-1",
                   help="encoder layers to show, 0-based, negative from the top: '-1' (default), '0,5,-1', 'all'")
    p.add_argument("--num-samples", type=int, default=8, help="samples read from --shards / --folder")
    p.add_argument("--output-dir", default="attention")
    p.add_argument("--seed", type=int, default=0, help="seed of the --synthetic samples")
    p.add_argument("--image-only", action="store_true", help="ignore captions (automatic for MAE checkpoints)")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    try:
        try:
            import matplotlib  # noqa: F401  (checked first: the PNGs need it, after minutes of compute)
        except ImportError:
            raise ValueError("eval.attention draws its PNGs with matplotlib, which is not installed: "
                             "pip install matplotlib (or the eval extra: pip install -e \".[eval]\")") from None
        if args.num_samples < 1 or (args.synthetic is not None and args.synthetic < 1):
            raise ValueError("the number of samples must be >= 1")
        if args.caption is not None and args.image is None:
            raise ValueError("--caption goes with --image")
        if args.caption is not None and not args.caption.strip():
            raise ValueError("--caption is empty: give the image's caption, or leave --caption out for CLS maps only")
        model, report, device = model_from_args(args)
        c = model.config
        layers = resolve_layers(args.layers, c.depth)
        try:
            tolerance = _check_tolerance(model, device)
        except AttentionBackendUnavailable as e:  # the training run's backend is not here: check with auto
            print(f"note: {e}; the check against forward_representation uses 'auto'", file=sys.stderr)
            c.attention = "auto"
            tolerance = _check_tolerance(model, device)
        samples = _samples(args, c.image_size)
        image_only = args.image_only or "text_embedding.weight" in report.not_converted
        if image_only and args.caption is not None:
            print("note: image-only model (or --image-only): the caption is not used, CLS maps only", file=sys.stderr)
        tokenizer = None
        if not image_only:
            from ..model.tokenizer import default_tokenizer
            tokenizer = default_tokenizer(c.text_length)
        entries = []
        out.mkdir(parents=True, exist_ok=True)
        for i, (image, caption) in enumerate(samples):
            caption = caption if caption and caption.strip() and not image_only else None
            maps, diff = attention_maps(model, image, caption, layers, tokenizer)
            if args.image is not None and caption is not None and len(maps.labels) == 1:
                raise ValueError(f"--caption {caption!r}: the tokenizer keeps no word of it")
            if not diff <= tolerance:
                raise AttentionPathMismatch(f"sample {i}: the plain attention path's encoder output differs from "
                                            f"forward_representation's by {diff:.2e} (> {tolerance:g}): "
                                            f"maps not written")
            render_png(out / f"sample_{i:03d}.png", image, maps)
            save_npz(out / f"sample_{i:03d}.npz", maps)
            entries.append({"index": i, "caption": caption, "words": maps.labels[1:], "difference": diff,
                            "png": f"sample_{i:03d}.png"})
    except (OSError, ValueError, AttentionBackendUnavailable, AttentionPathMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"checkpoint": args.checkpoint, "samples": len(entries), "layers": ", ".join(map(str, layers)),
            "encoder depth": c.depth, "heads": c.num_heads, "image-only": image_only}
    write_html(out / "index.html", entries, meta)
    atomic_write_stream(out / "attention.json", lambda f: f.write(json.dumps({**meta, "samples": entries}, indent=2)
                                                           .encode("utf-8")))
    print(f"wrote {len(entries)} sample PNGs and {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
