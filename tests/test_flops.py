"""m3ae_flops against a brute-force count of the matmuls of actual tiny forwards (FlopCounterMode)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from m3ae_engine import M3AE, M3AEConfig  # noqa: E402
from m3ae_engine.model.flops import m3ae_flops  # noqa: E402
from reference_model import ReferenceM3AE  # noqa: E402

ATTENTION = ("encoder_attention", "decoder_attention")


def _batch(c, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    lengths = torch.tensor(lengths)
    pad = (torch.arange(c.text_length)[None, :] >= lengths[:, None]).float()
    text = torch.randint(1, c.vocab_size, (b, c.text_length), generator=gen) * (1 - pad).long()
    image = torch.randint(0, 256, (b, 3, c.image_size, c.image_size), dtype=torch.uint8, generator=gen)
    return image, text, pad, lengths


def _count(fn):
    """Total FLOPs and bmm (attention) FLOPs of fn(), forward only."""
    with FlopCounterMode(display=False) as counter:
        fn()
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), ops.get("aten.bmm", 0)


@pytest.mark.parametrize("lengths", [[3, 32, 1, 17], [32, 32]])
def test_model_flops_match_engine_matmuls(lengths):
    c = M3AEConfig.from_preset("tiny", kernels="torch", attention="math", dec_depth=2)
    model = M3AE(c)
    image, text, pad, n = _batch(c, lengths)
    b = len(lengths)
    plan = model.make_plan(b, True, pad, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        total, bmm = _count(lambda: model(image, text, pad, plan=plan))
    # exact kept non-padded text per sample from the plan: encoder length - CLS - kept patches
    kept = (plan.enc.cu_seqlens[1:] - plan.enc.cu_seqlens[:-1]).double() - 1 - c.image_keep
    model_parts = m3ae_flops(c, n, kept_text=kept, training=False, breakdown=True)
    # the CPU "math" attention runs every sample at the static slot length: the padded attention count
    padded_parts = m3ae_flops(c, n, kept_text=kept, padded=True, training=False, breakdown=True)
    linear = sum(v for k, v in model_parts.items() if k not in ATTENTION + ("total",))
    assert total - bmm == pytest.approx(linear * b, rel=1e-9)
    assert bmm == pytest.approx(sum(padded_parts[k] for k in ATTENTION) * b, rel=1e-9)
    # and the packed attention would be strictly less unless every caption is full
    packed_attention = sum(model_parts[k] for k in ATTENTION)
    assert (packed_attention < sum(padded_parts[k] for k in ATTENTION)) == (min(lengths) < c.text_length)


def test_reference_flops_match_reference_model_matmuls():
    c = M3AEConfig.from_preset("tiny")
    model = ReferenceM3AE(c)
    image, text, pad, n = _batch(c, [4, 32, 9], seed=1)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math SDPA is made of countable bmm
        total, bmm = _count(lambda: model(image, text, pad))
    expected = m3ae_flops(c, n, padded=True, heads_on_all=True, training=False, breakdown=True)
    assert total == pytest.approx(expected["total"] * 3, rel=1e-9)
    assert bmm == pytest.approx(sum(expected[k] for k in ATTENTION) * 3, rel=1e-9)


def test_training_is_three_forwards_and_masked_work_is_less():
    c = M3AEConfig.from_preset("base")
    n = torch.full((8,), 14.0)
    fwd = m3ae_flops(c, n, training=False)
    assert m3ae_flops(c, n) == pytest.approx(3 * fwd)
    ref = m3ae_flops(c, n, padded=True, heads_on_all=True)
    assert ref > m3ae_flops(c, n, padded=True) > m3ae_flops(c, n)
    # full captions: the padded and packed layouts do the same transformer work
    full = torch.full((4,), float(c.text_length))
    parts_p = m3ae_flops(c, full, padded=True, breakdown=True)
    parts_m = m3ae_flops(c, full, breakdown=True)
    for k in ("encoder_linear", "encoder_attention", "decoder_linear", "decoder_attention"):
        assert parts_p[k] == pytest.approx(parts_m[k])
    # image-only (MAE): no text terms
    mae = m3ae_flops(c, None, breakdown=True)
    assert mae["text_head"] == 0 and mae["total"] < m3ae_flops(c, n)
    with pytest.raises(ValueError):
        m3ae_flops(c, torch.tensor([65.0]))
