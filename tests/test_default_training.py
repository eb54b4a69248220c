"""A short tiny training lowers the loss (the default `python train.py` path, shortened)."""
import torch

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.data import SyntheticBatches
from m3ae_engine.train.optim import build_optimizer, scaled_lr, warmup_cosine


def test_short_tiny_training_lowers_the_loss():
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny")
    m = M3AE(c)
    opt = build_optimizer(m, 2e-3)
    data = SyntheticBatches(32, c.image_size, c.text_length, seed=0, size=64)
    fixed = data.batch_at(0)
    g = torch.Generator().manual_seed(5)
    noise = (torch.rand(32, c.num_patches, generator=g), torch.rand(32, c.text_length, generator=g))

    def eval_loss():
        with torch.no_grad():
            return m(fixed["image"], fixed["text"], fixed["text_padding_mask"], image_noise=noise[0],
                     text_noise=noise[1]).loss.item()

    before = eval_loss()
    for step in range(40):
        for gr in opt.param_groups:
            gr["lr"] = warmup_cosine(step, 40, 5, 2e-3)
        b = data.batch_at(step % 2)
        loss = m(b["image"], b["text"], b["text_padding_mask"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert abs(warmup_cosine(5, 100, 10, 1.0) - 0.5) < 1e-9
    assert abs(warmup_cosine(10, 100, 10, 1.0) - 1.0) < 1e-9
    assert abs(warmup_cosine(100, 100, 10, 1.0)) < 1e-9
    assert scaled_lr(1.5e-4, 4096) == 1.5e-4 * 16
