"""Checkpoints: atomic writes, newest-K rotation, resume lookup, RNG state, export to safetensors.

Layout of OUTPUT_DIR/checkpoints/:
  step_00000100/            a complete checkpoint (renamed into place only after every file is written)
    meta.json               step, runtime kind, train config, model config
    state.pt                plain PyTorch: model, optimizer, client state      (or)
    deepspeed/              DeepSpeed: its model / ZeRO optimizer shards, client state
    rng_rank{R}.pt          python, numpy, torch CPU and CUDA generator states of each rank
  .tmp-step_00000200/       a write in progress; never picked by --resume; removed when the write fails
                            and, left by a killed run, at the next start (under the output-dir lock)

Every file is fsynced, then the folder, before the rename; a failed write (e.g. a full disk) removes
its temporary folder and stops with a one-line CheckpointError naming the newest intact checkpoint.

Loading never runs code from a file: state.pt and rng_rank*.pt are read with torch.load(weights_only=True)
(tensors, numbers, strings, containers), DeepSpeed's own files under the same rule through an allowlist
of the plain DeepSpeed/ZeRO classes they hold (`deepspeed_loads_weights_only`). A file that needs
anything else is refused with a CheckpointError. `--resume latest` falls back to the newest checkpoint
that loads, naming the ones it skipped.

Export (any ZeRO stage, or the plain path) to one fp32 safetensors file that `load_exported` turns
back into an M3AE:
  python -m m3ae_engine.checkpoint export OUTPUT_DIR/checkpoints/step_00000100 model.safetensors
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from ..storage.atomic import atomic_write_text
from ..interop.exported import save_exported  # noqa: F401 (the trainer's final export)
from ..interop.run_checkpoint import list_checkpoints, step_dir_name  # noqa: F401 (the run-folder layout)
from ..storage.safe_load import CheckpointError, first_line, load_weights_only, refusal  # noqa: F401

def _deepspeed_safe_globals() -> list:
    """The plain classes DeepSpeed/ZeRO checkpoints hold besides tensors (loss scalers, ZeRO enums, the
    fragment addresses of a universal checkpoint); none of them runs code when rebuilt."""
    found = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                          ("deepspeed.runtime.zero.offload_config", ("OffloadDeviceEnum",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except Exception:  # other DeepSpeed versions move things: a missing name is simply not allowed
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    import argparse as _ap
    import collections
    return found + [_ap.Namespace, collections.OrderedDict, torch.Size]


@contextlib.contextmanager
def deepspeed_loads_weights_only():
    """DeepSpeed's load_checkpoint / zero_to_fp32 call torch.load(weights_only=False) on some versions:
    for their duration every torch.load is forced to weights_only=True with the allowlist above, so a
    planted pickle is refused (CheckpointError) instead of run."""
    real = torch.load
    allowed = _deepspeed_safe_globals()

    def guarded(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(allowed):
                return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refused to load: it holds objects outside the DeepSpeed allowlist, "
                                  f"which could run code ({refusal(e)})") from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable, truncated or corrupt ({first_line(e)})") from None

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = real


def resolve_resume(resume: str, output_dir: Optional[str]) -> List[Path]:
    """The checkpoints to try, newest first. 'latest' -> every complete checkpoint in OUTPUT_DIR/checkpoints
    (none yet: [], so a preemptible job can always pass --resume latest; the loader falls back to an older
    one when the newest does not load); a path -> that checkpoint alone, which must be complete."""
    if resume == "latest":
        return list(reversed(list_checkpoints(Path(output_dir) / "checkpoints")))
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no meta.json); "
                                f"complete ones: {[str(p) for p in list_checkpoints(path.parent)]}")
    return [path]


def clean_stale_temp(ckpt_root: Path) -> List[str]:
    """At the start of a run that holds the output-dir lock: the `.tmp-*` folders of a killed write are
    removed, and a `.old-step_N` whose `step_N` is missing (killed between the two renames of a re-save)
    is put back. Returns what was done, for the log."""
    done = []
    if not ckpt_root.is_dir():
        return done
    for p in sorted(ckpt_root.iterdir()):
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the unfinished {p.name}")
        elif p.name.startswith(".old-"):
            final = ckpt_root / p.name[len(".old-"):]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)
                done.append(f"restored {final.name}")
    return done


def rng_state() -> dict:
    """Generator states as tensors, ints and tuples only, so that they load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is True on every rank (a barrier that also carries a failure)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if ok else 0.0])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)
    return ok


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder (bottom-up), so a rename publishes data on disk."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory: nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "iostream error" in str(e):
        return f"disk full? ({first_line(e)})"
    return first_line(e)


