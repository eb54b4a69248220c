"""Quick GPU smoke test of the model path: plan transfer, attention, bf16 autocast, fwd+bwd+step.
Where the step's time goes: benchmarks/step_profile.py.

python benchmarks/smoke_gpu.py [--preset large] [--batch-size 64] [--steps 10]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from m3ae_engine import M3AE, M3AEConfig, ops
from m3ae_engine.model.attention import available_backends
from m3ae_engine.train.optim import build_optimizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="large")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--attention", default="auto")
    a = p.parse_args()
    print("kernels:", ops.available_backends(), "attention:", available_backends())
    c = M3AEConfig.from_preset(a.preset, kernels=a.kernels, attention=a.attention)
    m = M3AE(c).cuda()
    opt = build_optimizer(m, 1e-4)
    B = a.batch_size
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (B, 3, c.image_size, c.image_size), dtype=torch.uint8).cuda()
    lengths = torch.randint(3, 30, (B,), generator=g)
    pad = (torch.arange(c.text_length)[None] >= lengths[:, None]).float()
    text = torch.randint(1, c.vocab_size, (B, c.text_length), generator=g) * (1 - pad).long()
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(img, text, pad)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out

    times = []
    for _ in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[2:] or times) * 1e3  # the first two steps warm up (when there are more)
    print(f"{a.preset} B={B} kernels={a.kernels} attention={a.attention}: loss {out.loss.item():.4f} "
          f"step {ms:.1f} ms = {B / ms * 1e3:.0f} samples/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
