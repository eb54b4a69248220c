"""Tar-shard helpers shared by the data tests (no triton import: usable by every test module)."""
import io
import tarfile


def members(tar) -> dict:
    """{member name: bytes} of a tar (contents only: header fields such as mtime are not compared)."""
    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def plant(src_tar, dst_tar, edits: dict) -> None:
    """Copy a shard, replacing members: edits {member name: bytes or None (drop)}."""
    with tarfile.open(src_tar) as src, tarfile.open(dst_tar, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name in edits:
                data = edits[m.name]
                if data is None:
                    continue
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
