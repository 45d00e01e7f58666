"""MuE's task and model: the questions and answers match the digits, the splits are seeded and
disjoint, and decoding one token at a time with the key/value cache gives the same logits as
the teacher-forced pass (the contract the exported per-layer graphs rely on)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.zoo.mue_task import (
    BOS,
    EOS,
    MAX_ANSWER,
    NUMBERS,
    PAD,
    QUESTIONS,
    VOCAB,
    answer,
    decode,
    encode,
    make_splits,
)

torch = pytest.importorskip("torch")

from edgeexit.zoo.mue import MuEConfig, MuEModel  # noqa: E402


def test_vocabulary_and_round_trip():
    assert VOCAB[:3] == ["<pad>", "<bos>", "<eos>"] and len(set(VOCAB)) == len(VOCAB)
    for kind in QUESTIONS:
        for digit in range(10):
            text = answer(kind, digit)
            ids = encode(f"<bos> {text} <eos>", MAX_ANSWER)
            assert ids[0] == BOS and decode(ids[1:]) == text
    assert answer("digit", 7) == "seven" and answer("even", 7) == "no" and answer("bigger", 7) == "yes"
    assert answer("more", 9) == "ten" and answer("caption", 4) == "a handwritten four , an even number"
    assert decode([VOCAB.index("yes"), EOS, VOCAB.index("no")]) == "yes"


def test_splits_pair_every_train_image_with_every_question_and_are_seeded():
    rng = np.random.default_rng(0)
    images = rng.random((30, 1, 28, 28), dtype=np.float32)
    digits = rng.integers(0, 10, 30)
    order = rng.permutation(30)
    a = make_splits(images, digits, order[10:], order[5:10], order[:5], seed=3)
    b = make_splits(images, digits, order[10:], order[5:10], order[:5], seed=3)
    assert len(a.train) == 20 * len(QUESTIONS) and len(a.calibration) == 5 and len(a.test) == 5
    np.testing.assert_array_equal(a.test.question, b.test.question)
    for split in (a.train, a.calibration, a.test):
        for q, kind, digit, text in zip(split.question, split.kind, split.digit, split.answers()):
            assert decode(q) == QUESTIONS[kind] and text == answer(kind, int(digit))
    assert (a.train.question != PAD).sum(1).min() >= 3 and NUMBERS[10] == "ten"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MuEModel(MuEConfig(width=32, heads=4, ff=64, encoder_layers=2, decoder_layers=3)).eval()


def test_incremental_decoding_with_the_cache_equals_the_teacher_forced_pass(model):
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((3, 1, 28, 28), dtype=np.float32))
    question = torch.from_numpy(np.stack([encode(QUESTIONS[k], 5) for k in ("digit", "even", "caption")]))
    answer_in = torch.from_numpy(rng.integers(3, len(VOCAB), (3, 6)))
    with torch.no_grad():
        full = model(image, question, answer_in)
        memory, valid = model.encode(image, question)
        mem_bias = model.key_bias(valid)
        c = model.config
        caches = [(torch.zeros(3, c.heads, 0, c.width // c.heads),) * 2 for _ in model.decoder]
        for t in range(answer_in.shape[1]):
            x = model.embed_answer(answer_in[:, t:t + 1], torch.full((3, 1), t))
            bias = torch.zeros(3, 1, 1, t + 1)
            for k, layer in enumerate(model.decoder):
                x, key, value = layer(x, *caches[k], bias, memory, mem_bias)
                caches[k] = (key, value)
                torch.testing.assert_close(model.head(x)[:, 0], full[k][:, t], rtol=1e-4, atol=1e-5)
    assert len(full) == 3 and full[0].shape == (3, 6, len(VOCAB))


def test_copy_hidden_keys_are_the_layer_projections_of_the_exited_state(model):
    x = torch.randn(2, 1, 32)
    layer = model.decoder[1]
    k, v = layer.self_kv(x)
    h = layer.norm1(x)
    torch.testing.assert_close(k, layer.self_attn.split(layer.self_attn.k(h)))
    torch.testing.assert_close(v, layer.self_attn.split(layer.self_attn.v(h)))
