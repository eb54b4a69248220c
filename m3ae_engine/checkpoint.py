"""Checkpoints: atomic writes, newest-K rotation, resume lookup, RNG state, export to safetensors.

Layout of OUTPUT_DIR/checkpoints/:
  step_00000100/            a complete checkpoint (renamed into place only after every file is written)
    meta.json               step, runtime kind, train config, model config
    state.pt                plain PyTorch: model, optimizer, client state      (or)
    deepspeed/              DeepSpeed: its model / ZeRO optimizer shards, client state
    rng_rank{R}.pt          python, numpy, torch CPU and CUDA generator states of each rank
  .tmp-step_00000200/       a write in progress; never picked by --resume, removed by the next save

Export (any ZeRO stage, or the plain path) to one fp32 safetensors file that `load_exported` turns
back into an M3AE:
  python -m m3ae_engine.checkpoint export OUTPUT_DIR/checkpoints/step_00000100 model.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path):
    """Complete checkpoints (they have meta.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Optional[str]) -> Optional[Path]:
    """'latest' -> newest complete checkpoint in OUTPUT_DIR/checkpoints (None if there is none yet, so a
    preemptible job can always pass --resume latest); a path -> that checkpoint, which must be complete."""
    if resume == "latest":
        found = list_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no meta.json); "
                                f"complete ones: {[str(p) for p in list_checkpoints(path.parent)]}")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(runtime, ckpt_root: Path, step: int, client_state: dict, meta: dict, keep_last: int,
                    rank: int, crash_hook=None) -> Path:
    """All ranks call this. Files go to .tmp-step_N; rank 0 renames it to step_N once every rank is done,
    so an interrupted write leaves the previous checkpoint as the newest complete one."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (".tmp-" + final.name)
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):  # an earlier interrupted write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    runtime.save(tmp, client_state)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if crash_hook is not None:
        crash_hook(tmp)
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completeness
        replaced = None
        if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save):
            replaced = ckpt_root / (".old-" + final.name)  # move it aside, so a complete copy always exists
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(runtime, path: Path, rank: int) -> dict:
    client_state = runtime.load(path)
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: generators start fresh there
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


# ---------------------------------------------------------------------------------------------- export
def consolidated_state_dict(path: Path) -> dict:
    """fp32 full model weights from a checkpoint of any runtime / ZeRO stage (CPU only, no process group)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)["model"]
    elif (path / "deepspeed").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
    else:
        raise FileNotFoundError(f"{path}: neither state.pt (plain PyTorch) nor deepspeed/ (DeepSpeed) found")
    return {k.removeprefix("module."): v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_exported(state_dict: dict, model_config: dict, out: Path) -> None:
    """Write fp32 CPU weights to a safetensors file (atomic rename) with the model config in its metadata."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    state_dict = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    save_file(state_dict, str(tmp), metadata={"m3ae_config": json.dumps(model_config), "format": "pt"})
    os.replace(tmp, out)


def export(checkpoint: Path, out: Path) -> Path:
    meta = json.loads((Path(checkpoint) / "meta.json").read_text())
    save_exported(consolidated_state_dict(checkpoint), meta["model_config"], Path(out))
    return Path(out)


def load_exported(path, device="cpu"):
    """An M3AE (train mode) with the weights of an exported safetensors file (its config travels in the
    metadata); convert.load_model reads it, with the same strictness."""
    from .convert import load_model
    model, _ = load_model(path, device=device)
    return model.train()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m m3ae_engine.checkpoint", description="checkpoint tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="one fp32 safetensors file from a checkpoint of any ZeRO stage")
    e.add_argument("checkpoint", help="a step_N checkpoint dir, or an output dir (its newest checkpoint)")
    e.add_argument("out", help="the .safetensors file to write")
    args = p.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not (ckpt / "meta.json").is_file():
        found = list_checkpoints(ckpt / "checkpoints") or list_checkpoints(ckpt)
        if not found:
            sys.exit(f"error: no complete checkpoint in {ckpt}")
        ckpt = found[-1]
    out = export(ckpt, Path(args.out))
    print(f"exported {ckpt} -> {out}")


if __name__ == "__main__":
    main()
