"""WebDataset shards: source patterns, tar indexing (DALI's wds2idx format), random-access reads.

A shard is a tar as img2dataset writes it: consecutive members `KEY.jpg`, `KEY.txt` [, `KEY.json`]
sharing the key (everything before the first dot of the file name). Sources are a list of paths,
globs (`data/*.tar`) or brace patterns (`data/{00000..00099}.tar`, `data/{a,b}.tar`), or a mix.

Every error about a file names the file: a missing or unreadable shard, a pattern that matches
nothing, a truncated tar, a stale or malformed index. Members whose names are absolute or climb out
with `..` (a tar made to escape a folder when extracted) are skipped and counted, never read.
A brace pattern may name at most MAX_BRACE_EXPANSION paths.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"  # DALI tools/wds2idx.py


class DataError(ValueError):
    """Bad input data: the message names the file (and the sample key when there is one)."""


# ---------------------------------------------------------------------------------------------- patterns
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALT = re.compile(r"\{([^{}]*,[^{}]*)\}")
MAX_BRACE_EXPANSION = 1_000_000  # far more shards than any dataset has; a typo like {0..999999999} is not


def brace_count(pattern: str) -> int:
    """How many paths `pattern` expands to, without expanding it."""
    n = 1
    for m in _RANGE.finditer(pattern):
        n *= max(0, int(m.group(2)) - int(m.group(1)) + 1)
    for m in _ALT.finditer(pattern):
        n *= len(m.group(1).split(","))
    return n


def expand_braces(pattern: str) -> List[str]:
    """`a/{000..002}.tar` -> [a/000.tar, a/001.tar, a/002.tar] (zero padding kept); `{x,y}` alternatives.
    DataError for a pattern naming more than MAX_BRACE_EXPANSION paths."""
    n = brace_count(pattern)
    if n > MAX_BRACE_EXPANSION:
        raise DataError(f"source pattern {pattern!r} expands to {n:,} paths (over the limit of "
                        f"{MAX_BRACE_EXPANSION:,}): check the brace range")
    return _expand_braces(pattern)


def _expand_braces(pattern: str) -> List[str]:
    mr, ma = _RANGE.search(pattern), _ALT.search(pattern)
    if mr and (ma is None or mr.start() <= ma.start()):  # leftmost brace first
        lo, hi = mr.group(1), mr.group(2)
        if int(hi) < int(lo):
            raise DataError(f"empty brace range {mr.group(0)} in source pattern {pattern!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out = []
        for i in range(int(lo), int(hi) + 1):
            out += _expand_braces(pattern[:mr.start()] + str(i).zfill(width) + pattern[mr.end():])
        return out
    if ma:
        out = []
        for alt in ma.group(1).split(","):
            out += _expand_braces(pattern[:ma.start()] + alt + pattern[ma.end():])
        return out
    return [pattern]


def split_sources(spec: str) -> List[str]:
    """'a/{000..009}.tar::b/*.tar,c.tar' -> its patterns: split at '::' and at commas outside braces
    (a brace alternative like '{a,b}' stays one pattern)."""
    return [p.strip() for p in re.split(r"::|,(?![^{}]*\})", spec) if p.strip()]


def expand_sources(sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                   what: str = "shard") -> List[str]:
    """Paths from a list / glob / brace pattern; every path exists and is readable, else DataError."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise DataError(f"no {what} sources given (empty list)")
    paths: List[str] = []
    for src in sources:
        src = os.fspath(src)
        for pat in expand_braces(src):
            if any(c in pat for c in "*?["):
                hits = sorted(glob.glob(pat))
                if not hits:
                    raise DataError(f"{what} pattern {pat!r} matches no file")
                paths += hits
            else:
                paths.append(pat)
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"{what} file not found: {p}")
        if os.path.isdir(p):
            raise DataError(f"{what} path is a directory, not a file: {p}")
        if not os.access(p, os.R_OK):
            raise DataError(f"{what} file is not readable (permissions): {p}")
    return paths


def split_name(name: str) -> Tuple[str, str]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), as DALI and WebDataset split member names."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def unsafe_member_name(name: str) -> bool:
    """An absolute member name or one with a `..` component: a tar crafted to write outside a folder."""
    return (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in re.split(r"[/\\]", name))


def index_path_for(tar_path: str) -> str:
    return os.path.splitext(tar_path)[0] + ".idx"


def decode_text(data: bytes) -> str:
    """A caption member's text: UTF-8 (undecodable bytes replaced, never fatal), stripped."""
    return data.decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------------------------------------- index
@dataclass
class ShardIndex:
    """Samples of one tar: key and {ext: (offset of the data, size)} per sample, in tar order."""
    path: str
    keys: List[str]
    members: List[Dict[str, Tuple[int, int]]]
    unsafe: List[str] = field(default_factory=list)  # member names skipped (unsafe_member_name)

    def __len__(self):
        return len(self.keys)


