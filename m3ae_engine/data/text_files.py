"""Text-only batches for the unpaired text term: captions from text files (one a line) or from the `KEY.txt`
members of tar shards, with the image loaders' order, rank split and resume."""
from __future__ import annotations

from typing import Optional

from .order import RankOrder, check_resume, finite_length, resume_state
from .sources import Reader, build_table, decode_text, expand_sources, read_text_lines


class TextLoader:
    """Text-only batches {"text", "text_padding_mask", "caption"} (CPU) from text files (one caption a line)
    or tar shards of `KEY.txt` members; same order, rank split and resume as the image loaders."""
    decoder = "text"

    def __init__(self, sources, batch_size: int, text_length: int = 64, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, epochs: Optional[int] = None, tokenizer=None,
                 drop_last: bool = True):
        from ..model.tokenizer import default_tokenizer
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.paths = expand_sources(sources, "text")
        tars = [p for p in self.paths if p.endswith(".tar")]
        plain = [p for p in self.paths if not p.endswith(".tar")]
        self.lines = read_text_lines(plain) if plain else []
        self.table = build_table(tars, need_image=False, need_text=True) if tars else None
        self.reader = Reader(tars)
        n = len(self.lines) + (len(self.table) if self.table is not None else 0)
        self.order = RankOrder(n, rank, world_size, seed, shuffle, epochs)
        self.batch_size, self.seed, self.world_size, self.rank = batch_size, seed, world_size, rank
        self.tokenizer = tokenizer or default_tokenizer(text_length)
        self.drop_last = drop_last
        self.step = 0
        self.num_samples = n

    def _caption(self, idx: int) -> str:
        if idx < len(self.lines):
            return self.lines[idx]
        i = idx - len(self.lines)
        off, size = self.table.text[i]
        return decode_text(self.reader.read(int(self.table.shard[i]), int(off), int(size)))

    def __len__(self):
        return finite_length(self.order.num_batches(self.batch_size, self.drop_last))

    def __iter__(self):
        end = self.order.num_batches(self.batch_size, self.drop_last)
        total = self.order.total()
        while end is None or self.step < end:
            start = self.step * self.batch_size
            stop = start + self.batch_size if total is None else min(total, start + self.batch_size)
            caps = [self._caption(self.order.at(p)[1]) for p in range(start, stop)]
            text, pad = self.tokenizer.encode_batch(caps)
            self.step += 1
            yield {"text": text, "text_padding_mask": pad, "caption": caps, "decoder": self.decoder}

    def state_dict(self) -> dict:
        return resume_state(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = check_resume(self, state)
