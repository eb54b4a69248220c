"""Shard tools: write (sidecar / CSV / JSONL), index (DALI wds2idx), validate (+ --fix), stats."""
import io
import json
import os
import subprocess
import sys

from m3ae_engine.data import dali_available
from m3ae_engine.data.shards import main
from m3ae_engine.data.sources import read_index, scan_tar
from m3ae_engine.data.testdata import jpeg_bytes, write_test_shards
from shard_helpers import members, plant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_folder(d, n=5):
    os.makedirs(d, exist_ok=True)
    caps = {}
    for i in range(n):
        data, cap = jpeg_bytes(i, size=(64 + 8 * i, 48))
        name = f"img{i}.jpg"
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        caps[name] = cap
    return caps


def test_write_sidecar_csv_jsonl(tmp_path, capsys):
    src = tmp_path / "imgs"
    caps = _image_folder(str(src))
    # a PNG gets re-encoded to JPEG; an image without a caption is skipped
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "red.png")
    (src / "red.txt").write_text("a red rectangle")
    for name, cap in caps.items():
        (src / name.replace(".jpg", ".txt")).write_text(cap)
    os.remove(src / "img4.txt")
    assert main(["write", str(src), str(tmp_path / "out"), "--samples-per-shard", "2"]) == 0
    shards = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    assert [os.path.basename(p) for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    got = {}
    for s in shards:
        assert os.path.exists(s[:-4] + ".idx")
        mem = members(s)
        for name, data in mem.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                got[meta["path"]] = mem[meta["key"] + ".txt"].decode()
                assert mem[meta["key"] + ".jpg"][:3] == b"\xff\xd8\xff"
    want = {k: v for k, v in caps.items() if k != "img4.jpg"}
    want["red.png"] = "a red rectangle"
    assert got == want
    assert "no caption" in capsys.readouterr().err

    csvf = tmp_path / "caps.csv"
    csvf.write_text("path,caption\n" + "".join(f'{k},"{v}, indeed"\n' for k, v in caps.items()))
    assert main(["write", str(src), str(tmp_path / "csv"), "--captions", str(csvf)]) == 0
    mem = members(str(tmp_path / "csv" / "00000.tar"))
    assert sorted(v.decode() for k, v in mem.items() if k.endswith(".txt")) == sorted(f"{v}, indeed" for v in caps.values())

    jl = tmp_path / "caps.jsonl"
    jl.write_text("".join(json.dumps({"path": k, "caption": v.upper()}) + "\n" for k, v in caps.items()))
    assert main(["write", str(src), str(tmp_path / "jl"), "--captions", str(jl)]) == 0
    mem = members(str(tmp_path / "jl" / "00000.tar"))
    assert sorted(v.decode() for k, v in mem.items() if k.endswith(".txt")) == sorted(v.upper() for v in caps.values())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "img0.jpg"}\n')
    assert main(["write", str(src), str(tmp_path / "x"), "--captions", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err


def test_index_is_dali_wds2idx(tmp_path):
    paths, caps = write_test_shards(str(tmp_path), num_shards=1, per_shard=5, index=False, grey=(), cmyk=())
    assert main(["index", paths[0]]) == 0
    lines = open(paths[0][:-4] + ".idx").read().splitlines()
    assert lines[0] == "v1.2 5" and len(lines) == 6
    raw = open(paths[0], "rb").read()
    for line, key in zip(lines[1:], sorted(caps)):
        tok = line.split()
        assert tok[0::4] == ["jpg", "txt"] and tok[3::4] == [f"{key}.jpg", f"{key}.txt"]
        off, size = int(tok[5]), int(tok[6])
        assert raw[off:off + size].decode() == caps[key]
        assert off % 512 == 0
    assert read_index(paths[0][:-4] + ".idx", paths[0]).members == scan_tar(paths[0]).members
    if dali_available():  # DALI itself reads our index
        import numpy as np
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=5, num_threads=1, device_id=None)
        def p():
            return fn.readers.webdataset(paths=paths, index_paths=[paths[0][:-4] + ".idx"], ext=["txt"])
        pipe = p()
        pipe.build()
        (out,) = pipe.run()
        assert sorted(bytes(np.array(out[i])).decode() for i in range(5)) == sorted(caps.values())


def test_validate_names_exactly_the_planted_samples(tmp_path, capsys):
    paths, caps = write_test_shards(str(tmp_path / "src"), num_shards=2, per_shard=8, index=False)
    good = members(paths[0])
    from PIL import Image
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(png, "PNG")
    jpg1 = good["000000001.jpg"]
    planted = {
        "000000001.jpg": jpg1[: len(jpg1) // 2],             # truncated JPEG
        "000000004.jpg": b"this is not an image " * 20,    # corrupt image data
        "000000006.jpg": png.getvalue(),                       # PNG data in a .jpg member
        "000000007.txt": None,                                 # caption missing
    }
    os.makedirs(tmp_path / "dirty")
    dirty = str(tmp_path / "dirty" / "00000.tar")
    plant(paths[0], dirty, planted)
    clean_other = str(tmp_path / "dirty" / "00001.tar")
    plant(paths[1], clean_other, {})
    rc = main(["validate", str(tmp_path / "dirty" / "{00000..00001}.tar")])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    rows = {(r.split("\t")[0], r.split("\t")[1], r.split("\t")[2]) for r in out}
    assert rows == {(dirty, "000000001", "truncated"), (dirty, "000000004", "corrupt"),
                    (dirty, "000000006", "non-jpeg"), (dirty, "000000007", "missing-caption")}
    # --fix: bad samples dropped, the PNG re-encoded; the cleaned shards validate
    assert main(["validate", dirty, clean_other, "--fix", str(tmp_path / "fixed")]) == 1
    capsys.readouterr()
    fixed = str(tmp_path / "fixed" / "00000.tar")
    keys = scan_tar(fixed).keys
    assert keys == ["000000000", "000000002", "000000003", "000000005", "000000006"]
    assert main(["validate", str(tmp_path / "fixed" / "*.tar")]) == 0
    assert os.path.exists(fixed[:-4] + ".idx")
    assert len(scan_tar(str(tmp_path / "fixed" / "00001.tar")).keys) == 8
    # a truncated tar is reported by name too
    raw = open(paths[1], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2 + 100])
    assert main(["validate", str(cut)]) == 1
    assert "truncated-tar" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "nothing-*.tar")]) == 2
    assert "nothing-*.tar" in capsys.readouterr().err


