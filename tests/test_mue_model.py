"""MuE's task and model: the questions and answers match the digits, the splits are seeded and
disjoint, and decoding one token at a time with the key/value cache gives the same logits as
the teacher-forced pass (the contract the exported per-layer graphs rely on)."""

from __future__ import annotations

import math
from types import SimpleNamespace

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


# --- export and generation ---------------------------------------------------------------


def _torch_generate(model, image, question, limit, thresholds=None, kv="drop", decay=None):  # type: ignore[no-untyped-def]
    """Reference: greedy decoding in torch with MuE's exits (cosine similarity), per sample;
    ``decay``: CALM's schedule, threshold_t = clip(0.9 threshold + 0.1 exp(-decay t / limit), -1, 1)."""
    from edgeexit.zoo.mue_task import BOS as bos
    from edgeexit.zoo.mue_task import EOS as eos

    thresholds = thresholds or {}
    out = []
    with torch.no_grad():
        for i in range(len(image)):
            img = model.embed_image(image[i:i + 1])
            q = question[i:i + 1]
            txt, txt_valid = model.embed_text(q), q != 0
            for name, h, valid in (("image", img, torch.ones(img.shape[:2], dtype=torch.bool)),
                                   ("text", txt, txt_valid)):
                bias = model.key_bias(valid)
                for layer in model.encoder:
                    new = layer(h, bias)
                    m = valid[:, :, None].double()
                    a, b = (new.double() * m).flatten(), (h.double() * m).flatten()
                    sim = float(a @ b / (a.norm() * b.norm()))
                    h = new
                    if thresholds.get(name) is not None and sim > thresholds[name]:
                        break
                if name == "image":
                    img = h
                else:
                    txt = h
            memory = model.encoder_norm(torch.cat([img, txt], 1))
            mem_bias = model.key_bias(torch.cat([torch.ones(1, img.shape[1], dtype=torch.bool), txt_valid], 1))
            c = model.config
            keys = [[] for _ in model.decoder]
            values = [[] for _ in model.decoder]
            token, tokens = bos, []
            for t in range(limit):
                x = model.embed_answer(torch.tensor([[token]]), torch.tensor([[t]]))
                for k, layer in enumerate(model.decoder):
                    pk = torch.cat(keys[k], 2) if keys[k] else torch.zeros(1, c.heads, 0, c.width // c.heads)
                    pv = torch.cat(values[k], 2) if values[k] else torch.zeros(1, c.heads, 0, c.width // c.heads)
                    new, kk, vv = layer(x, pk, pv, torch.zeros(1, 1, 1, pk.shape[2] + 1), memory, mem_bias)
                    keys[k].append(kk[:, :, -1:])
                    values[k].append(vv[:, :, -1:])
                    sim = float((new.double().flatten() @ x.double().flatten())
                                / (new.double().norm() * x.double().norm()))
                    x = new
                    base = thresholds.get("decoder")
                    if base is not None and decay is not None:
                        base = min(1.0, max(-1.0, 0.9 * base + 0.1 * math.exp(-decay * t / limit)))
                    if k < len(model.decoder) - 1 and base is not None and sim > base:
                        if kv == "copy_hidden":
                            for j in range(k + 1, len(model.decoder)):
                                kj, vj = model.decoder[j].self_kv(x)
                                keys[j].append(kj)
                                values[j].append(vj)
                        break
                token = int(model.head(x)[0, 0].argmax())
                tokens.append(token)
                if token == eos:
                    break
            out.append(tokens)
    return out


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    from edgeexit.export.seq2seq import export_mue

    return export_mue(model, tmp_path_factory.mktemp("mue") / "mue.eexit", log=None)


def _inputs(n: int = 6):
    rng = np.random.default_rng(7)
    kinds = list(QUESTIONS)
    return {"image": rng.random((n, 1, 28, 28), dtype=np.float32),
            "question": np.stack([encode(QUESTIONS[kinds[i % len(kinds)]], 5) for i in range(n)])}


def test_exported_graphs_generate_what_torch_generates_with_exits_disabled(model, exported):
    from edgeexit.runtime import ExitSession

    assert exported.kind == "seq2seq" and exported.format_version == 6 and exported.seq2seq is not None
    feeds = _inputs()
    sess = ExitSession(exported.root)
    want = _torch_generate(model, torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["question"]), 8)
    for kv in ("drop", "copy_hidden"):
        got = sess.generate(feeds, max_new_tokens=8, kv=kv)
        assert got.tokens == want
        assert all((got.encoder_layers[m] == 2).all() for m in ("image", "text"))
        assert all(d == [3] * len(t) for d, t in zip(got.decoder_layers, got.tokens))
    one = sess.generate({k: v[2:3] for k, v in feeds.items()}, max_new_tokens=8)
    assert one.tokens == want[2:3]                  # batch 1 equals the same sample in a batch


@pytest.mark.parametrize("engine", ["compiled", "stages"])
@pytest.mark.parametrize("kv", ["drop", "copy_hidden"])
def test_exits_in_the_runtime_match_the_torch_reference(model, exported, kv, engine):
    from functools import partial

    from edgeexit.runtime import ExitSession

    feeds = _inputs(8)
    session = ExitSession(exported.root)
    sess = SimpleNamespace(generate=partial(session.generate, engine=engine))
    # thresholds at the median similarity of this untrained model: some samples and tokens exit early
    probe = sess.generate(feeds, max_new_tokens=6, thresholds={"image": -1.0, "text": -1.0, "decoder": -1.0}, kv=kv)
    assert all((probe.encoder_layers[m] == 1).all() for m in ("image", "text"))
    assert all(set(d) == {1} for d in probe.decoder_layers)
    for thresholds in ({"image": 0.9, "text": 0.9, "decoder": 0.9}, {"image": 0.99, "text": 0.5, "decoder": 0.97}):
        got = sess.generate(feeds, max_new_tokens=6, thresholds=thresholds, kv=kv)
        assert got.encoder_engine == engine
        want = _torch_generate(model, torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["question"]), 6,
                               thresholds, kv)
        assert got.tokens == want, thresholds
        if engine == "compiled":     # batch 1: the decoder step with in-graph exits, one call per token
            for i in range(len(want)):
                one = session.generate({k: v[i:i + 1] for k, v in feeds.items()}, max_new_tokens=6,
                                       thresholds=thresholds, kv=kv, engine=engine)
                assert one.decoder_engine == "compiled" and one.tokens == [want[i]], (i, thresholds)
                assert one.decoder_layers == [got.decoder_layers[i]]
        else:
            assert got.decoder_engine == "stages"
        if thresholds["decoder"] == 0.9:    # tokens leave at layers 1, 2 and 3: ragged caches, compaction
            assert {layer for d in got.decoder_layers for layer in d} == {1, 2, 3}
            assert (got.encoder_layers["text"] == 1).all() and (got.encoder_layers["image"] == 2).all()