def save_checkpoint(runtime, ckpt_root: Path, step: int, client_state: dict, meta: dict, keep_last: int,
                    rank: int, crash_hook=None) -> Path:
    """All ranks call this. Files go to .tmp-step_N and are fsynced; rank 0 renames it to step_N once
    every rank is done, so an interrupted write leaves the previous checkpoint as the newest complete one.
    A failed write (any rank) removes .tmp-step_N and raises CheckpointError on every rank."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (".tmp-" + final.name)
    error = None
    if rank == 0:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # this run's own earlier attempt at the same step
            tmp.mkdir()
        except OSError as e:
            error = e
    if all_ranks_ok(error is None):
        try:
            runtime.save(tmp, client_state)
            torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
            if crash_hook is not None:
                crash_hook(tmp)
            fsync_tree(tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            error = e
    ok = all_ranks_ok(error is None)
    if ok and rank == 0:
        try:
            with open(tmp / "meta.json", "w") as f:  # written last: marks completeness
                f.write(json.dumps(meta, indent=2))
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
        except OSError as e:
            error = e
    ok = all_ranks_ok(error is None) if ok else ok
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        intact = list_checkpoints(ckpt_root)
        why = _write_error(error) if error is not None else "it failed on another rank"
        raise CheckpointError(f"could not write the checkpoint {final} ({why}); the partial write was removed; "
                              f"the newest intact checkpoint is {intact[-1] if intact else 'none'}")
    if rank == 0:
        replaced = None
        if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save):
            replaced = ckpt_root / (".old-" + final.name)  # move it aside, so a complete copy always exists
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(runtime, path: Path, rank: int) -> dict:
    """Weights, optimizer and this rank's generators from one checkpoint; CheckpointError when a file is
    missing, truncated, corrupt or refused (nothing in it is run)."""
    client_state = runtime.load(path)
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: generators start fresh there
        state = load_weights_only(rng_file)
        try:
            set_rng_state(state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{rng_file}: not a generator state of this version ({first_line(e)})") from None
    return client_state


def load_first_good(runtime, candidates: List[Path], rank: int, note: Callable[[str], None]):
    """(path, client state) of the first checkpoint in `candidates` (newest first) that loads on every
    rank; each one skipped is noted with the reason. CheckpointError when none loads."""
    reasons = []
    for path in candidates:
        error = None
        try:
            client = load_checkpoint(runtime, path, rank)
        except CheckpointError as e:
            error, client = str(e), None
        if all_ranks_ok(error is None):
            return path, client
        reason = error or "it failed to load on another rank"
        reasons.append(f"{path.name}: {reason}")
        note(f"warning: skipping the checkpoint {path}: {reason}")
    raise CheckpointError(f"no checkpoint loads ({'; '.join(reasons)})")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of `metrics.jsonl` up to `step` (a resumed run logs the later ones again) and drop
    a torn last line; atomic rewrite. Returns the number of rows removed."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            if int(row.get("step", 0)) <= step:
                keep.append(line)
                continue
        except (ValueError, TypeError, AttributeError):
            pass
        dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped


# ---------------------------------------------------------------------------------------------- export
def consolidated_state_dict(path: Path) -> dict:
    """fp32 full model weights from a checkpoint of any runtime / ZeRO stage (CPU only, no process group)."""
    path = Path(path)
    if (path / "state.pt").is_file():
        state = load_weights_only(path / "state.pt", mmap=True)  # the optimizer state stays on disk
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path / 'state.pt'}: no 'model' state dict in it")
        state = state["model"]
    elif (path / "deepspeed").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with deepspeed_loads_weights_only():
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
    else:
        raise FileNotFoundError(f"{path}: neither state.pt (plain PyTorch) nor deepspeed/ (DeepSpeed) found")
    return {k.removeprefix("module."): v.detach().float().cpu().contiguous() for k, v in state.items()}


def export(checkpoint: Path, out: Path) -> Path:
    try:
        meta = json.loads((Path(checkpoint) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(checkpoint) / 'meta.json'}: unreadable ({first_line(e)})") from None
    save_exported(consolidated_state_dict(checkpoint), meta["model_config"], Path(out))
    return Path(out)


def load_exported(path, device="cpu"):
    """An M3AE (train mode) with the weights of an exported safetensors file (its config travels in the
    metadata); convert.load_model reads it, with the same strictness."""
    from ..interop.load import load_model
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
    try:
        out = export(ckpt, Path(args.out))
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {ckpt} -> {out}")


if __name__ == "__main__":
    main()
