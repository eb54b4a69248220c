"""`compile_blocks=True` (torch.compile of the attention-free halves of each block) computes the same
loss and gradients as eager, and packed sizes that change from step to step do not recompile."""
import torch

from m3ae_engine import M3AE, M3AEConfig
from m3ae_engine.data import SyntheticBatches


def test_compiled_blocks_equal_eager_and_do_not_recompile_per_size():
    torch.manual_seed(0)
    eager = M3AE(M3AEConfig.from_preset("tiny"))
    fast = M3AE(M3AEConfig.from_preset("tiny", compile_blocks=True))
    fast.load_state_dict(eager.state_dict())
    data = SyntheticBatches(4, 32, 32, seed=3)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    rows, graphs = set(), []
    for step in range(3):  # three batches: three different packed row counts
        b = data.batch_at(step)
        g = torch.Generator().manual_seed(step)
        noise = dict(image_noise=torch.rand(4, 16, generator=g), text_noise=torch.rand(4, 32, generator=g))
        out_e = eager(b["image"], b["text"], b["text_padding_mask"], **noise)
        out_f = fast(b["image"], b["text"], b["text_padding_mask"], **noise)
        rows.add(out_f.plan.enc.rows)
        torch.testing.assert_close(out_f.loss, out_e.loss, rtol=1e-5, atol=1e-6)
        ge = torch.autograd.grad(out_e.loss, list(eager.parameters()))
        gf = torch.autograd.grad(out_f.loss, list(fast.parameters()))
        for (name, _), a, e in zip(eager.named_parameters(), gf, ge):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(rows) > 1, "the batches should pack to different sizes"
    assert 0 < graphs[0] == graphs[-1], graphs  # later sizes reuse the first step's graphs