@pytest.mark.parametrize("kv", ["drop", "copy_hidden"])
def test_calm_decaying_threshold_matches_the_torch_reference(model, exported, kv):
    from edgeexit.errors import InputError
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime.seq2seq import decoder_threshold

    assert decoder_threshold(0.9, 0, 6, 4.0) == pytest.approx(0.91)            # 0.9 * 0.9 + 0.1 * e^0
    assert decoder_threshold(0.9, 3, 6, 4.0) == pytest.approx(0.81 + 0.1 * math.exp(-2.0))
    assert decoder_threshold(None, 3, 6, 4.0) is None and decoder_threshold(0.9, 3, 6, None) == 0.9
    feeds = _inputs(8)
    sess = ExitSession(exported.root)
    thresholds = {"image": 0.9, "text": 0.9, "decoder": 0.97}
    want = _torch_generate(model, torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["question"]), 6,
                           thresholds, kv, decay=4.0)
    plain = sess.generate(feeds, max_new_tokens=6, thresholds=thresholds, kv=kv)
    decayed = sess.generate(feeds, max_new_tokens=6, thresholds=thresholds, kv=kv, decay=4.0)
    assert decayed.tokens == want
    # later tokens face a lower bar, so they leave no later than with the fixed threshold
    assert sum(map(sum, decayed.decoder_layers)) < sum(map(sum, plain.decoder_layers))
    for i in range(3):               # batch 1: the decoder step with in-graph exits, fed each token's threshold
        one = sess.generate({k: v[i:i + 1] for k, v in feeds.items()}, max_new_tokens=6, thresholds=thresholds,
                            kv=kv, decay=4.0)
        assert one.decoder_engine == "compiled" and one.tokens == [want[i]]
        assert one.decoder_layers == [decayed.decoder_layers[i]]
    with pytest.raises(InputError, match="decay"):
        sess.generate(feeds, decay=-1.0)


