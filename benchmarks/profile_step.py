"""Profile one training step with torch.profiler: top kernels by CUDA time and CPU time.

python benchmarks/profile_step.py [--preset large] [--batch-size 256] [--kernels auto] [--attention auto]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.profiler import ProfilerActivity, profile

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.optim import build_optimizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="large")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
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

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
