"""Shard tools: `python -m m3ae_engine.data.shards {write,index,validate,stats}`.

  write SRC OUT [--captions FILE.csv|FILE.jsonl] [--samples-per-shard N]
      WebDataset shards OUT/00000.tar, ... (KEY.jpg + KEY.txt + KEY.json, as img2dataset writes them)
      from a folder of images with captions: a sidecar IMAGE.txt next to each image, or a CSV
      (path,caption; header optional) / JSONL ({"path": ..., "caption": ...}) keyed by the path
      relative to SRC, the file name or the file name without extension (a name or stem shared by
      two images is an error). Writing no sample at all is an error (exit 2). JPEGs are stored as they are; other formats are re-encoded to JPEG (quality 95). Each
      shard gets its DALI index (.idx).
  index SHARDS...                       DALI wds2idx index (v1.2) next to each shard
  validate SHARDS... [--fix OUT] [--image-only]
      decode every image; one line per bad sample `SHARD<TAB>KEY<TAB>PROBLEM<TAB>detail` with PROBLEM
      in corrupt | truncated | non-jpeg | missing-image | missing-caption | truncated-tar | empty |
      unsafe-name (an absolute or `..` member name); exit 1 when any. --fix writes cleaned shards (bad
      samples and unsafe members dropped, decodable non-JPEGs re-encoded; no file for a shard left
      empty) with their indices into OUT.
  stats SHARDS... [--text-length L] [--json]
      sample / image / caption counts and the caption length distribution in tokens.
SHARDS: paths, globs or brace patterns (data/{00000..00099}.tar).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tarfile
import time
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from .sources import (IMAGE_EXTS, DataError, decode_text, expand_sources, index_path_for, iter_tar_samples, scan_tar,
                      write_index)
from .transforms import decode_pil, is_jpeg, jpeg_complete

PIL_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes samples {ext: bytes} into numbered tars of at most `samples_per_shard` samples (+ .idx)."""

    def __init__(self, out_dir: str, samples_per_shard: int = 10000, start_shard: int = 0, index: bool = True,
                 name_of=None):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.per, self.index = out_dir, samples_per_shard, index
        self.shard, self.count, self.tf, self.written = start_shard, 0, None, []
        self.name_of = name_of or (lambda n: f"{n:05d}.tar")
        self.mtime = time.time()

    def _open(self):
        path = os.path.join(self.out_dir, self.name_of(self.shard))
        self.tf = tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self.path = path

    def _close(self):
        if self.tf is not None:
            self.tf.close()
            os.replace(self.path + ".tmp", self.path)
            if self.index:
                write_index(scan_tar(self.path), index_path_for(self.path))
            self.written.append(self.path)
            self.tf = None
            self.shard += 1
            self.count = 0

    def write(self, key: str, members: Dict[str, bytes]) -> None:
        if self.tf is None:
            self._open()
        for ext, data in members.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode = len(data), int(self.mtime), 0o644
            self.tf.addfile(ti, io.BytesIO(data))
        self.count += 1
        if self.count >= self.per:
            self._close()

    def close(self) -> List[str]:
        self._close()
        return self.written


def to_jpeg(data: bytes, quality: int = 95) -> bytes:
    b = io.BytesIO()
    decode_pil(data).save(b, "JPEG", quality=quality)
    return b.getvalue()


def _read_captions(path: str) -> Dict[str, str]:
    caps: Dict[str, str] = {}
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {n}: not JSON ({e})") from None
                    p = row.get("path", row.get("image", row.get("file")))
                    c = row.get("caption", row.get("text"))
                    if p is None or c is None:
                        raise DataError(f"{path} line {n}: needs 'path' and 'caption' fields, got {sorted(row)}")
                    caps[os.path.normpath(p)] = str(c)
        else:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            if rows and [c.strip().lower() for c in rows[0][:2]] in (["path", "caption"], ["image", "caption"],
                                                                     ["file", "caption"], ["path", "text"]):
                rows = rows[1:]
            for n, row in enumerate(rows, 1):
                if not row:
                    continue
                if len(row) < 2:
                    raise DataError(f"{path} row {n}: needs path,caption, got {row}")
                caps[os.path.normpath(row[0])] = row[1]
    except OSError as e:
        raise DataError(f"cannot read captions file {path}: {e}") from None
    return caps


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def match_captions(images: List[str], caps: Dict[str, str]) -> Tuple[Dict[str, str], List[str]]:
    """{image relpath: caption} for caption keys given as the relative path, with or without extension, the
    file name or its stem; and the keys that match no image. A key matching several images is an error."""
    by_key: Dict[str, set] = {}
    for rel in images:
        rel_n = os.path.normpath(rel)
        for k in {rel_n, _stem(rel_n), os.path.basename(rel_n), _stem(os.path.basename(rel_n))}:
            by_key.setdefault(k, set()).add(rel)
    out, unmatched = {}, []
    for key, cap in caps.items():
        hits = by_key.get(key, set())
        exact = [r for r in hits if os.path.normpath(r) == key]
        if exact:
            hits = set(exact)
        if len(hits) > 1:
            raise DataError(f"caption key {key!r} matches {len(hits)} images ({', '.join(sorted(hits)[:3])}); "
                            f"key the captions by the path relative to the image folder")
        if not hits:
            unmatched.append(key)
            continue
        out[hits.pop()] = cap
    return out, unmatched