def test_stats(tmp_path, capsys):
    paths, caps = write_test_shards(str(tmp_path), num_shards=2, per_shard=5, grey=(), cmyk=())
    assert main(["stats", str(tmp_path / "*.tar"), "--json", "--text-length", "12"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["shards"] == 2 and st["samples"] == st["images"] == st["captions"] == 10
    from m3ae_engine.model.tokenizer import default_tokenizer
    tok = default_tokenizer(64)
    lens = [int((1 - tok.encode_batch([c])[1]).sum()) for c in caps.values()]
    assert st["caption_tokens"]["max"] == max(lens) and st["caption_tokens"]["min"] == min(lens)
    assert st["caption_tokens"]["truncated_fraction"] == sum(n > 12 for n in lens) / 10
    assert sum(st["caption_tokens"]["histogram"].values()) == 10


def test_cli_entry_point(tmp_path):
    paths, _ = write_test_shards(str(tmp_path), num_shards=1, per_shard=3, grey=(), cmyk=())
    r = subprocess.run([sys.executable, "-m", "m3ae_engine.data.shards", "stats", paths[0]], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert "1 shard(s), 3 samples" in r.stdout


def test_write_matches_caption_keys_by_name_or_stem_and_fails_when_nothing_is_written(tmp_path, capsys):
    src = tmp_path / "photos"
    caps = _image_folder(str(src), n=3)
    os.makedirs(src / "sub")
    os.replace(src / "img2.jpg", src / "sub" / "img2.jpg")
    rows = [("img0", caps["img0.jpg"]), ("img1.jpg", caps["img1.jpg"]), ("sub/img2", caps["img2.jpg"])]
    (tmp_path / "stems.csv").write_text("path,caption\n" + "".join(f"{k},{c}\n" for k, c in rows))
    assert main(["write", str(src), str(tmp_path / "out"), "--captions", str(tmp_path / "stems.csv")]) == 0
    (shard,) = (tmp_path / "out").glob("*.tar")
    assert sorted(v.decode() for k, v in members(shard).items() if k.endswith(".txt")) == sorted(caps.values())
    # nothing matches: exit 2 with one line saying why, not "wrote 0 shards" and exit 0
    (tmp_path / "wrong.csv").write_text("photo_a.jpg,a caption\nphoto_b.jpg,another\n")
    capsys.readouterr()
    assert main(["write", str(src), str(tmp_path / "out2"), "--captions", str(tmp_path / "wrong.csv")]) == 2
    err = capsys.readouterr().err
    assert "2 caption key(s) match no image" in err and "error: no sample written" in err
    assert not list((tmp_path / "out2").glob("*.tar"))
    # a stem two images share is refused rather than guessed
    from PIL import Image
    Image.new("RGB", (20, 20)).save(src / "img0.png")
    (tmp_path / "ambiguous.csv").write_text("img0,a caption\n")
    assert main(["write", str(src), str(tmp_path / "out3"), "--captions", str(tmp_path / "ambiguous.csv")]) == 2
    assert "caption key 'img0' matches 2 images" in capsys.readouterr().err
