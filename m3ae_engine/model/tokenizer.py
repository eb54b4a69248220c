"""BERT-uncased WordPiece tokenizer (HF `tokenizers`), as the official M3AE data pipeline uses it:
no [CLS]/[SEP] added, pad id 0, fixed length 64, `padding_mask = 1 - attention_mask`.

The default vocabulary ships with the package (`assets/bert-base-uncased-vocab.txt`, the 30,522-entry
BERT uncased WordPiece vocabulary, Apache-2.0), so it works with no network. A local
`tokenizer.json` or `vocab.txt` can be given instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

DEFAULT_VOCAB = Path(__file__).parent / "assets" / "bert-base-uncased-vocab.txt"
PAD_ID = 0


class Tokenizer:
    def __init__(self, path: Optional[str] = None, max_length: int = 64):
        try:
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers.implementations import BertWordPieceTokenizer
        except ImportError as e:  # pragma: no cover - dependency of the package
            raise ImportError("the tokenizer needs the `tokenizers` package: pip install tokenizers") from e
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        path = Path(path) if path is not None else DEFAULT_VOCAB
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path} (give a tokenizer.json or a vocab.txt)")
        if path.suffix == ".json":
            self._tok = HFTokenizer.from_file(str(path))
        else:
            self._tok = BertWordPieceTokenizer(str(path), lowercase=True, strip_accents=None,
                                               clean_text=True, handle_chinese_chars=True)
        self.max_length = max_length
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=PAD_ID, pad_token="[PAD]")
        self.path = str(path)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode_batch(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids [B, L] int64, padding_mask [B, L] float32, 1 = padding)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, not one string")
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        ids = torch.tensor([e.ids for e in encs], dtype=torch.int64).reshape(len(encs), self.max_length)
        attn = torch.tensor([e.attention_mask for e in encs], dtype=torch.float32).reshape(len(encs), self.max_length)
        return ids, 1.0 - attn

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != PAD_ID]
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))


_DEFAULT: dict = {}


def default_tokenizer(max_length: int = 64) -> Tokenizer:
    if max_length not in _DEFAULT:
        _DEFAULT[max_length] = Tokenizer(os.environ.get("M3AE_TOKENIZER"), max_length)
    return _DEFAULT[max_length]