def scan_tar(path: str) -> ShardIndex:
    """Read the tar headers (not the data) and group members into samples; DataError naming the file
    for a missing, unreadable, non-tar or truncated file."""
    try:
        size = os.path.getsize(path)
        tf = tarfile.open(path, "r:")
    except FileNotFoundError:
        raise DataError(f"shard not found: {path}") from None
    except PermissionError:
        raise DataError(f"shard not readable (permissions): {path}") from None
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"not a readable tar file: {path} ({e})") from None
    keys: List[str] = []
    members: List[Dict[str, Tuple[int, int]]] = []
    unsafe: List[str] = []
    try:
        with tf:
            for m in tf:
                if not m.isreg():
                    continue
                if unsafe_member_name(m.name):
                    unsafe.append(m.name)
                    continue
                if m.offset_data + m.size > size:
                    raise DataError(f"truncated tar: {path}: member {m.name} needs bytes up to "
                                    f"{m.offset_data + m.size} but the file has {size}")
                key, ext = split_name(m.name)
                if not key or key.endswith("/") or os.path.basename(key) == "":
                    continue
                if keys and keys[-1] == key:
                    members[-1][ext] = (m.offset_data, m.size)
                else:
                    keys.append(key)
                    members.append({ext: (m.offset_data, m.size)})
    except tarfile.TarError as e:
        raise DataError(f"truncated or corrupt tar: {path} ({e})") from None
    return ShardIndex(path, keys, members, unsafe)


def write_index(index: ShardIndex, idx_path: str) -> None:
    """DALI wds2idx v1.2: `v1.2 N`, then one line per sample: `ext offset size name` per member."""
    if not index.keys:
        raise DataError(f"empty shard (no samples), cannot index: {index.path}")
    lines = [f"{INDEX_VERSION} {len(index.keys)}"]
    for key, mem in zip(index.keys, index.members):
        parts = []
        for ext, (off, sz) in mem.items():
            parts.append(f"{ext} {off} {sz} {key}.{ext}")
        lines.append(" ".join(parts))
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, idx_path)


