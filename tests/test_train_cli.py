"""train.py's command line: sections, on/off flags, negative numbers, model fields from flags and YAML,
"did you mean", one-line errors for broken files, the default output folder, rank-0 errors."""
import dataclasses
import json
import re

import pytest

from m3ae_engine.model.config import ConfigError, M3AEConfig
from m3ae_engine.train.config import GROUPS, NOT_FLAGS, TrainConfig, build_parser, model_field_types, parse

NONE = ["--output-dir", "none"]  # parse() alone: no default folder name needed


def one_line_error(argv, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse(argv)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_help_is_grouped_and_lists_every_field():
    text = build_parser().format_help()
    titles = [t for t in GROUPS] + ["other options"]
    positions = [text.index(t + ":") for t in titles if t + ":" in text]
    assert len(positions) >= len(GROUPS) and positions == sorted(positions)
    # every TrainConfig field (also one added later without a group) and every exposed model field has a flag
    for name in [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FLAGS] + list(model_field_types()):
        assert "--" + name.replace("_", "-") in text, name
    assert "--norm-pix-loss, --no-norm-pix-loss" in text and "NORM_PIX_LOSS" not in text
    assert re.search(r"--image-size N +default 256 \(tiny 32\)", text)
    assert re.search(r"--patch-size N +default 16 \(tiny 8\)", text)


def test_a_field_without_a_group_lands_in_other_options(monkeypatch):
    import m3ae_engine.train.config as tc
    monkeypatch.setitem(tc.GROUPS, "data", tuple(n for n in tc.GROUPS["data"] if n != "num_workers"))
    text = build_parser().format_help()
    assert "--num-workers" in text.split("other options:")[1]


def test_boolean_flags():
    assert parse(NONE + ["--no-tensorboard"]).tensorboard is False
    assert parse(NONE + ["--norm-pix-loss"]).norm_pix_loss is True
    assert parse(NONE + ["--norm-pix-loss", "false"]).norm_pix_loss is False  # explicit values still work
    assert parse(NONE + ["--no-packed"]).model == {"packed": False}
    one_line_error(NONE + ["--norm-pix-loss", "maybe"], "expected true/false")


def test_negative_numbers_parse_then_validation_names_the_field():
    one_line_error(NONE + ["--base-lr", "-1e-3"], r"base_lr must be in \(0, 1\), got -0.001")
    one_line_error(NONE + ["--end-lr", "-0.5"], "end_lr must be >= 0")
    assert parse(NONE + ["--seed", "-3"]).seed == -3


def test_model_fields_from_flags_and_yaml(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("image_size: 64\nmodel:\n  patch_size: 16\n  image_mean: [0.5, 0.5, 0.5]\n")
    cfg = parse(NONE + ["--config", str(f), "--emb-dim", "96", "--image-size", "48"])
    assert cfg.model == {"image_size": 48, "patch_size": 16, "image_mean": (0.5, 0.5, 0.5), "emb_dim": 96}
    mc = cfg.model_config()
    assert (mc.image_size, mc.patch_size, mc.emb_dim, mc.depth, mc.num_patches) == (48, 16, 96, 2, 9)
    assert TrainConfig(model={"text_length": 16}).model_config().text_length == 16
    # one-line errors naming the field
    one_line_error(NONE + ["--image-size", "30"], r"image_size \(30\) must be divisible by patch_size \(8\)")
    f.write_text("patch_size: 0\n")
    one_line_error(NONE + ["--config", str(f)], "patch_size must be a positive integer")
    f.write_text("emb_dim: wide\n")
    one_line_error(NONE + ["--config", str(f)], "emb_dim: expected int")
    f.write_text("use_type_embedding: 3\n")
    one_line_error(NONE + ["--config", str(f)], "use_type_embedding must be true or false")
    with pytest.raises(ConfigError, match="did you mean patch_size"):
        TrainConfig(model={"patch_sise": 4})


def test_misspelt_options_get_a_suggestion(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("bath_size: 3\n")
    msg = one_line_error(NONE + ["--config", str(f)], "unknown option 'bath_size' in .*run.yaml; did you mean batch_size")
    assert "warmup" not in msg  # a suggestion, not the list of every key
    one_line_error(NONE + ["--lerning-rate-warmup", "3"], "unknown option '--lerning-rate-warmup'")
    one_line_error(NONE + ["--bach-size", "3"], "did you mean --batch-size")


@pytest.mark.parametrize("name, text, where", [
    ("bad.yaml", "steps: 3\nbatch_size: [1, 2\n", r"bad.yaml:3:1: invalid YAML"),
    ("bad.yaml", "steps: 3\n  batch_size: 4\n", r"bad.yaml:2:13: invalid YAML"),
    ("bad.json", '{"steps": 3,\n "batch_size": }', r"bad.json:2:16: invalid JSON"),
    ("list.yaml", "- steps\n", "expected a mapping"),
])
def test_broken_config_files_give_one_line_with_line_and_column(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    one_line_error(["--config", str(tmp_path / name)], where)


def test_default_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse([])
    assert re.fullmatch(r"runs/tiny-\d{8}-\d{6}", cfg.output_dir)
    (tmp_path / cfg.output_dir).mkdir(parents=True)
    assert parse(["--preset", "small"]).output_dir.startswith("runs/small-")
    assert parse([]).output_dir.startswith(cfg.output_dir + "-")  # an existing folder is never reused
    assert parse(["--output-dir", "none"]).output_dir is None
    one_line_error(["--resume", "latest"], "--resume latest needs --output-dir")


def test_a_config_error_on_two_ranks_is_printed_once(monkeypatch, capsys):
    import m3ae_engine.train.cli as cli
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as e:
            cli.main(["--steps", "0"])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: steps must be a positive integer, got 0") == 1 and "Traceback" not in err


def test_worker_count_is_capped_by_the_cores(capsys):
    from m3ae_engine.train.runtime import DistInfo
    from m3ae_engine.train.batches import available_cores, capped_workers
    n = available_cores()
    assert capped_workers(n + 7, DistInfo()) == n
    assert f"--num-workers {n + 7} reduced to {n}" in capsys.readouterr().out
    assert capped_workers(0, DistInfo()) == 0


def test_log_interval_gives_short_runs_regular_updates():
    from m3ae_engine.train.loop import log_interval
    assert log_interval(TrainConfig(), 300) == 25
    assert log_interval(TrainConfig(), 20) == 2
    assert log_interval(TrainConfig(log_every=1), 300) == 1


def test_console_scripts_point_at_callables(monkeypatch):
    import importlib
    import sys
    import tomllib
    from pathlib import Path
    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"m3ae-train", "m3ae-convert", "m3ae-shards", "m3ae-checkpoint"} <= set(scripts)
    monkeypatch.setattr(sys, "argv", ["m3ae-x", "--help"])  # a console script calls its function without arguments
    for name, target in scripts.items():
        module, func = target.split(":")
        with pytest.raises(SystemExit) as e:
            getattr(importlib.import_module(module), func)()
        assert e.value.code == 0, name
