"""Reconstructions: what a run has learnt, at a glance.

    python -m m3ae_engine.eval.reconstruct --checkpoint RUN_DIR --synthetic 8
    python -m m3ae_engine.eval.reconstruct --checkpoint RUN_DIR --folder photos/     # KEY.jpg [+ KEY.txt]
    python -m m3ae_engine.eval.reconstruct --checkpoint RUN_DIR --shards 'cc12m/{00000..00009}.tar'

Writes OUTPUT_DIR/reconstructions.png, one row per sample:
    original | masked input | reconstruction | reconstruction with the visible patches pasted back
and OUTPUT_DIR/index.html beside it: the grid, and per sample the caption, the caption as the model
saw it ([MASK] where words were masked) and the model's predictions for the masked words (green =
right, red = wrong), with the per-sample image loss and word accuracy.
"""
from __future__ import annotations

import argparse
import glob
import html
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..data.sources import expand_braces, split_sources  # brace ranges, {a,b} alternatives
from ..ops.reference import normalize_image, patchify, unpatchify
from .features import IMAGE_EXTENSIONS, add_model_args, load_image, model_from_args

CAPTION_EXTENSIONS = (".txt", ".caption")


# ------------------------------------------------------------------------------------------ inputs
def samples_from_shards(pattern: str, n: int, image_size: int) -> List[Tuple[torch.Tensor, Optional[str]]]:
    paths = []
    for part in split_sources(pattern):
        for p in expand_braces(part):
            paths += sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    out: List[Tuple[torch.Tensor, Optional[str]]] = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"shard not found: {path}")
        groups: dict = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS or ext in CAPTION_EXTENSIONS:
                    groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(groups):
            g = groups[key]
            img_ext = next((e for e in g if e in IMAGE_EXTENSIONS), None)
            if img_ext is None:
                continue
            cap = next((g[e].decode("utf-8", "replace").strip() for e in CAPTION_EXTENSIONS if e in g), None)
            try:
                img = load_image(io.BytesIO(g[img_ext]), image_size, 1.0)
            except ValueError as e:
                print(f"skipping {path}:{key}: {e}", file=sys.stderr)
                continue
            out.append((img, cap))
            if len(out) == n:
                return out
    if not out:
        raise ValueError(f"no image samples in {pattern!r}")
    return out


