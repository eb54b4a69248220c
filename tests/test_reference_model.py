"""benchmarks/reference_model.py: the MAE-style baseline loads M3AE's weights and gives M3AE's loss."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from m3ae_engine import M3AE, M3AEConfig  # noqa: E402
from reference_model import ReferenceM3AE  # noqa: E402


def _batch(c, b, gen):
    image = torch.randint(0, 256, (b, 3, c.image_size, c.image_size), dtype=torch.uint8, generator=gen)
    lengths = torch.tensor([1, c.text_length, 5, 11, 2][:b])  # odd lengths, one full, one of 1
    pad = (torch.arange(c.text_length)[None, :] >= lengths[:, None]).float()  # [B, Lt] 1 = padding
    text = torch.randint(1, c.vocab_size, (b, c.text_length), generator=gen) * (1 - pad).long()
    return image, text, pad


@pytest.mark.parametrize("sharing,norm_pix", [("sample", False), ("batch", True)])
def test_reference_loss_matches_engine(sharing, norm_pix):
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny", mask_sharing=sharing, norm_pix_loss=norm_pix, kernels="torch",
                               attention="math")
    engine = M3AE(c)
    ref = ReferenceM3AE(c)
    missing = ref.load_state_dict(engine.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    gen = torch.Generator().manual_seed(1)
    b = 5
    image, text, pad = _batch(c, b, gen)
    rows = b if sharing == "sample" else 1
    image_noise = torch.rand(rows, c.num_patches, generator=gen).expand(b, -1)
    text_noise = torch.rand(rows, c.text_length, generator=gen).expand(b, -1)
    out = engine(image, text, pad, image_noise=image_noise, text_noise=text_noise)
    loss_ref = ref(image, text, pad, image_noise=image_noise, text_noise=text_noise)
    torch.testing.assert_close(loss_ref, out.loss.float(), rtol=1e-5, atol=1e-5)
    # the gradients agree too (the benchmark compares training steps)
    out.loss.backward()
    loss_ref.backward()
    ge = dict(engine.named_parameters())
    for name, p in ref.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ge[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_reference_loss_depends_on_the_noise():
    torch.manual_seed(0)
    c = M3AEConfig.from_preset("tiny")
    ref = ReferenceM3AE(c)
    image, text, pad = _batch(c, 3, torch.Generator().manual_seed(2))
    a = ref(image, text, pad, image_noise=torch.rand(3, c.num_patches), text_noise=torch.rand(3, c.text_length))
    b = ref(image, text, pad, image_noise=torch.rand(3, c.num_patches), text_noise=torch.rand(3, c.text_length))
    assert torch.isfinite(a) and not torch.equal(a, b)
