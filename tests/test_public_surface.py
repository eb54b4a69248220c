"""The public surface users and scripts rely on: the top-level imports, every console script, every
documented `python -m` command, and `M3AE.from_pretrained` / `save_pretrained`."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_COMMANDS = ("m3ae_engine.convert", "m3ae_engine.checkpoint", "m3ae_engine.data.shards",
                   "m3ae_engine.eval.linear_probe", "m3ae_engine.eval.finetune", "m3ae_engine.eval.ood",
                   "m3ae_engine.eval.reconstruct", "m3ae_engine.eval.attention")


def test_top_level_imports():
    from m3ae_engine import ConfigError, InputError, M3AE, M3AEConfig, ops  # noqa: F401
    assert callable(ops.random_masking) and callable(ops.masked_mse_loss)
    assert callable(M3AE.from_pretrained) and callable(M3AE.save_pretrained)


def test_every_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 9
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), f"{name} -> {target}"


def test_documented_module_commands_answer_help():
    """`python -m PATH --help` of each documented command (one interpreter runs them all with runpy)."""
    code = ("import runpy, sys\n"
            f"for mod in {MODULE_COMMANDS!r}:\n"
            "    sys.argv = [mod, '--help']\n"
            "    try:\n"
            "        runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (mod, e.code)\n"
            "    else:\n"
            "        raise AssertionError(mod + ' --help did not exit')\n"
            "    print('ok', mod, flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("ok ")] == [f"ok {m}" for m in MODULE_COMMANDS]


def test_save_and_load_pretrained_round_trip(tmp_path):
    import torch
    from m3ae_engine import M3AE, M3AEConfig
    model = M3AE(M3AEConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    back = M3AE.from_pretrained(tmp_path / "m")
    assert type(back) is M3AE
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