def read_index(idx_path: str, tar_path: Optional[str] = None) -> ShardIndex:
    """Parse a wds2idx file (v1.2; v1.1 lines without names also accepted); checks it against the tar size."""
    try:
        with open(idx_path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read index file {idx_path}: {e}") from None
    if not lines:
        raise DataError(f"empty index file: {idx_path}")
    head = lines[0].split()
    if len(head) != 2 or not head[0].startswith("v1."):
        raise DataError(f"index file {idx_path}: first line must be 'v1.2 <count>', got {lines[0]!r}")
    n = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != n:
        raise DataError(f"index file {idx_path}: header says {n} samples but has {len(body)} lines")
    tsize = os.path.getsize(tar_path) if tar_path else None
    keys, members, unsafe = [], [], []
    for ln_no, ln in enumerate(body, 2):
        tok = ln.split()
        step = 4 if head[0] == "v1.2" else 3
        if len(tok) % step:
            raise DataError(f"index file {idx_path} line {ln_no}: malformed {ln!r}")
        mem = {}
        key = None
        for i in range(0, len(tok), step):
            ext, off, sz = tok[i], int(tok[i + 1]), int(tok[i + 2])
            if step == 4:
                if unsafe_member_name(tok[i + 3]):
                    unsafe.append(tok[i + 3])
                    continue
                key = split_name(tok[i + 3])[0]
            if tsize is not None and off + sz > tsize:
                raise DataError(f"index file {idx_path} does not match {tar_path} (stale index or truncated "
                                f"tar: member at {off}+{sz} beyond the file's {tsize} bytes); rebuild it with "
                                f"`python -m m3ae_engine.data.shards index`")
            mem[ext] = (off, sz)
        if not mem:  # every member of the line was unsafe
            continue
        keys.append(key if key is not None else f"{os.path.basename(tar_path or idx_path)}#{ln_no - 2}")
        members.append(mem)
    return ShardIndex(tar_path or idx_path, keys, members, unsafe)


def index_is_current(idx_path: str, tar_path: str) -> bool:
    """An index file that exists and is not older than its tar (a rewritten shard invalidates it)."""
    return os.path.exists(idx_path) and os.path.getmtime(idx_path) >= os.path.getmtime(tar_path)


def load_index(tar_path: str, use_idx: bool = True) -> ShardIndex:
    """The shard's index from its `.idx` file when present and not older than the tar, else a header scan."""
    if not os.path.exists(tar_path):
        raise DataError(f"shard not found: {tar_path}")
    idx = index_path_for(tar_path)
    if use_idx and index_is_current(idx, tar_path):
        return read_index(idx, tar_path)
    return scan_tar(tar_path)


# ---------------------------------------------------------------------------------------------- sample table
@dataclass
class SampleTable:
    """All samples of a shard set in flat arrays (compact for millions of samples).

    For each sample: shard number, image member (offset, size, ext) and text member (offset, size),
    -1 where absent. `skipped` counts samples dropped for a missing required member.
    """
    paths: List[str]
    shard: np.ndarray
    image: np.ndarray      # [N, 2] int64 offset, size (-1 = none)
    image_ext: List[str]
    text: np.ndarray       # [N, 2] int64
    keys: np.ndarray       # object array of str
    skipped: Dict[str, int] = field(default_factory=dict)

    def __len__(self):
        return len(self.shard)

    def key(self, i: int) -> str:
        return f"{self.paths[self.shard[i]]}:{self.keys[i]}"


def build_table(paths: Sequence[str], need_image: bool = True, need_text: bool = True,
                use_idx: bool = True, indices: Optional[Sequence["ShardIndex"]] = None) -> SampleTable:
    """`indices`: the shards' indexes when the caller already read or scanned them (not read again)."""
    shard, img, imgext, txt, keys = [], [], [], [], []
    skipped = {"missing_image": 0, "missing_text": 0, "unsafe_name": 0}
    for si, p in enumerate(paths):
        ix = indices[si] if indices is not None else load_index(p, use_idx)
        if ix.unsafe:
            skipped["unsafe_name"] += len(ix.unsafe)
            warnings.warn(f"{p}: skipped {len(ix.unsafe)} member(s) with an absolute or '..' name, e.g. "
                          f"{ix.unsafe[0]!r} (clean with `python -m m3ae_engine.data.shards validate --fix`)",
                          RuntimeWarning, stacklevel=2)
        for key, mem in zip(ix.keys, ix.members):
            ie = next((e for e in IMAGE_EXTS if e in mem), None)
            te = "txt" if "txt" in mem else None
            if need_image and ie is None:
                skipped["missing_image"] += 1
                continue
            if need_text and te is None:
                skipped["missing_text"] += 1
                continue
            shard.append(si)
            img.append(mem[ie] if ie else (-1, -1))
            imgext.append(ie or "")
            txt.append(mem[te] if te else (-1, -1))
            keys.append(key)
    if not shard:
        raise DataError(f"no usable samples in {len(paths)} shard(s) {list(paths)[:3]}"
                        f"{'...' if len(paths) > 3 else ''} (need image={need_image}, text={need_text}; "
                        f"skipped {skipped})")
    return SampleTable(list(paths), np.asarray(shard, np.int32), np.asarray(img, np.int64).reshape(-1, 2),
                       imgext, np.asarray(txt, np.int64).reshape(-1, 2), np.asarray(keys, dtype=object), skipped)


class Reader:
    """Random-access member reads with one open descriptor per shard (per process; re-opened after fork)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._fds: Dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        path = self.paths[shard]
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"cannot open shard {path}: {e}") from None
            self._fds[shard] = fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DataError(f"truncated tar: {path}: wanted {size} bytes at {offset}, got {len(data)}")
        return data

    def close(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, st):
        self.__init__(st["paths"])

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


def iter_tar_samples(path: str, unsafe: Optional[List[str]] = None) -> Iterable[Tuple[str, Dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) from a tar in order (for the shard tools); DataError on truncation.
    Members with unsafe names are not read; their names go to `unsafe` when given."""
    try:
        tf = tarfile.open(path, "r:")
    except FileNotFoundError:
        raise DataError(f"shard not found: {path}") from None
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"not a readable tar file: {path} ({e})") from None
    cur_key, cur = None, {}
    try:
        with tf:
            for m in tf:
                if not m.isreg():
                    continue
                if unsafe_member_name(m.name):
                    if unsafe is not None:
                        unsafe.append(m.name)
                    continue
                key, ext = split_name(m.name)
                if not key or key.endswith("/"):
                    continue
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise DataError(f"truncated tar: {path}: member {m.name} has {len(data)} of {m.size} bytes")
                if key != cur_key and cur_key is not None:
                    yield cur_key, cur
                    cur = {}
                cur_key = key
                cur[ext] = data
    except tarfile.TarError as e:
        raise DataError(f"truncated or corrupt tar: {path} ({e})") from None
    if cur_key is not None:
        yield cur_key, cur


def read_text_lines(paths: Sequence[str]) -> List[str]:
    """Captions from text files, one per non-empty line."""
    out: List[str] = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                out += [ln.strip() for ln in f if ln.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"text file {p} is not UTF-8: {e}") from None
        except OSError as e:
            raise DataError(f"cannot read text file {p}: {e}") from None
    if not out:
        raise DataError(f"no captions in text file(s) {list(paths)[:3]}")
    return out
