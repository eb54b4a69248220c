"""facebookresearch/mae-style MAE (models_mae.py, shrunk) switched to the fused ops in a few lines.

The three places that change are marked `# m3ae_engine:`; the original lines are kept in comments.
Runs on the CPU (torch backend by default):

    PYTHONPATH=. python examples/mae_dropin.py                      # backend chosen automatically
    TRITON_INTERPRET=1 PYTHONPATH=. python examples/mae_dropin.py --backend triton   # Triton on CPU
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from m3ae_engine import ops  # m3ae_engine: the one import
from m3ae_engine.model.pos_embed import sincos_2d


class TinyMAE(nn.Module):
    def __init__(self, img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True, backend=None):
        super().__init__()
        self.patch_size, self.norm_pix_loss, self.backend = patch_size, norm_pix_loss, backend
        grid = img_size // patch_size
        self.patch_embed = nn.Linear(patch_size * patch_size * in_chans, embed_dim)  # = stride-p conv on (p,p,c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim).normal_(std=0.02))
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, embed_dim), sincos_2d(embed_dim, grid)])[None])
        layer = lambda d, h: nn.TransformerEncoderLayer(d, h, 4 * d, 0.0, "gelu", batch_first=True,  # noqa: E731
                                                        norm_first=True)
        self.blocks = nn.ModuleList([layer(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim).normal_(std=0.02))
        self.register_buffer("decoder_pos_embed",
                             torch.cat([torch.zeros(1, decoder_embed_dim), sincos_2d(decoder_embed_dim, grid)])[None])
        self.decoder_blocks = nn.ModuleList([layer(decoder_embed_dim, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)

    def patchify(self, imgs):
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def forward_encoder(self, imgs, mask_ratio):
        x = self.patch_embed(self.patchify(imgs))  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        # x, mask, ids_restore = self.random_masking(x, mask_ratio)
        x, mask, ids_restore = ops.random_masking(x, mask_ratio, backend=self.backend)  # m3ae_engine: fused gather
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)  # [N, 1 + K, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)  # [N, 1 + K, Dd]
        # mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        # x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        # x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        # x = torch.cat([x[:, :1, :], x_], dim=1)
        x = ops.unshuffle(x, ids_restore, self.mask_token, cls_first=True, backend=self.backend)  # m3ae_engine
        x = x + self.decoder_pos_embed  # [N, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # [N, L, p*p*3]

    def forward_loss(self, imgs, pred, mask):
        # target = self.patchify(imgs); (norm_pix_loss) ...; loss = ((pred - target) ** 2).mean(-1)
        # return (loss * mask).sum() / mask.sum()
        return ops.masked_mse_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss,
                                   backend=self.backend)  # m3ae_engine: fused, never patchifies the target

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None, help="torch | triton | cuda (default: automatic)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyMAE(backend=args.backend).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(8, 3, 32, 32, device=dev)  # already-normalised images, as MAE's loader yields them
    print(f"backend: {ops.resolve_backend(args.backend, torch.device(dev))}")
    for step in range(args.steps):
        loss, _, _ = model(imgs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