def write_shards(src: str, out_dir: str, captions: Optional[str] = None, samples_per_shard: int = 10000,
                 quality: int = 95) -> Tuple[List[str], Dict[str, int]]:
    """Shards from a folder of images (+ sidecar .txt, or a CSV/JSONL captions file). Returns (shards, counts)."""
    if not os.path.isdir(src):
        raise DataError(f"image folder not found: {src}")
    caps = _read_captions(captions) if captions else None
    images = []
    for root, _, files in os.walk(src):
        for fn in files:
            if os.path.splitext(fn)[1].lower() in PIL_EXTS:
                images.append(os.path.relpath(os.path.join(root, fn), src))
    images.sort()
    if not images:
        raise DataError(f"no images ({', '.join(PIL_EXTS)}) under {src}")
    unmatched: List[str] = []
    if caps is not None:
        caps, unmatched = match_captions(images, caps)
        if unmatched:
            print(f"warning: {len(unmatched)} caption key(s) match no image under {src}, e.g. "
                  f"{', '.join(repr(k) for k in unmatched[:3])}", file=sys.stderr)
    w = ShardWriter(out_dir, samples_per_shard)
    counts = {"written": 0, "missing_caption": 0, "unreadable": 0, "reencoded": 0,
              "unmatched_captions": len(unmatched)}
    digits = max(4, len(str(samples_per_shard - 1)))
    for rel in images:
        path = os.path.join(src, rel)
        if caps is not None:
            cap = caps.get(rel)
        else:
            side = os.path.splitext(path)[0] + ".txt"
            cap = open(side, encoding="utf-8").read().strip() if os.path.exists(side) else None
        if not cap:
            counts["missing_caption"] += 1
            print(f"warning: no caption for {path}, skipped", file=sys.stderr)
            continue
        with open(path, "rb") as f:
            data = f.read()
        if not is_jpeg(data):
            try:
                data = to_jpeg(data, quality)
                counts["reencoded"] += 1
            except Exception as e:
                counts["unreadable"] += 1
                print(f"warning: cannot read image {path} ({e}), skipped", file=sys.stderr)
                continue
        key = f"{w.shard:05d}{w.count:0{digits}d}"
        meta = json.dumps({"key": key, "path": rel, "caption": cap}).encode()
        w.write(key, {"jpg": data, "txt": cap.encode("utf-8"), "json": meta})
        counts["written"] += 1
    written = w.close()
    if not counts["written"]:
        source = f"{captions} (keys: path relative to {src}, file name or stem)" if captions else \
            "sidecar IMAGE.txt files"
        raise DataError(f"no sample written: none of the {len(images)} image(s) under {src} has a caption from "
                        f"{source}; counts {counts}")
    return written, counts


def index_shards(paths: Iterable[str]) -> List[str]:
    out = []
    for p in paths:
        idx = index_path_for(p)
        write_index(scan_tar(p), idx)
        out.append(idx)
    return out


# ---------------------------------------------------------------------------------------------- validation
def check_image(data: bytes) -> Optional[Tuple[str, str]]:
    """None when `data` is a decodable JPEG, else (problem, detail)."""
    from PIL import Image
    if not jpeg_complete(data):  # the loaders' rule (transforms.jpeg_complete)
        return "truncated", "JPEG without an end-of-image marker after the last scan"
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.width < 1 or img.height < 1:
            return "corrupt", "empty image"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        return ("truncated" if "truncat" in str(e).lower() else "corrupt"), msg
    if not is_jpeg(data):
        return "non-jpeg", f"{img.format or 'unknown'} data in a JPEG member"
    return None


def validate_shard(path: str, need_caption: bool = True) -> Tuple[List[Tuple[str, str, str]], int,
                                                                      List[Tuple[str, Dict[str, bytes]]]]:
    """(problems [(key, problem, detail)], samples seen, clean samples for --fix)."""
    problems, clean, n, unsafe = [], [], 0, []
    try:
        for key, mem in iter_tar_samples(path, unsafe):
            n += 1
            ie = next((e for e in IMAGE_EXTS if e in mem), None)
            if ie is None:
                problems.append((key, "missing-image", f"members {sorted(mem)}"))
                continue
            bad = check_image(mem[ie])
            if need_caption and not mem.get("txt", b"").strip():
                problems.append((key, "missing-caption", "no .txt member" if "txt" not in mem else "empty .txt"))
                if bad:
                    problems.append((key,) + bad)
                continue
            if bad is None:
                clean.append((key, mem))
                continue
            problems.append((key,) + bad)
            if bad[0] == "non-jpeg":  # decodable: --fix re-encodes it
                fixed = dict(mem)
                fixed.pop(ie)
                fixed["jpg"] = to_jpeg(mem[ie])
                clean.append((key, fixed))
    except DataError as e:
        problems.append(("-", "truncated-tar", str(e)))
    problems += [(name, "unsafe-name", "absolute or '..' member name (never read; dropped by --fix)")
                 for name in unsafe]
    if n == 0 and not problems:
        problems.append(("-", "empty", "no samples in this tar (training rejects it)"))
    return problems, n, clean


