"""Checkpoint conversion and loading: official M3AE (JAX/Flax pickles), facebookresearch/mae `.pth`,
timm export, safetensors in and out.

    python -m m3ae_engine.convert m3ae-to-torch  model.pkl  OUT_DIR
    python -m m3ae_engine.convert torch-to-m3ae  CKPT       OUT.pkl
    python -m m3ae_engine.convert mae-to-torch   mae_visualize_vit_large.pth OUT_DIR
    python -m m3ae_engine.convert to-timm        CKPT       OUT.safetensors
    python -m m3ae_engine.convert inspect        ANY_CHECKPOINT

OUT_DIR receives `model.safetensors` + `config.json`, the layout `train.py --output-dir` writes, which
`load_model` (and every eval command) reads. CKPT is such a directory, a training checkpoint directory
(`RUN/checkpoints/step_N`), a `.safetensors` file with a `config.json` beside it, a torch file, an
official pickle or an MAE `.pth`.

Official pickles (as `m3ae_main.py` writes them, optimizer and cloudpickled optax functions included) are
read without JAX/flax and without running code from the file (official_pickle.py). Their model config
comes from the checkpoint's own flags (`variant`, resolved as the official `get_default_config`:
official_flags.py) and is checked against the tensor shapes; what neither states is an error that names
the flag to pass (`--num-heads`, `--image-size`, ...).

Numerics (facts of the sources):
- Flax Dense kernels are [in, out]; a torch Linear weight is kernel.T. The official qkv Dense lays its
  output features out as (3, heads, head_dim), exactly as our `Attention.qkv`, so no permutation.
- Patches are flattened in (p, p, c) order; a conv patch embedding [D, C, p, p] becomes a Linear on
  flattened patches by permuting to [D, p, p, C].
- LayerNorm eps 1e-6; GELU tanh for official M3AE, exact GELU for facebookresearch/mae.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..model.config import ConfigError
from .exported import read_config_json, save_checkpoint
from .load import read_checkpoint
from .official import save_official_pickle
from .report import ConversionError, full_state_dict
from .run_checkpoint import describe_training_checkpoint, is_training_checkpoint
from .timm_export import save_timm

OVERRIDE_FIELDS = ("image_size", "text_length", "num_heads", "dec_num_heads", "image_mask_ratio", "text_mask_ratio",
                   "mask_sharing", "image_loss_weight", "text_loss_weight", "unpaired_text_loss_weight")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def arch(sp):
        g = sp.add_argument_group("model config (official pickles: replaces what the checkpoint's flags state)")
        g.add_argument("--image-size", type=int, default=None)
        g.add_argument("--text-length", type=int, default=None)
        g.add_argument("--num-heads", type=int, default=None)
        g.add_argument("--dec-num-heads", type=int, default=None)
        g.add_argument("--image-mask-ratio", type=float, default=None)
        g.add_argument("--text-mask-ratio", type=float, default=None)
        g.add_argument("--mask-sharing", choices=("batch", "sample"), default=None,
                       help="official M3AE: batch (one permutation per device); MAE: sample")
        g.add_argument("--image-loss-weight", type=float, default=None)
        g.add_argument("--text-loss-weight", type=float, default=None)
        g.add_argument("--unpaired-text-loss-weight", type=float, default=None)
        sp.add_argument("--config", default=None, help="config.json to use instead of the checkpoint's")
        sp.add_argument("--allow-unexpected", action="store_true", help="ignore source entries nothing maps to")

    for name, hlp in (("m3ae-to-torch", "official Flax pickle -> OUT_DIR (model.safetensors + config.json)"),
                      ("mae-to-torch", "facebookresearch/mae .pth -> OUT_DIR (image-only mode)"),
                      ("to-torch", "any supported checkpoint -> OUT_DIR")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("src")
        sp.add_argument("out_dir")
        arch(sp)
    sp = sub.add_parser("torch-to-m3ae", help="our checkpoint -> pickle the official load_checkpoint / "
                                              "--load_pretrained read (no optimizer state)")
    sp.add_argument("src")
    sp.add_argument("out")
    sp = sub.add_parser("to-timm", help="encoder -> timm vit_* state dict (.safetensors or .pth) + timm_config.json")
    sp.add_argument("src")
    sp.add_argument("out")
    sp = sub.add_parser("inspect", help="describe a checkpoint (official pickle, training checkpoint directory, "
                                        "export, MAE .pth) and what its tensors convert to")
    sp.add_argument("src")
    arch(sp)
    args = p.parse_args(argv)

    def overrides():
        return {k: getattr(args, k, None) for k in OVERRIDE_FIELDS}

    try:
        if args.cmd == "inspect" and is_training_checkpoint(Path(args.src)) and not (Path(args.src) / "state.pt").is_file():
            print("\n".join(describe_training_checkpoint(Path(args.src))))  # DeepSpeed shards: described only
            print(f"weights: not read here; export them with: python -m m3ae_engine.checkpoint export {args.src} "
                  f"model.safetensors")
            return 0
        if args.cmd in ("m3ae-to-torch", "mae-to-torch", "to-torch", "inspect"):
            src = Path(args.src)
            if args.cmd == "m3ae-to-torch" and src.suffix.lower() not in (".pkl", ".pickle"):
                raise ConversionError(f"m3ae-to-torch expects an official .pkl, got {src.name}")
            if args.cmd == "mae-to-torch" and src.suffix.lower() not in (".pth", ".pt", ".safetensors"):
                raise ConversionError(f"mae-to-torch expects an MAE .pth, got {src.name}")
            cfg = read_config_json(args.config) if args.config else None
            sd, cfg, report = read_checkpoint(src, cfg, **overrides())
            print(report)
            if args.cmd == "inspect":
                print("model config: " + json.dumps(cfg.to_dict(), indent=2))
                return 0 if report.ok else 1
            report.raise_if_errors(allow_unexpected=args.allow_unexpected)
            out = save_checkpoint(full_state_dict(sd, cfg), cfg, args.out_dir)
            print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
        elif args.cmd == "torch-to-m3ae":
            sd, cfg, report = read_checkpoint(args.src)
            report.raise_if_errors()
            notes = save_official_pickle(full_state_dict(sd, cfg), cfg, args.out, step=report.step or 0)
            for n in notes:
                print(f"note: {n}")
            print(f"wrote {args.out} (step {report.step or 0}; parameters and flags only, no optimizer state: "
                  f"official fine-tuning / linear probing can load it, official pre-training cannot resume it)")
        elif args.cmd == "to-timm":
            sd, cfg, report = read_checkpoint(args.src)
            report.raise_if_errors()
            n, spec = save_timm(full_state_dict(sd, cfg), cfg, Path(args.out))
            print(f"wrote {args.out} ({n} tensors) and {Path(args.out).parent / 'timm_config.json'}\n"
                  f"load: timm.create_model({spec['base_model_name']!r}, pretrained=False, num_classes=N, "
                  f"**{spec['kwargs']}).load_state_dict(sd, strict=False)  # head stays new")
    except (ConversionError, ConfigError, FileNotFoundError) as e:
        if args.cmd == "inspect" and getattr(e, "about", None):
            print("\n".join(e.about))
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
