import numpy as np
import torch

from m3ae_engine.data import SyntheticBatches, make_sample
from m3ae_engine.model.tokenizer import DEFAULT_VOCAB, Tokenizer, default_tokenizer


def test_bert_uncased_wordpiece_without_special_tokens():
    tok = default_tokenizer(64)
    assert tok.vocab_size == 30522
    ids, pad = tok.encode_batch(["Hello World, a RED circle!", ""])
    assert ids.shape == (2, 64) and ids.dtype == torch.int64 and pad.dtype == torch.float32
    words = [tok.id_to_token(i) for i in ids[0][pad[0] == 0].tolist()]
    assert words == ["hello", "world", ",", "a", "red", "circle", "!"]
    assert 101 not in ids[0].tolist() and 102 not in ids[0].tolist()  # no [CLS]/[SEP]
    assert (ids[pad > 0] == 0).all() and pad[1].sum() == 64  # pad id 0, padding_mask = 1 - attention
    assert tok.decode(ids[0]) == "hello world, a red circle!"


def test_truncation_to_max_length_and_local_vocab(tmp_path):
    tok = Tokenizer(str(DEFAULT_VOCAB), max_length=4)
    ids, pad = tok.encode_batch(["one two three four five six"])
    assert ids.shape == (1, 4) and pad.sum() == 0


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    import pytest
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer(str(tmp_path / "nope.txt"))


def test_synthetic_data_is_deterministic_and_captions_describe_images():
    a_img, a_cap = make_sample(7, seed=3, image_size=64)
    b_img, b_cap = make_sample(7, seed=3, image_size=64)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, c_cap = make_sample(8, seed=3, image_size=64)
    assert not np.array_equal(a_img, c_img) or a_cap != c_cap
    assert a_img.shape == (64, 64, 3) and a_img.dtype == np.uint8
    assert "background" in a_cap and any(s in a_cap for s in ("circle", "square", "triangle", "cross"))
    # a described colour really is in the image
    from m3ae_engine.data.synthetic import COLOURS
    for name, rgb in COLOURS.items():
        if f" {name} " in a_cap:
            assert (np.abs(a_img.astype(int) - np.array(rgb)).sum(-1) == 0).any()


def test_synthetic_batches_and_resume_position():
    data = SyntheticBatches(3, image_size=32, text_length=32, seed=1)
    it = iter(data)
    b0, b1 = next(it), next(it)
    assert b0["image"].shape == (3, 3, 32, 32) and b0["image"].dtype == torch.uint8
    assert b0["text"].shape == (3, 32) and b0["text_padding_mask"].shape == (3, 32)
    state = data.state_dict()
    b2 = next(it)
    again = SyntheticBatches(3, image_size=32, text_length=32, seed=1)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["image"], b2["image"])
    r0 = SyntheticBatches(2, 32, 32, seed=1, rank=0, world_size=2).batch_at(0)["caption"]
    r1 = SyntheticBatches(2, 32, 32, seed=1, rank=1, world_size=2).batch_at(0)["caption"]
    assert r0 != r1
