"""TrainConfig, the DeepSpeed config filling and the documented errors: all checked before any work."""
import json

import pytest
import torch

from m3ae_engine.model.config import ConfigError
from m3ae_engine.train.runtime import DistInfo, prepare_ds_config
from m3ae_engine.train.config import TrainConfig, parse
from m3ae_engine.train.batches import check_data


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "batch_size must be a positive integer"),
    (["--preset", "giant"], "preset must be one of"),
    (["--image-mask-ratio", "1.5"], "image_mask_ratio must be in [0, 1]"),
    (["--image-mask-ratio", "0.0"], "masks none of the 16 image patches"),
    (["--mask-sharing", "device"], "mask_sharing must be 'sample' or 'batch'"),
    (["--text-loss-weight", "-1"], "text_loss_weight must be >= 0"),
    (["--kernels", "fast"], "kernels must be one of"),
    (["--batch-size", "10", "--grad-accum", "3"], "must be divisible by grad_accum"),
    (["--epochs", "2"], "need dataset_size"),
    (["--base-lr", "2"], "base_lr must be in (0, 1)"),
    (["--precision", "fp8"], "precision must be auto, bf16 or fp32"),
    (["--resume", "latest"], "--resume latest needs --output-dir"),
    (["--resume", "/nonexistent/ckpt"], "checkpoint directory not found"),
    (["--deepspeed_config", "/nonexistent/ds.json"], "DeepSpeed config not found"),
    (["--config", "/nonexistent/run.yaml"], "config file not found"),
    (["--data", "shards.tar", "--eval-every", "5"], "eval_every needs --data synthetic"),
])
def test_bad_values_raise_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse(argv)


def test_train_py_exits_with_the_message(capsys):
    import train
    with pytest.raises(SystemExit, match="error: steps must be a positive integer"):
        train.main(["--steps", "0"])


def test_file_then_cli_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\nbatch-size: 32\nsteps: 50\nbase_lr: 1e-3\nmask_sharing: batch\n")
    cfg = parse(["--config", str(f), "--steps", "7"])
    assert (cfg.batch_size, cfg.steps, cfg.base_lr, cfg.mask_sharing) == (32, 7, 0.001, "batch")
    assert cfg.peak_lr == pytest.approx(0.001 * 32 / 256)
    (tmp_path / "typo.yaml").write_text("steps: many\n")
    with pytest.raises(ConfigError, match="steps: expected"):
        parse(["--config", str(tmp_path / "typo.yaml")])
    (tmp_path / "bad.json").write_text(json.dumps({"batchsize": 3}))
    with pytest.raises(ConfigError, match="unknown option"):
        parse(["--config", str(tmp_path / "bad.json")])


def test_epochs_replace_steps():
    cfg = parse(["--epochs", "2", "--dataset-size", "1000", "--batch-size", "100", "--warmup-epochs", "0.5"])
    assert (cfg.total_steps, cfg.total_warmup_steps) == (20, 5)
    assert TrainConfig().effective_base_lr == 1.5e-3 and TrainConfig(preset="base").effective_base_lr == 1.5e-4


def test_missing_data(tmp_path):
    import m3ae_engine.data as data
    cfg = TrainConfig(data=str(tmp_path / "shards-{000..003}.tar"))
    with pytest.raises(ConfigError, match="no file matches"):
        check_data(cfg)
    (tmp_path / "shards-002.tar").write_bytes(b"")
    assert check_data(cfg) is data.build_loader
    # the unpaired text sources are checked before any work too; a brace alternative is one pattern
    (tmp_path / "b.txt").write_text("a caption")
    ok = TrainConfig(unpaired_text_data=f"{tmp_path}/{{a,b}}.txt::{tmp_path}/b.txt", unpaired_text_loss_weight=0.5)
    assert check_data(ok) is None
    with pytest.raises(ConfigError, match="--unpaired-text-data: no file matches"):
        check_data(TrainConfig(unpaired_text_data=f"{tmp_path}/{{c,d}}.txt", unpaired_text_loss_weight=0.5))


def test_split_sources_keeps_brace_alternatives():
    from m3ae_engine.data.sources import split_sources
    assert split_sources("a/{000..009}.tar::b/{x,y}.tar, c.tar,") == ["a/{000..009}.tar", "b/{x,y}.tar", "c.tar"]


def test_ds_config_filled_from_the_run(tmp_path):
    cfg = TrainConfig(batch_size=16, grad_accum=2, grad_clip=0.5)
    ds = prepare_ds_config("configs/zero3_offload.json", cfg, DistInfo(0, 2, 0), torch.device("cpu"))
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (16, 2, 4)
    assert ds["gradient_clipping"] == 1.0  # the file's explicit value wins over --grad-clip
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(cfg.peak_lr)
    assert ds["bf16"]["enabled"] is False  # CPU runs of the GPU configs: half precision off
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_batch_size=64 disagrees"):
        prepare_ds_config(str(bad), cfg, DistInfo(0, 2, 0), torch.device("cpu"))
    for name in ("ds.json", "configs/zero1.json", "configs/zero2.json", "configs/zero3.json"):
        d = json.load(open(name))
        assert d["bf16"]["enabled"] and "optimizer" not in d, name  # client optimizer: torch (fused) AdamW


def test_shipped_yaml_configs_parse():
    cfg = parse(["--config", "configs/tiny.yaml", "--output-dir", "none"])
    assert cfg == TrainConfig(base_lr=1.5e-3)  # the file spells out the no-argument default run
    cfg = parse(["--config", "configs/m3ae_base.yaml", "--data", "synthetic"])
    assert (cfg.total_steps, cfg.total_warmup_steps) == (244141, 12207) and cfg.peak_lr == pytest.approx(2.4e-3)
    cfg = parse(["--config", "configs/m3ae_base.yaml", "--data", "synthetic", "--steps", "10", "--warmup-steps", "2"])
    assert (cfg.total_steps, cfg.total_warmup_steps) == (10, 2)  # flags beat the file's epochs