def samples_from_folder(folder, n: int, image_size: int) -> List[Tuple[torch.Tensor, Optional[str]]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
    if not files:
        raise ValueError(f"{folder} holds no images")
    out = []
    for f in files:
        cap = next((f.with_suffix(e).read_text().strip() for e in CAPTION_EXTENSIONS if f.with_suffix(e).is_file()),
                   None)
        out.append((load_image(f, image_size, 1.0), cap))
    return out


def samples_synthetic(n: int, image_size: int, seed: int = 0) -> List[Tuple[torch.Tensor, Optional[str]]]:
    from ..data.synthetic import make_sample
    out = []
    for i in range(n):
        img, cap = make_sample(i, seed, image_size)
        out.append((torch.from_numpy(img).permute(2, 0, 1).contiguous(), cap))
    return out


# ------------------------------------------------------------------------------------------ model
def _to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """normalised float [B, 3, H, W] -> uint8 (x * std + mean) * 255."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x.float().cpu() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, captions: Optional[List[str]] = None, seed: int = 0,
                tokenizer=None) -> dict:
    """Run one masked forward; returns uint8 panels [B, 3, H, W] and the text predictions."""
    c = model.config
    dev = next(model.parameters()).device
    b = images.shape[0]
    text = pad = None
    if captions is not None:
        from ..model.tokenizer import default_tokenizer
        tok = tokenizer or default_tokenizer(c.text_length)
        text, pad = tok.encode_batch([s or "" for s in captions])
        if int(text.max()) >= c.vocab_size:
            raise ValueError(f"tokenizer ids reach {int(text.max())} but the model's vocabulary has {c.vocab_size}")
    # the masking plan is drawn where the text padding mask lives (CPU), else on the model's device
    gen = torch.Generator(device="cpu" if text is not None else dev).manual_seed(seed)
    out = model(images.to(dev), text, pad, generator=gen, return_text_logits=captions is not None)
    mean, std = c.image_mean, c.image_std
    norm = normalize_image(images, mean, std)  # the model's own normalisation
    target = patchify(norm, c.patch_size)  # [B, L, P]
    pred = out.image_prediction_full().float().cpu()  # [B, L, P], zeros at visible patches
    if c.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    mask = out.image_mask.float().cpu()[..., None]  # [B, L, 1] 1 = masked
    per_sample_mse = (((pred - target) ** 2).mean(-1) * mask[..., 0]).sum(1) / mask[..., 0].sum(1).clamp_min(1)
    grey = torch.zeros_like(target)  # normalised value of the dataset mean: a neutral grey
    panels = {
        "original": images.cpu(),
        "masked": _to_uint8(unpatchify(target * (1 - mask) + grey * mask, c.patch_size, c.in_channels), mean, std),
        "reconstruction": _to_uint8(unpatchify(pred, c.patch_size, c.in_channels), mean, std),
        "pasted": _to_uint8(unpatchify(pred * mask + target * (1 - mask), c.patch_size, c.in_channels), mean, std),
    }
    texts = None
    if captions is not None:
        logits = out.text_logits.float().cpu()
        index = out.text_target_index.cpu()
        weight = out.text_row_weight.cpu()
        ids = text.clone()
        text_mask = out.text_mask.cpu()  # [B, Lt] 1 = masked (the loss rows cover every token with text_all_token_loss)
        predicted = {}
        for r in range(index.shape[0]):
            if weight[r] > 0:
                predicted[int(index[r])] = int(logits[r].argmax())
        texts = []
        for i in range(b):
            toks = []
            for j in range(c.text_length):
                if pad[i, j] > 0:
                    continue
                k = i * c.text_length + j
                toks.append({"target": int(ids[i, j]), "masked": bool(text_mask[i, j] > 0), "pred": predicted.get(k)})
            texts.append(toks)
    return {"panels": panels, "image_mse": per_sample_mse, "texts": texts, "text_ids": text,
            "image_loss": None if out.image_loss is None else float(out.image_loss),
            "text_loss": None if out.text_loss is None else float(out.text_loss)}


# ------------------------------------------------------------------------------------------ output
COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")


def make_grid(panels: dict, scale: int = 1, pad: int = 2) -> "Image.Image":
    from PIL import Image
    cols = [panels["original"], panels["masked"], panels["reconstruction"], panels["pasted"]]
    b, _, h, w = cols[0].shape
    H, W = h * scale, w * scale
    grid = Image.new("RGB", (4 * W + 5 * pad, b * H + (b + 1) * pad), (255, 255, 255))
    for i in range(b):
        for j, col in enumerate(cols):
            im = Image.fromarray(col[i].permute(1, 2, 0).numpy())
            if scale != 1:
                im = im.resize((W, H), Image.NEAREST)
            grid.paste(im, (pad + j * (W + pad), pad + i * (H + pad)))
    return grid


def write_html(path: Path, grid_name: str, result: dict, captions, tokenizer, meta: dict) -> None:
    def tok(i):
        return html.escape(tokenizer.id_to_token(i) if tokenizer is not None else str(i))

    rows = []
    for i in range(len(result["image_mse"])):
        cells = [f"<td>{i}</td><td>{float(result['image_mse'][i]):.4f}</td>"]
        if result["texts"] is not None:
            toks = result["texts"][i]
            seen = " ".join('<span class="m">[MASK]</span>' if t["masked"] else tok(t["target"]) for t in toks)
            pred_parts, n, right = [], 0, 0
            for t in toks:
                if not t["masked"]:
                    pred_parts.append(tok(t["target"]))
                    continue
                ok = t["pred"] == t["target"]
                n, right = n + 1, right + ok
                pred_parts.append(f'<span class="{"ok" if ok else "bad"}" title="target: {tok(t["target"])}">'
                                  f'{tok(t["pred"])}</span>')
            acc = f"{right}/{n}" if n else "-"
            cells.append(f"<td>{html.escape(captions[i] or '')}</td><td>{seen}</td><td>{' '.join(pred_parts)}</td>"
                         f"<td>{acc}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    text_head = ("<th>caption</th><th>model input</th><th>predictions (green right, red wrong)</th>"
                 "<th>words right</th>") if result["texts"] is not None else ""
    meta_html = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>M3AE reconstructions</title>
<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}} .m{{background:#ddd}} .ok{{color:#070;font-weight:bold}}
.bad{{color:#b00;font-weight:bold;text-decoration:underline}}</style></head><body>
<h1>M3AE reconstructions</h1><ul>{meta_html}</ul>
<p>Columns: {' | '.join(COLUMNS)}; one row per sample.</p>
<img src="{html.escape(grid_name)}" alt="reconstruction grid" style="image-rendering:pixelated">
<h2>Samples</h2><table><tr><th>#</th><th>image MSE (masked patches)</th>{text_head}</tr>
{chr(10).join(rows)}</table></body></html>
"""
    path.write_text(page, encoding="utf-8")


def add_sample_source_args(p: argparse.ArgumentParser):
    """--shards | --folder | --synthetic N (one required): the samples an eval tool reads; returns the
    group so a tool can add its own source."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="WebDataset tar shards (KEY.jpg + KEY.txt): glob, {a..b} or comma list")
    src.add_argument("--folder", help="images (with optional same-name .txt captions)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N built-in synthetic image-caption pairs")
    return src


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.eval.reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sample_source_args(p)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--output-dir", default="reconstructions")
    p.add_argument("--seed", type=int, default=0, help="masking seed")
    p.add_argument("--image-mask-ratio", type=float, default=None)
    p.add_argument("--text-mask-ratio", type=float, default=None)
    p.add_argument("--image-only", action="store_true", help="ignore captions (automatic for MAE checkpoints)")
    p.add_argument("--scale", type=int, default=None, help="upscale factor of the grid (default: to >=128 px)")
    args = p.parse_args(argv)
    if args.num_samples < 1 or (args.synthetic is not None and args.synthetic < 1):
        p.error("the number of samples must be >= 1")
    try:
        model, report, device = model_from_args(args)
        c = model.config
        if args.image_mask_ratio is not None or args.text_mask_ratio is not None:
            c.image_mask_ratio = c.image_mask_ratio if args.image_mask_ratio is None else args.image_mask_ratio
            c.text_mask_ratio = c.text_mask_ratio if args.text_mask_ratio is None else args.text_mask_ratio
            c.validate()
        n = args.synthetic if args.synthetic is not None else args.num_samples
        if args.shards:
            samples = samples_from_shards(args.shards, n, c.image_size)
        elif args.folder:
            samples = samples_from_folder(args.folder, n, c.image_size)
        else:
            samples = samples_synthetic(n, c.image_size, args.seed)
        images = torch.stack([s[0] for s in samples])
        image_only = args.image_only or "text_embedding.weight" in report.not_converted
        captions = None if image_only or all(s[1] is None for s in samples) else [s[1] for s in samples]
        tokenizer = None
        if captions is not None:
            from ..model.tokenizer import default_tokenizer
            tokenizer = default_tokenizer(c.text_length)
        result = reconstruct(model, images, captions, args.seed, tokenizer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = args.scale or max(1, -(-128 // c.image_size))
    make_grid(result["panels"], scale).save(out / "reconstructions.png")
    meta = {"checkpoint": args.checkpoint, "samples": len(samples), "image mask ratio": c.image_mask_ratio,
            "text mask ratio": c.text_mask_ratio if captions is not None else "-", "seed": args.seed,
            "image loss": result["image_loss"], "text loss": result["text_loss"]}
    write_html(out / "index.html", "reconstructions.png", result, captions, tokenizer, meta)
    (out / "reconstructions.json").write_text(json.dumps(
        {**meta, "image_mse_per_sample": [float(v) for v in result["image_mse"]]}, indent=2))
    print(f"wrote {out / 'reconstructions.png'} and {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