def _plain_generate(encoder, decoder, feeds, layers, heads, head_dim, limit):  # type: ignore[no-untyped-def]
    """Greedy decoding with the plain graphs, as an app without exits would run them."""
    from edgeexit.zoo.mue_task import BOS as bos
    from edgeexit.zoo.mue_task import EOS as eos

    memory, memory_bias = encoder.run(None, feeds)
    n = len(memory)
    keys = np.zeros((layers, n, heads, 0, head_dim), np.float32)
    values = keys.copy()
    token = np.full((n, 1), bos, np.int64)
    out = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    for t in range(limit):
        logits, keys, values = decoder.run(None, {"token": token, "position": np.full((n, 1), t, np.int64),
                                                  "past_key": keys, "past_value": values, "memory": memory,
                                                  "memory_bias": memory_bias})
        token = logits[:, 0].argmax(1)[:, None].astype(np.int64)
        for i in range(n):
            if not done[i]:
                out[i].append(int(token[i, 0]))
                done[i] = token[i, 0] == eos
        if done.all():
            break
    return out


def test_the_plain_baseline_and_the_joint_encoder_ablation(model, exported, tmp_path):
    import onnxruntime as ort

    from edgeexit.export.seq2seq import export_plain_mue
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime.seq2seq import cosine

    feeds = _inputs(6)
    enc_path, dec_path = export_plain_mue(model, tmp_path)
    enc, dec = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (enc_path, dec_path))
    c = model.config
    plain = _plain_generate(enc, dec, feeds, c.decoder_layers, c.heads, c.width // c.heads, 8)
    sess = ExitSession(exported.root)
    assert plain == sess.generate(feeds, max_new_tokens=8).tokens
    for engine in ("compiled", "stages"):
        never = sess.generate(feeds, max_new_tokens=8, thresholds={"encoder": 1.0}, encoder_exit="joint",
                              engine=engine)
        assert never.tokens == plain and all((v == 2).all() for v in never.encoder_layers.values())
        first = sess.generate(feeds, max_new_tokens=8, thresholds={"encoder": -1.0}, encoder_exit="joint",
                              engine=engine)
        assert all((v == 1).all() for v in first.encoder_layers.values()) and first.encoder_engine == engine
    # between the two: the modalities leave together, at the layer where their joint similarity passes
    runner = sess._seq2seq
    parts = []       # layer 1's output and input per modality, joined: the joint similarity of each sample
    for m, valid in zip(runner.spec.modalities, runner._valids(feeds)):
        bias = np.where(valid, np.float32(0), np.float32(-1e9))[:, None, None, :]
        entering, out, _ = runner._run(runner.first[m["name"]], {m["input"]: feeds[m["input"]], "bias": bias}, "probe")
        parts.append((out * valid[:, :, None], entering * valid[:, :, None]))
    joint_similarity = cosine(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1))
    seen = np.unique(joint_similarity)
    threshold = float((seen[0] + seen[1]) / 2)                      # one sample leaves at layer 1, the rest go on
    a, b = (sess.generate(feeds, max_new_tokens=8, thresholds={"encoder": threshold}, encoder_exit="joint",
                          engine=e) for e in ("compiled", "stages"))
    assert a.tokens == b.tokens and all((a.encoder_layers[m] == b.encoder_layers[m]).all() for m in ("image", "text"))
    assert (a.encoder_layers["image"] == a.encoder_layers["text"]).all()
    assert len(set(a.encoder_layers["image"].tolist())) > 1        # samples leave at different layers: rows gathered


def test_the_in_graph_encoder_equals_the_per_layer_graphs_on_real_digits(exported):
    """Thresholds spread over each layer's observed similarities, so samples leave at every depth."""
    from edgeexit.runtime import ExitSession
    from edgeexit.runtime.seq2seq import cosine
    from edgeexit.zoo.mue_task import mnist_qa_splits

    test = mnist_qa_splits(0).test
    feeds = {"image": test.image[:40], "question": test.question[:40]}
    sess = ExitSession(exported.root)
    runner = sess._seq2seq
    valid = feeds["question"] != 0
    bias = np.where(valid, np.float32(0), np.float32(-1e9))[:, None, None, :]
    h = runner._run(runner.first["text"], {"question": feeds["question"], "bias": bias}, "probe")
    seen = np.unique(cosine(h[1], h[0], valid))       # layer 1's similarities; thresholds between them,
    between = (seen[1:] + seen[:-1]) / 2               # as a tie may round either way in the last bit
    for q in (0.2, 0.5, 0.8):
        thresholds = {"image": 0.9, "text": float(between[int(q * (len(between) - 1))])}
        compiled = runner.encode(feeds, thresholds, engine="compiled")
        stages = runner.encode(feeds, thresholds, engine="stages")
        np.testing.assert_allclose(compiled[0], stages[0], atol=1e-5)
        for m in ("image", "text"):
            assert np.array_equal(compiled[2][m], stages[2][m])
        assert len(set(stages[2]["text"].tolist())) > 1      # some samples leave early, some go on