def _cmd_validate(args) -> int:
    paths = expand_sources(args.shards)
    total_bad, total = 0, 0
    if args.fix:
        if any(os.path.abspath(os.path.dirname(p)) == os.path.abspath(args.fix) for p in paths):
            raise DataError(f"--fix {args.fix}: write the cleaned shards to another folder than the originals")
        os.makedirs(args.fix, exist_ok=True)
    for p in paths:
        problems, n, clean = validate_shard(p, need_caption=not args.image_only)
        total += n
        for key, prob, detail in problems:
            print(f"{p}\t{key}\t{prob}\t{detail}")
        total_bad += len({k for k, _, _ in problems})
        if args.fix:
            name = os.path.basename(p)
            w = ShardWriter(args.fix, samples_per_shard=max(1, len(clean)), name_of=lambda _n, name=name: name)
            for key, mem in clean:
                w.write(key, mem)
            w.close()
    print(f"validated {len(paths)} shard(s), {total} samples: {total_bad} bad", file=sys.stderr)
    return 1 if total_bad else 0


# ---------------------------------------------------------------------------------------------- stats
def shard_stats(paths: List[str], text_length: int = 64) -> dict:
    from ..model.tokenizer import Tokenizer
    tok = Tokenizer(os.environ.get("M3AE_TOKENIZER"), max_length=100000)
    tok._tok.no_truncation()
    tok._tok.no_padding()
    per_shard, lengths = {}, []
    n_img = n_txt = n = 0
    for p in paths:
        ix = scan_tar(p)
        from .sources import Reader
        r = Reader([p])
        caps = []
        for mem in ix.members:
            n += 1
            n_img += any(e in mem for e in IMAGE_EXTS)
            if "txt" in mem:
                n_txt += 1
                off, sz = mem["txt"]
                caps.append(decode_text(r.read(0, off, sz)))
        r.close()
        if caps:
            lengths += [len(e.ids) for e in tok._tok.encode_batch(caps, add_special_tokens=False)]
        per_shard[p] = len(ix.keys)
    L = np.asarray(lengths) if lengths else np.zeros(1)
    return {"shards": len(paths), "samples": n, "images": n_img, "captions": n_txt,
            "samples_per_shard": per_shard,
            "caption_tokens": {"min": int(L.min()), "mean": float(L.mean()), "p50": float(np.percentile(L, 50)),
                               "p90": float(np.percentile(L, 90)), "p99": float(np.percentile(L, 99)),
                               "max": int(L.max()), "text_length": text_length,
                               "truncated_fraction": float((L > text_length).mean()) if lengths else 0.0,
                               "histogram": {f"{lo}-{lo + 7}": int(((L >= lo) & (L < lo + 8)).sum())
                                             for lo in range(0, int(L.max()) + 1, 8)} if lengths else {}}}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m3ae_engine.data.shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="shards from a folder of images with captions")
    w.add_argument("src")
    w.add_argument("out")
    w.add_argument("--captions", help="CSV (path,caption) or JSONL; default: sidecar IMAGE.txt files")
    w.add_argument("--samples-per-shard", type=int, default=10000)
    w.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded non-JPEG images")
    i = sub.add_parser("index", help="DALI index files")
    i.add_argument("shards", nargs="+")
    v = sub.add_parser("validate", help="decode every image, report bad samples")
    v.add_argument("shards", nargs="+")
    v.add_argument("--fix", metavar="OUT", help="write cleaned shards here")
    v.add_argument("--image-only", action="store_true", help="image-only shards: captions not required")
    s = sub.add_parser("stats", help="counts and caption lengths")
    s.add_argument("shards", nargs="+")
    s.add_argument("--text-length", type=int, default=64)
    s.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "write":
            shards, counts = write_shards(args.src, args.out, args.captions, args.samples_per_shard, args.quality)
            print(f"wrote {len(shards)} shard(s) to {args.out}: {counts}")
            return 0
        if args.cmd == "index":
            for idx in index_shards(expand_sources(args.shards)):
                print(idx)
            return 0
        if args.cmd == "validate":
            return _cmd_validate(args)
        st = shard_stats(expand_sources(args.shards), args.text_length)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            ct = st["caption_tokens"]
            print(f"{st['shards']} shard(s), {st['samples']} samples, {st['images']} images, "
                  f"{st['captions']} captions")
            print(f"caption tokens: min {ct['min']} mean {ct['mean']:.1f} p50 {ct['p50']:.0f} p90 {ct['p90']:.0f} "
                  f"p99 {ct['p99']:.0f} max {ct['max']}; over text_length {ct['text_length']}: "
                  f"{ct['truncated_fraction']:.1%}")
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
