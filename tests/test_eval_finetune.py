"""Fine-tuning (m3ae_engine.eval.finetune) of a tiny checkpoint on crops of real photos.

The data: four scikit-image sample photos (cat, coffee, rocket, astronaut), each a class; train and val
are disjoint sets of random square crops of it. Tests marked `timm` need timm + torchvision (the second
CI stage, `.venv-timm`); the bad-input tests fail before timm is imported and run everywhere.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.interop.exported import save_checkpoint
from m3ae_engine.eval import finetune
from m3ae_engine.train.optim import warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("astronaut", "cat", "coffee", "rocket")
# a short run of the m3ae recipe: every augmentation on, few epochs, a larger base lr
FAST = ["--device", "cpu", "--num-workers", "0", "--batch-size", "16", "--blr", "0.05", "--warmup-epochs", "1"]


def _photos():
    skdata = pytest.importorskip("skimage.data")
    return {"astronaut": skdata.astronaut(), "cat": skdata.chelsea(), "coffee": skdata.coffee(),
            "rocket": skdata.rocket()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    for name, img in _photos().items():
        h, w = img.shape[:2]
        for split, n in (("train", 12), ("val", 10)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                s = int(rng.integers(min(h, w) // 3, min(h, w) // 1.5))
                y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
                crop = Image.fromarray(img[y:y + s, x:x + s]).resize((48, 48), Image.BICUBIC)
                crop.save(root / split / name / f"{i}.{'jpg' if i % 2 else 'png'}")  # both formats
    torch.manual_seed(0)
    cfg = M3AEConfig.from_preset("tiny")
    save_checkpoint(M3AE(cfg).state_dict(), cfg, root / "ckpt")  # how train.py / convert save a model
    return root


def _argv(data, out, *extra):
    return ["--checkpoint", str(data / "ckpt"), "--train", str(data / "train"), "--val", str(data / "val"),
            "--output-dir", str(out), *FAST, *extra]


# ------------------------------------------------------------------------------- without timm
def test_lr_schedule_is_mae_lr_sched():
    cfg = dict(epochs=10, warmup_epochs=2, min_lr=1e-6)
    for e in (0.0, 0.5, 1.999, 2.0, 5.3, 9.99):
        want = 1e-3 * e / 2 if e < 2 else 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (e - 2) / 8))
        assert finetune.lr_at(e, cfg, 1e-3) == pytest.approx(want, rel=1e-12)
    assert finetune.lr_at(3.0, cfg, 1e-3) == warmup_cosine(3.0, 10, 2, 1e-3, end_lr=1e-6)


def test_recipes_follow_the_references():
    m3ae, mae = finetune.RECIPES["m3ae"], finetune.RECIPES["mae"]
    # m3ae_public finetune_main.py FLAGS_DEF / data.py "finetune" transform
    assert (m3ae["epochs"], m3ae["blr"], m3ae["warmup_epochs"], m3ae["weight_decay"], m3ae["layer_decay"],
            m3ae["mixup"], m3ae["cutmix"], m3ae["switch_prob"], m3ae["smoothing"], m3ae["pool"],
            m3ae["reprob"], m3ae["aa"]) == (90, 1.5e-4, 5, 0.0, 0.75, 0.8, 1.0, 0.5, 0.1, "cls", 0.0,
                                            "rand-m9-mstd0.5-inc1")
    # mae main_finetune.py defaults + its fine-tuning recipe (mixup 0.8, cutmix 1.0, reprob 0.25, ...)
    assert (mae["blr"], mae["min_lr"], mae["weight_decay"], mae["drop_path"], mae["reprob"], mae["pool"],
            mae["head"], mae["crop_pct"]) == (1e-3, 1e-6, 0.05, 0.1, 0.25, "avg", "mae", 0.875)


def test_bad_input_is_one_line_error(data, tmp_path, capsys):
    def err(argv):
        assert finetune.main(argv) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
        return msg

    base = dict(checkpoint=str(data / "ckpt"), train=str(data / "train"), val=str(data / "val"))

    def argv(**kw):
        a = {**base, **kw}
        return ["--checkpoint", a["checkpoint"], "--train", a["train"], "--val", a["val"],
                "--output-dir", str(tmp_path / "o"), "--device", "cpu"] + kw.get("extra", [])

    assert "not found" in err(argv(train=str(tmp_path / "missing")))
    assert "not found" in err(argv(val=str(tmp_path / "missing_val")))
    assert "not found" in err(argv(checkpoint=str(tmp_path / "no_ckpt")))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no image here")
    assert "holds no images" in err(argv(train=str(tmp_path / "empty")))
    odd = tmp_path / "odd_val"
    (odd / "dog").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(odd / "dog" / "x.png")
    assert "not among the training classes" in err(argv(val=str(odd)))
    assert "must be even" in err(argv(extra=["--batch-size", "15"]))
    assert "fewer than one global batch" in err(argv(extra=["--batch-size", "64"]))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "checkpoint.pt").write_bytes(b"earlier run")
    assert "pass --resume" in err(argv(extra=["--batch-size", "16"]))
    assert "not a readable fine-tuning checkpoint" in err(argv(extra=["--batch-size", "16", "--resume"]))
    (tmp_path / "o" / "checkpoint.pt").unlink()
    # nothing of a user's mistake needs timm; without it (the main test env) the error says what to install
    rc = finetune.main(argv(extra=["--batch-size", "16", "--epochs", "1"]))
    assert rc == 0 or (rc == 2 and "needs timm" in capsys.readouterr().err)


# ---------------------------------------------------------------------------------- with timm
def _official_m3ae_layer_id(official_name, num_layer):
    """finetune_main.py name_to_layer_id on a flattened flax key ('params', 'base_model', ...)."""
    name = official_name
    if len(name) > 3 and name[3].startswith("Block"):
        return int(name[3].split("_")[1]) + 1
    if len(name) > 3 and name[1] == "base_model" and name[3] in ["LayerNorm_0", "patch_emb"]:
        return 0
    if len(name) <= 3 and name[1] == "base_model" and name[2] in ["cls_token", "patch_mask_emb"]:
        return 0
    return num_layer


# our timm name -> the official flax key of the parameter it comes from (pos_embed: the type embedding)
_OFFICIAL_KEY = {"cls_token": ("params", "base_model", "cls_token"),
                 "pos_embed": ("params", "base_model", "encoder_image_type_embedding"),
                 "patch_embed": ("params", "base_model", "image_embedding", "kernel"),
                 "norm": ("params", "base_model", "encoder", "LayerNorm_0", "scale"),
                 "fc_norm": ("params", "LayerNorm_0", "scale"), "head": ("params", "Dense_0", "kernel")}


@pytest.mark.timm
@pytest.mark.parametrize("rule", ["m3ae", "mae"])
def test_layer_decay_groups_match_the_reference_formulas(rule):
    from m3ae_engine.eval.vit_classifier import build_classifier, layer_decay_groups
    cfg = M3AEConfig.from_preset("tiny", depth=3)
    vit, _ = build_classifier(M3AE(cfg).state_dict(), cfg, 5, "cls", "m3ae", 0.1)
    groups = layer_decay_groups(vit, 0.05, 0.75, rule)
    names = {id(p): n for n, p in vit.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            top = n.split(".")[0]
            if rule == "mae":  # main_finetune util/lr_decay.get_layer_id_for_vit, num_layers = depth + 1
                layer = (0 if top in ("cls_token", "pos_embed", "patch_embed")
                         else int(n.split(".")[1]) + 1 if top == "blocks" else cfg.depth + 1)
            else:
                key = (("params", "base_model", "encoder", f"Block_{n.split('.')[1]}", "x") if top == "blocks"
                       else _OFFICIAL_KEY[top])
                layer = _official_m3ae_layer_id(key, cfg.depth + 1)
            assert g["lr_scale"] == pytest.approx(0.75 ** (cfg.depth + 1 - layer)), n
            no_decay = p.ndim == 1 or n in ("pos_embed", "cls_token")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    assert seen == set(names.values())


@pytest.mark.timm
@pytest.mark.parametrize("pool,head", [("cls", "m3ae"), ("avg", "m3ae"), ("cls", "mae"), ("avg", "mae")])
def test_classifier_forward_matches_the_reference_heads(pool, head):
    """Logits = head(LN?(pool(encoder))) computed from M3AE.forward_representation, drop path off."""
    from m3ae_engine.eval.vit_classifier import build_classifier
    from m3ae_engine.ops.reference import normalize_image
    torch.manual_seed(0)
    cfg = M3AEConfig.from_preset("tiny")
    model = M3AE(cfg).eval()
    vit, _ = build_classifier(model.state_dict(), cfg, 3, pool, head, 0.0)
    vit.eval()
    img = torch.randint(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    x = normalize_image(img, cfg.image_mean, cfg.image_std)
    with torch.no_grad():
        if head == "mae" and pool == "avg":  # models_vit global_pool: blocks -> mean -> fc_norm (no final norm)
            vit_feats = vit.forward_features(x)[:, 1:].mean(1)
            blocks_only = _blocks_output(model, img)[:, 1:].mean(1)
            torch.testing.assert_close(vit_feats, blocks_only, rtol=1e-4, atol=1e-4)
            feats = torch.nn.functional.layer_norm(blocks_only, (cfg.emb_dim,), vit.fc_norm.weight, vit.fc_norm.bias, 1e-6)
        else:
            h = model.forward_representation(img)
            feats = h[:, 0] if pool == "cls" else h[:, 1:].mean(1)
            if head == "m3ae":  # official ViTClassifier: a LayerNorm after the pool
                feats = torch.nn.functional.layer_norm(feats, (cfg.emb_dim,), eps=1e-6)
        torch.testing.assert_close(vit(x), vit.head(feats), rtol=1e-4, atol=1e-4)
    std = vit.head.weight.std().item()
    assert (std < 1e-4) if head == "mae" else (0.5 / math.sqrt(cfg.emb_dim) < std < 2 / math.sqrt(cfg.emb_dim))


def _blocks_output(model, img):
    """The encoder blocks' output before encoder_norm, via a hook on the norm's input."""
    grabbed = {}
    hook = model.encoder_norm.register_forward_pre_hook(lambda m, a: grabbed.setdefault("x", a[0]))
    try:
        model.forward_representation(img)
    finally:
        hook.remove()
    return grabbed["x"].reshape(img.shape[0], -1, model.config.emb_dim)  # packed [B * (1 + L), D] on this path


@pytest.mark.timm
def test_posterize_zero_bits_gives_black_image():
    from timm.data import auto_augment
    finetune.patch_timm_posterize()
    img = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    assert np.asarray(auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 0)).max() == 0
    assert np.asarray(auto_augment.NAME_TO_OP["Posterize"](img, 1)).max() == 128


@pytest.mark.timm
def test_finetune_learns_real_photos(data, tmp_path, capsys):
    """The m3ae recipe (RandAugment, mixup/cutmix, label smoothing, layer decay) on a random tiny encoder:
    val top-1 ends well above chance (25%) and the val loss below ln(4)."""
    out = tmp_path / "run"
    assert finetune.main(_argv(data, out, "--epochs", "8")) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["epochs_done"] == 8 and res["num_train"] == 48 and res["num_val"] == 40
    assert res["classes"] == list(CLASSES)
    assert all(h["top5"] == 100.0 for h in res["history"])  # 4 classes: top-5 covers all
    assert res["top1"] >= 50.0, res["history"]
    assert res["history"][-1]["val_loss"] < min(math.log(4), res["history"][0]["val_loss"]), res["history"]
    assert "top-1" in capsys.readouterr().out
    # the saved classifier rebuilds from its metadata and gives the reported accuracy
    again = _evaluate_saved(out, data, res)
    assert again["top1"] == pytest.approx(res["top1"])


def _evaluate_saved(out, data, res):
    """Single-process val metrics of OUT/classifier.safetensors, rebuilt from its metadata alone."""
    from safetensors import safe_open
    from m3ae_engine.eval.features import ImageFolder
    from m3ae_engine.eval.vit_classifier import create_vit
    with safe_open(str(out / "classifier.safetensors"), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    vit = create_vit(json.loads(meta["timm_kwargs"]), len(json.loads(meta["classes"])), meta["head"])
    vit.load_state_dict(sd)
    _, val_tf = finetune.build_transforms(res["settings"], 32, json.loads(meta["mean"]), json.loads(meta["std"]))
    val = finetune.TransformedFolder(ImageFolder(data / "val", 32), val_tf)
    return finetune.evaluate(vit, val, 7, torch.device("cpu"), torch.autocast("cpu", enabled=False))


@pytest.mark.timm
def test_resume_is_exact(data, tmp_path):
    """mae recipe (global pool, random erasing, weight decay, drop path): 3 epochs in one go equal
    1 epoch, a stop, then --resume for the rest; a resume with other settings is refused."""
    args = ["--recipe", "mae", "--epochs", "3"]
    assert finetune.main(_argv(data, tmp_path / "a", *args)) == 0
    assert finetune.main(_argv(data, tmp_path / "b", *args, "--stop-after", "1")) == 0
    assert not (tmp_path / "b" / "classifier.safetensors").exists()  # not final yet
    assert json.loads((tmp_path / "b" / "finetune.json").read_text())["epochs_done"] == 1
    assert finetune.main(_argv(data, tmp_path / "b", *args, "--resume")) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / "a" / "classifier.safetensors")), load_file(str(tmp_path / "b" / "classifier.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "a" / "finetune.json").read_text())["history"]
    hb = json.loads((tmp_path / "b" / "finetune.json").read_text())["history"]
    assert ha == hb
    assert finetune.main(_argv(data, tmp_path / "b", "--recipe", "mae", "--epochs", "4", "--resume")) == 2


@pytest.mark.timm
def test_ddp_two_ranks_gloo(data, tmp_path):
    """torchrun, 2 CPU ranks (gloo): the run finishes, the lr uses the global batch, and the val accuracy
    shared over ranks equals a single-process evaluation of the saved classifier."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "m3ae_engine.eval.finetune", *_argv(data, out, "--epochs", "2", "--batch-size", "8")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "finetune.json").read_text())
    assert res["lr"] == pytest.approx(0.05 * 16 / 256) and res["settings"]["batch_size"] == 8
    again = _evaluate_saved(out, data, res)
    assert again["top1"] == pytest.approx(res["top1"]) and again["val_loss"] == pytest.approx(res["history"][-1]["val_loss"])


@pytest.mark.timm
def test_corrupt_image_in_a_loader_worker_is_one_line_error(data, tmp_path, capsys):
    import shutil
    train = tmp_path / "train"
    shutil.copytree(data / "train", train)
    (train / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    argv = _argv(data, tmp_path / "o", "--epochs", "1", "--num-workers", "1")
    argv[argv.index("--train") + 1] = str(train)
    assert finetune.main(argv) == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg.startswith("error: cannot read image") and "broken.jpg" in msg, msg