def test_a_version_5_package_runs_its_per_layer_encoder(exported, tmp_path):
    import json
    import shutil

    from edgeexit.errors import InputError
    from edgeexit.runtime import ExitSession

    old = tmp_path / "v5.eexit"
    shutil.copytree(exported.root, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 5
    for key in ("encoder_exits", "decoder_steps"):
        for file in manifest["seq2seq"].pop(key).values():
            del manifest["files"][file]
            (old / file).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    feeds = _inputs(4)
    sess = ExitSession(old)
    got = sess.generate(feeds, max_new_tokens=8, thresholds={"image": 0.9})
    assert got.encoder_engine == "stages"
    assert got.tokens == ExitSession(exported.root).generate(feeds, max_new_tokens=8, thresholds={"image": 0.9}).tokens
    one = {k: v[:1] for k, v in feeds.items()}
    assert sess.generate(one, thresholds={"decoder": 0.9}).decoder_engine == "stages"
    assert ExitSession(exported.root).generate(one).decoder_engine == "compiled"
    with pytest.raises(InputError, match="no encoder with in-graph exits"):
        sess.generate(feeds, engine="compiled")
    with pytest.raises(InputError, match="engine="):
        sess.generate(feeds, engine="fast")


def test_similarity_is_the_cosine_of_the_flattened_valid_positions():
    from edgeexit.runtime.seq2seq import cosine

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 5, 8)), rng.standard_normal((4, 5, 8))
    valid = rng.random((4, 5)) > 0.3
    for i in range(4):
        x, y = a[i][valid[i]].ravel(), b[i][valid[i]].ravel()
        assert cosine(a, b, valid)[i] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    assert cosine(a, a)[0] == pytest.approx(1.0) and cosine(a, np.zeros_like(a))[0] == 0.0


def test_thresholds_at_one_equal_the_full_model_and_bad_inputs_are_typed(model, exported):
    from edgeexit.errors import InputError, InputShapeError
    from edgeexit.runtime import ExitSession

    feeds = _inputs(5)
    sess = ExitSession(exported.root)
    full = sess.generate(feeds, max_new_tokens=8)
    ones = sess.generate(feeds, max_new_tokens=8, thresholds={"image": 1.0, "text": 1.0, "decoder": 1.0})
    assert ones.tokens == full.tokens and ones.decoder_layers == full.decoder_layers
    with pytest.raises(InputShapeError):                     # a prompt longer than the 5 question positions
        sess.generate({**feeds, "question": np.zeros((5, 9), np.int64) + 3})
    with pytest.raises(InputShapeError):                     # the image at the wrong size
        sess.generate({**feeds, "image": np.zeros((5, 1, 8, 8), np.float32)})
    with pytest.raises(InputError, match="only padding"):
        sess.generate({**feeds, "question": np.zeros((5, 5), np.int64)})
    with pytest.raises(InputError, match="outside the vocabulary"):
        sess.generate({**feeds, "question": np.full((5, 5), 999, np.int64)})
    with pytest.raises(InputError, match="kv="):
        sess.generate(feeds, kv="keep")


def test_a_session_opened_on_stages_generates_per_layer(exported):
    from edgeexit.runtime import ExitSession

    feeds = _inputs(3)
    one = {k: v[:1] for k, v in feeds.items()}
    stages = ExitSession(exported.root, engine="stages")
    assert stages._seq2seq.encoder_exits == {} and stages._seq2seq.decoder_steps == {}   # never built
    got = stages.generate(one, max_new_tokens=8)
    assert (got.encoder_engine, got.decoder_engine) == ("stages", "stages")
    assert got.tokens == ExitSession(exported.root).generate(one, max_new_tokens=8).tokens
    auto = ExitSession(exported.root).generate(one, max_new_tokens=8)
    assert (auto.encoder_engine, auto.decoder_engine) == ("compiled", "compiled")
