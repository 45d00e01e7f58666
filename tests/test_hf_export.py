"""``export hf``: exits on small random Hugging Face models of every supported architecture.

Each model is built from a config object (nothing downloaded) and saved with ``save_pretrained``;
the references are a freshly loaded transformers model (``output_hidden_states``), the exit heads
``export_hf`` trained, and optimum's own ONNX export of the same folder.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import torch
from _hf_models import IMAGE_TYPES, TEXT_TYPES, images_and_labels, make_folder, texts_and_labels
from click.testing import CliRunner

from edgeexit.cli import cli
from edgeexit.datafiles import load_labelled_texts
from edgeexit.errors import InputFileError, ModelSpecError, UnsupportedModelError
from edgeexit.export.hf import export_hf
from edgeexit.runtime import ExitSession

ARCHS = (*TEXT_TYPES, *IMAGE_TYPES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, object]]:
    """model type -> (model folder, package, HFExport), plus 'bert-encoder' (a folder without a head)."""
    root = tmp_path_factory.mktemp("hf")
    out: dict[str, tuple[Path, Path, object]] = {}
    for arch in (*ARCHS, "bert-encoder"):
        model_type = arch.removesuffix("-encoder")
        folder = make_folder(root, model_type, head=arch == model_type)
        pkg = root / f"{arch}.eexit"
        if model_type in IMAGE_TYPES:
            x, y = images_and_labels(48)
            result = export_hf(folder, pkg, images=x, labels=y, epochs=2, log=None)
        else:
            texts, labels = texts_and_labels(48)
            result = export_hf(folder, pkg, texts=texts, labels=labels, epochs=2, log=None)
        out[arch] = (folder, pkg, result)
    return out


def _reference_model(folder: Path, model_type: str, head: bool):  # type: ignore[no-untyped-def]
    import transformers as tf

    if not head:
        return tf.AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    if model_type == "deit":
        return tf.DeiTForImageClassification.from_pretrained(str(folder)).eval()
    auto = tf.AutoModelForImageClassification if model_type in IMAGE_TYPES else tf.AutoModelForSequenceClassification
    return auto.from_pretrained(str(folder), attn_implementation="eager").eval()


def _inputs(session: ExitSession, model_type: str, seed: int = 7, n: int = 6) -> dict[str, np.ndarray]:
    if model_type in IMAGE_TYPES:
        return {"pixel_values": images_and_labels(n, seed=seed)[0]}
    return session.tokenize(texts_and_labels(n, seed=seed)[0])


@pytest.mark.parametrize("arch", [*ARCHS, "bert-encoder"])
def test_every_exit_equals_transformers_hidden_states_through_its_head(exported, arch) -> None:  # type: ignore[no-untyped-def]
    folder, pkg, result = exported[arch]
    model_type = arch.removesuffix("-encoder")
    session = ExitSession(pkg)
    feeds = _inputs(session, model_type)
    got = session.exit_outputs(feeds)
    reference = _reference_model(folder, model_type, head=arch == model_type)
    mask = torch.from_numpy(feeds["attention_mask"]) if "attention_mask" in feeds else None
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}, output_hidden_states=True)
        hidden = out.hidden_states
        layers = result.exit_layers
        expected = [result.heads[k](hidden[layer], hidden[layers[k - 1] if k else 0], mask)[0].numpy()
                    for k, layer in enumerate(layers[:-1])]
        last = out.logits if arch == model_type else result.heads[-1](hidden[-1], hidden[-2], mask)[0]
        expected.append(last.numpy())
    assert len(got) == len(layers) == reference.config.num_hidden_layers
    for k, (values, ref) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(values["logits"], ref, atol=1e-4, rtol=1e-4, err_msg=f"exit {k}")
        assert set(values) == {"logits", "halt", "gate"}
        assert np.all((values["gate"] > 0) & (values["gate"] < 1))
    np.testing.assert_allclose(got[-1]["halt"], 1.0)   # the last exit always halts (PonderNet's lambda_N)
    full = session.run_full(feeds)
    np.testing.assert_allclose(full, expected[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "deberta-v2", "albert"])
def test_token_axis_is_dynamic_and_a_padded_batch_equals_each_text_alone(exported, arch) -> None:  # type: ignore[no-untyped-def]
    _, pkg, _ = exported[arch]
    session = ExitSession(pkg)
    texts = texts_and_labels(6, seed=11)[0]
    feeds = session.tokenize(texts)
    lengths = feeds["attention_mask"].sum(axis=1)
    assert lengths.min() < lengths.max()   # a real padded batch
    together = session.exit_outputs(feeds)
    for i, text in enumerate(texts):
        alone = session.exit_outputs(session.tokenize([text]))
        assert session.tokenize([text])["input_ids"].shape[1] == lengths[i]
        for k in range(len(together)):
            np.testing.assert_allclose(together[k]["logits"][i], alone[k]["logits"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2"])
def test_a_text_longer_than_the_models_positions_is_cut_to_them_with_one_warning(exported, arch) -> None:  # type: ignore[no-untyped-def]
    import logging
    _, pkg, _ = exported[arch]
    session = ExitSession(pkg)
    limit = session.package.text.max_tokens
    # the test models have 72 position embeddings; RoBERTa's start after pad_token_id (0 here): 71 tokens
    assert limit == (71 if "roberta" in arch else 72)
    long = " ".join(["w7"] * 300)
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("edgeexit")   # the CLI's logger may not propagate: listen on it directly
    logger.addHandler(handler)
    try:
        result = session.run(session.tokenize([long, "w1 w2"]))
        assert session.tokenize([long])["input_ids"].shape[1] == limit
    finally:
        logger.removeHandler(handler)
    assert result.logits.shape[0] == 2 and np.all(np.isfinite(result.logits))
    assert len([m for m in seen if "were cut" in m]) == 1


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta-v2", "vit"])
def test_stage_loop_equals_compiled_graph(exported, arch) -> None:  # type: ignore[no-untyped-def]
    _, pkg, _ = exported[arch]
    session = ExitSession(pkg)
    assert session.has_compiled
    feeds = _inputs(session, arch, n=16)
    entropy = [-(np.exp(z) / np.exp(z).sum(1, keepdims=True) * (z - np.log(np.exp(z).sum(1, keepdims=True))))
               .sum(1) for z in (o["logits"].astype(np.float64) for o in session.exit_outputs(feeds))]
    thresholds = [float(np.median(e)) for e in entropy[:-1]]   # about half the samples leave at each early exit
    stages = session.run(feeds, thresholds=thresholds, engine="stages")
    compiled = session.run(feeds, thresholds=thresholds, engine="compiled")
    assert 0 < int((stages.exit_index < len(entropy) - 1).sum()) < 16
    np.testing.assert_array_equal(stages.exit_index, compiled.exit_index)
    np.testing.assert_array_equal(stages.predictions, compiled.predictions)
    np.testing.assert_allclose(stages.logits, compiled.logits, atol=1e-5, rtol=1e-5)


def _optimum_logits(folder: Path, task: str, feeds: dict[str, np.ndarray], out: Path) -> np.ndarray:
    import onnxruntime as ort

    # optimum-onnx (the baseline) caps transformers below 4.58; the exit export does not, and the CI's
    # transformers-5 step runs these tests without this one
    pytest.importorskip("optimum.exporters.onnx.convert", exc_type=ImportError)
    main_export = pytest.importorskip("optimum.exporters.onnx").main_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's and transformers' notices
        main_export(str(folder), output=str(out), task=task, do_validation=False)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    given = {n: feeds[n] if n in feeds else np.zeros_like(feeds["input_ids"]) for n in names}  # token_type_ids
    return session.run(["logits"], given)[0]   # type: ignore[no-any-return]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert", "deberta-v2", "vit"])
def test_full_onnx_equals_optimums_export_of_the_folder(exported, arch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder, pkg, _ = exported[arch]
    session = ExitSession(pkg)
    feeds = _inputs(session, arch, n=5)
    task = "image-classification" if arch in IMAGE_TYPES else "text-classification"
    ours = session.run_full(feeds)
    np.testing.assert_allclose(ours, _optimum_logits(folder, task, feeds, tmp_path / "optimum"), atol=1e-4, rtol=1e-4)


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import transformers as tf

    folder = tmp_path / "gpt2"
    tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(str(folder))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported.*bert.*deberta-v2.*vit"):
        export_hf(folder, tmp_path / "p.eexit", texts=["a", "b"], labels=["0", "1"], log=None)
    with pytest.raises(InputFileError, match=r"no config\.json"):
        export_hf(tmp_path, tmp_path / "p.eexit", texts=["a", "b"], labels=["0", "1"], log=None)


def test_exits_at_chosen_layers_and_labels_from_id2label(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = make_folder(tmp_path, "bert", layers=4, labels=["red", "green", "blue"])
    texts, labels = texts_and_labels(30)
    names = [["red", "green", "blue"][int(v)] for v in labels]
    result = export_hf(folder, tmp_path / "p.eexit", texts=texts, labels=names, exits_at=[2], pooling="masked_mean",
                       epochs=2, log=None)
    assert result.exit_layers == [2, 4]
    pkg = ExitSession(tmp_path / "p.eexit").package
    assert pkg.labels == ("red", "green", "blue") and len(pkg.stages) == 2
    with pytest.raises(ModelSpecError, match="layers 1 to 4"):
        export_hf(folder, tmp_path / "q.eexit", texts=texts, labels=names, exits_at=[5], log=None)
    with pytest.raises(InputFileError, match=r"'purple'.*not one of"):
        export_hf(folder, tmp_path / "q.eexit", texts=texts, labels=["purple", *names[1:]], log=None)


def test_finetune_trains_every_layer_and_the_exits_still_match_transformers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = make_folder(tmp_path, "distilbert", layers=2)
    before = {k: v.clone() for k, v in _reference_model(folder, "distilbert", True).state_dict().items()}
    texts, labels = texts_and_labels(24)
    result = export_hf(folder, tmp_path / "p.eexit", texts=texts, labels=labels, finetune=True, finetune_epochs=2,
                       finetune_lr=1e-3, epochs=2, log=None)   # export checks every exit against the tuned model
    assert len(result.finetune_losses) == 2 and all(np.isfinite(result.finetune_losses))
    session = ExitSession(tmp_path / "p.eexit")
    stage0 = session.package.root / "stage0.onnx"
    import onnx
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(stage0)).graph.initializer}
    original = before["distilbert.embeddings.word_embeddings.weight"].numpy()
    assert not any(w.shape == original.shape and np.allclose(w, original) for w in weights.values())


def test_cli_export_hf_from_a_csv_then_calibrate_and_run_texts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = make_folder(tmp_path, "bert", labels=["red", "green", "blue"])
    for name, seed, n in (("train.csv", 0, 60), ("val.csv", 1, 40)):
        texts, labels = texts_and_labels(n, seed=seed)
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "colour"])
            writer.writerows((t, ["red", "green", "blue"][int(v)]) for t, v in zip(texts, labels))
    lines = texts_and_labels(5, seed=2)[0]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    pkg = tmp_path / "cli.eexit"
    runner = CliRunner()
    got = runner.invoke(cli, ["export", "hf", str(folder), "-o", str(pkg), "--train-data", str(tmp_path / "train.csv"),
                              "--text-column", "sentence", "--label-column", "colour", "--epochs", "3",
                              "--exits-at", "1", "--calibrate-data", str(tmp_path / "val.csv"), "--max-drop", "5"])
    assert got.exit_code == 0, got.output
    assert "chosen thresholds" in got.output
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["attach"]["source"] == "huggingface" and manifest["attach"]["exits_at"] == [1, 3]
    assert len(manifest["calibration"]) == 1
    ran = runner.invoke(cli, ["run", str(pkg), str(tmp_path / "texts.txt")])
    assert ran.exit_code == 0, ran.output
    assert sum(line.startswith("sample") for line in ran.output.splitlines()) == 5
    missing = runner.invoke(cli, ["export", "hf", str(folder), "-o", str(tmp_path / "x.eexit"), "--train-data",
                                  str(tmp_path / "train.csv")])
    assert missing.exit_code != 0 and "no text column 'text'" in missing.output and "sentence" in missing.output


def test_cli_export_hf_on_images_then_run_an_npz(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = make_folder(tmp_path, "vit")
    x, y = images_and_labels(32)
    np.savez(tmp_path / "train.npz", pixel_values=x, labels=y)
    np.savez(tmp_path / "images.npz", pixel_values=x[:4])
    pkg = tmp_path / "vit.eexit"
    runner = CliRunner()
    got = runner.invoke(cli, ["export", "hf", str(folder), "-o", str(pkg), "--train-data", str(tmp_path / "train.npz"),
                              "--epochs", "2"])
    assert got.exit_code == 0, got.output
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["preprocessing"]["image"]["size"] == [32, 32]
    ran = runner.invoke(cli, ["run", str(pkg), str(tmp_path / "images.npz")])
    assert ran.exit_code == 0, ran.output
    assert sum(line.startswith("sample") for line in ran.output.splitlines()) == 4
    # raw uint8 images (N, H, W, C) go through the shipped processor settings: (x / 255 - 0.5) / 0.5
    raw = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "raw.npz", pixel_values=raw)
    pixels = ((raw.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "pixels.npz", pixel_values=np.ascontiguousarray(pixels))
    got = [json.loads(runner.invoke(cli, ["run", str(pkg), str(tmp_path / f), "--json"]).stdout)
           for f in ("raw.npz", "pixels.npz")]
    assert got[0]["predictions"] == got[1]["predictions"] and got[0]["scores"] == pytest.approx(got[1]["scores"])
    wrong = np.zeros((1, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "small.npz", pixel_values=wrong)
    small = runner.invoke(cli, ["run", str(pkg), str(tmp_path / "small.npz")])
    assert small.exit_code == 2 and "32x32" in small.output and "resize" in small.output


def test_labelled_texts_from_csv_tsv_and_jsonl_and_what_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.tsv").write_text("text\tlabel\nhello there\tpos\nbad day\tneg\n")
    (tmp_path / "a.jsonl").write_text('{"text": "hello there", "label": 1}\n\n{"text": "bad day", "label": 0}\n')
    assert load_labelled_texts(tmp_path / "a.tsv") == (["hello there", "bad day"], ["pos", "neg"])
    assert load_labelled_texts(tmp_path / "a.jsonl") == (["hello there", "bad day"], ["1", "0"])
    (tmp_path / "b.csv").write_text("txt,label\nhello,1\n")
    with pytest.raises(InputFileError, match=r"no text column 'text'.*\['txt', 'label'\].*Did you mean 'txt'"):
        load_labelled_texts(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("text,label\nhello,1\n   ,0\n")
    with pytest.raises(InputFileError, match="row 3 has no text"):
        load_labelled_texts(tmp_path / "c.csv")
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(InputFileError, match=r"\.csv, \.tsv, \.jsonl"):
        load_labelled_texts(tmp_path / "d.txt")
