"""The MuE command line: export the zoo model from weights, inspect it, run it on image +
question data with reference answers, as text, CSV and JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeexit.cli import cli

torch = pytest.importorskip("torch")

from edgeexit.zoo.mue import MuEConfig, MuEModel  # noqa: E402
from edgeexit.zoo.mue_task import QUESTIONS, answer, encode  # noqa: E402


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mue-cli")
    torch.manual_seed(0)
    torch.save(MuEModel(MuEConfig()).state_dict(), folder / "w.pt")
    result = CliRunner().invoke(cli, ["export", "mue", "--weights", str(folder / "w.pt"), "-o",
                                      str(folder / "mue.eexit"), "--threshold", "0.99", "--threshold", "0.99",
                                      "--threshold", "0.9"])
    assert result.exit_code == 0, result.output
    return folder / "mue.eexit"


def test_export_inspect_and_run_a_seq2seq_package(package, tmp_path):
    inspect = CliRunner().invoke(cli, ["inspect", str(package)])
    assert inspect.exit_code == 0, inspect.output
    assert "seq2seq 'mue', format version 6" in inspect.output and "exits when similarity > 0.9" in inspect.output
    rng = np.random.default_rng(0)
    kinds = list(QUESTIONS)
    digits = rng.integers(0, 10, 12)
    data = tmp_path / "qa.npz"
    np.savez(data, image=rng.random((12, 1, 28, 28), dtype=np.float32),
             question=np.stack([encode(QUESTIONS[kinds[i % 5]], 5) for i in range(12)]),
             answers=np.array([answer(kinds[i % 5], int(d)) for i, d in enumerate(digits)]))
    result = CliRunner().invoke(cli, ["run", str(package), str(data), "-o", str(tmp_path / "out.csv"),
                                      "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    assert "12 samples; encoder layers per modality (mean): image" in result.output
    assert "exact match:" in result.output
    rows = list(csv.DictReader((tmp_path / "out.csv").read_text().splitlines()))
    assert len(rows) == 12 and set(rows[0]) == {"sample", "answer", "decoder_layers_per_token",
                                                 "encoder_layers_image", "encoder_layers_text"}
    as_json = CliRunner().invoke(cli, ["run", str(package), str(data), "--json", "-q"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["schema"] == "edgeexit.run/1" and len(payload["answers"]) == 12
    assert [r["answer"] for r in rows] == payload["answers"]
    assert 0 <= payload["exact_match"] <= 1 and 1 <= min(payload["decoder_layers_per_token"]) <= 6


def test_run_takes_questions_as_text_with_the_manifests_vocabulary(package, tmp_path):
    rng = np.random.default_rng(2)
    image = rng.random((4, 1, 28, 28), dtype=np.float32)
    texts = [QUESTIONS[k] for k in ("digit", "even", "bigger", "caption")]
    np.savez(tmp_path / "ids.npz", image=image, question=np.stack([encode(t, 5) for t in texts]))
    np.savez(tmp_path / "text.npz", image=image, question=np.array(texts))
    runs = [CliRunner().invoke(cli, ["run", str(package), str(tmp_path / f), "--json", "-q"])
            for f in ("ids.npz", "text.npz")]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    assert json.loads(runs[0].stdout)["answers"] == json.loads(runs[1].stdout)["answers"]
    for bad, why in ((["what colour is this", *texts[1:]], "'colour' is not in the package's vocabulary"),
                     (["", *texts[1:]], "question 0 is empty"),
                     (["is it even is it even", *texts[1:]], "has 6 words; the model takes at most 5")):
        np.savez(tmp_path / "bad.npz", image=image, question=np.array(bad))
        refused = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "bad.npz")])
        assert refused.exit_code != 0 and why in refused.output, refused.output
        assert "Traceback" not in refused.output


def test_seq2seq_packages_refuse_classifier_options_and_run(package, tmp_path):
    from edgeexit.errors import InputError
    from edgeexit.runtime import ExitSession

    np.savez(tmp_path / "qa.npz", image=np.zeros((2, 1, 28, 28), np.float32),
             question=np.stack([encode(QUESTIONS["digit"], 5)] * 2))
    result = CliRunner().invoke(cli, ["run", str(package), str(tmp_path / "qa.npz"), "--threshold", "0.5"])
    assert result.exit_code == 2 and "seq2seq thresholds are in the package" in result.output
    sess = ExitSession(package)
    one = {"image": np.zeros((1, 1, 28, 28), np.float32), "question": encode(QUESTIONS["digit"], 5)[None]}
    with pytest.raises(InputError, match="use generate"):
        sess.run(one)
    with pytest.raises(InputError, match="max_new_tokens"):
        sess.generate(one, max_new_tokens=50)
    with pytest.raises(InputError, match="unknown threshold"):
        sess.generate(one, thresholds={"audio": 0.5})
    bad = CliRunner().invoke(cli, ["export", "mue", "--weights", str(package.parent / "w.pt"), "-o",
                                   str(tmp_path / "x.eexit"), "--threshold", "0.5"])
    assert bad.exit_code == 2 and "three --threshold values" in bad.output
    data = str(tmp_path / "qa.npz")
    quantize = ["quantize", "-o", str(tmp_path / "q.eexit"), "--data", data]
    for command in (["compile"], ["bench", "--data", data], quantize):
        refused = CliRunner().invoke(cli, [command[0], str(package), *command[1:]])
        assert refused.exit_code == 2 and "is a seq2seq package" in refused.output, (command, refused.output)


def test_compare_chooses_writes_and_reports_every_contender(tmp_path):
    """The quickstart's comparison (what `edgeexit quickstart --model mue` and bench_mue.py print) on a
    small untrained model and a few real-shaped samples: thresholds land in the package, every
    contender is scored, counted and timed, and the JSON has the documented keys."""
    from edgeexit.export.seq2seq import export_mue
    from edgeexit.package import load_package
    from edgeexit.zoo.mue_quickstart import EXITS_OFF, IN_GRAPH_OFF, PLAIN, compare
    from edgeexit.zoo.mue_task import make_splits

    torch.manual_seed(0)
    model = MuEModel(MuEConfig(width=32, heads=4, ff=64, encoder_layers=2, decoder_layers=2)).eval()
    package = export_mue(model, tmp_path / "m.eexit", log=None).root
    rng = np.random.default_rng(0)
    images, digits = rng.random((40, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 40)
    order = rng.permutation(40)
    splits = make_splits(images, digits, order[20:], order[10:20], order[:10], seed=0)
    report = compare(model, package, tmp_path / "plain", splits, timed_samples=5, passes=1, log=lambda _l: None)
    spec = load_package(package).seq2seq
    assert [m["threshold"] for m in spec.modalities] == [report.thresholds["image"], report.thresholds["text"]]
    assert spec.decoder_threshold == report.thresholds["decoder"]
    payload = json.loads(json.dumps(report.to_dict()))
    assert set(payload) == {"package", "thresholds", "joint_encoder_threshold", "calibration_full_accuracy",
                            "test_pairs", "timed_samples", "passes", "seconds", "contenders"}
    assert len(payload["contenders"]) == 7 and payload["test_pairs"] == 10
    assert payload["contenders"][PLAIN]["accuracy"] == payload["contenders"][EXITS_OFF]["accuracy"] \
        == payload["contenders"][IN_GRAPH_OFF]["accuracy"]
    for row in payload["contenders"].values():
        assert row["mean_ms"] > 0 and 0 <= row["accuracy"] <= 1
    assert len(report.lines()) == 2 + 7


def test_calibrate_a_seq2seq_package_from_answers(package, tmp_path):
    """`edgeexit calibrate` on a seq2seq package: thresholds chosen against the package's own answers
    with every exit off (used as the reference here, so exits keep 100 % of them at --max-drop 0)."""
    import shutil

    from edgeexit.package import load_package
    from edgeexit.runtime import ExitSession

    work = tmp_path / "m.eexit"
    shutil.copytree(package, work)
    rng = np.random.default_rng(1)
    feeds = {"image": rng.random((10, 1, 28, 28), dtype=np.float32),
             "question": np.stack([encode(QUESTIONS[k], 5) for k in list(QUESTIONS) * 2])}
    reference = ExitSession(work).generate(feeds, thresholds={"image": None, "text": None, "decoder": None}).text
    np.savez(tmp_path / "cal.npz", **feeds, answers=np.array(reference))
    result = CliRunner().invoke(cli, ["calibrate", str(work), "--data", str(tmp_path / "cal.npz"), "--max-drop",
                                      "0", "--json", "-q"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["full_accuracy"] == 1.0 and payload["written"] is True
    spec = load_package(work).seq2seq
    assert [m["threshold"] for m in spec.modalities] == [payload["thresholds"]["image"], payload["thresholds"]["text"]]
    assert spec.decoder_threshold == payload["thresholds"]["decoder"]
    again = ExitSession(work).generate(feeds)          # the written thresholds keep every answer
    assert again.text == reference
    no_answers = tmp_path / "x.npz"
    np.savez(no_answers, **feeds)
    refused = CliRunner().invoke(cli, ["calibrate", str(work), "--data", str(no_answers), "--max-drop", "1"])
    assert refused.exit_code == 2 and "no 'answers'" in refused.output
