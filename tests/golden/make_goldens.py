"""Regenerate tests/golden/manifest_v5.json to manifest_v9.json from real exports.

    python tests/golden/make_goldens.py          # every one
    python tests/golden/make_goldens.py 9        # only these versions

Each golden is the manifest.json of a real, tiny package, copied unchanged (its files table holds
the true sha256 and size of the graphs, which are not kept: the golden tests parse the manifest
alone, as for versions 1-4):

- version 6: ``export_mue`` of a tiny MuE model (kind seq2seq, with ``seq2seq.encoder_exits`` and
  ``seq2seq.decoder_steps``);
- version 5: that same package as version 5 wrote it, i.e. without the in-graph exit graphs:
  ``write_package`` of the per-layer graphs with ``encoder_exits``/``decoder_steps`` left out and
  ``format_version`` 5 (files re-hashed by ``write_package``, then verified by ``load_package``);
- version 7: ``export_package`` of a tiny BERT with early exits and its own word-level tokenizer
  (the ``text`` object) and a dynamic ``tokens`` axis, its exit heads returning logits only;
- version 8: the same BERT with the heads of ``bert_exits`` as they are, which also return the
  ``halt`` and ``gate`` signals (``stages[].exit.signals``), exported with the q_exit policy;
- version 9: ``export_package`` of an untrained B-LeNet (seed 0, with ``full.onnx`` and the
  compiled graph), then ``set_temperatures`` (``stages[].exit.temperature``) and
  ``compile_package`` again, so the compiled graph divides by them (``compiled.temperatures``).

Needs torch, transformers and tokenizers (versions 7 and 8).  The producer versions and sha256 of the graphs depend on
the installed torch/onnx; the tests check only what the reader parses, so regenerating is optional.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent


def _copy(package_root: Path, version: int) -> None:
    from edgeexit.package import load_package

    package = load_package(package_root)   # verified: every file present, sizes and sha256 match
    assert package.format_version == version, (package.format_version, version)
    shutil.copyfile(package_root / "manifest.json", GOLDEN / f"manifest_v{version}.json")
    print(f"wrote {GOLDEN / f'manifest_v{version}.json'} ({len(package.files)} files)")


def make_seq2seq(work: Path) -> None:
    from edgeexit.export.seq2seq import export_mue
    from edgeexit.package import write_package
    from edgeexit.zoo.mue import MuEConfig, MuEModel

    torch.manual_seed(0)
    model = MuEModel(MuEConfig(width=16, heads=2, ff=32, encoder_layers=2, decoder_layers=2)).eval()
    v6 = export_mue(model, work / "mue_v6.eexit", name="mue-golden", encoder_thresholds=(0.9, None),
                    decoder_threshold=0.95, log=None)
    _copy(v6.root, 6)

    manifest = json.loads((v6.root / "manifest.json").read_text(encoding="utf-8"))
    manifest.pop("files")
    manifest["format_version"] = 5
    in_graph = set(manifest["seq2seq"].pop("encoder_exits").values()) | \
        set(manifest["seq2seq"].pop("decoder_steps").values())
    sources = {name: v6.root / name for name in v6.files if name not in in_graph}
    v5 = write_package(work / "mue_v5.eexit", manifest, sources)
    _copy(v5, 5)


def make_text(work: Path) -> None:
    import tokenizers
    import transformers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from edgeexit.export import export_package
    from edgeexit.export.model import EarlyExitModel
    from edgeexit.zoo.bert_exits import bert_exits

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=24, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
    encoder = transformers.BertModel(config, add_pooling_layer=False).eval()
    model = bert_exits(encoder, classes=3).eval()
    words = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(20)]
    tokenizer = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(work / "tok.json"))
    ids = torch.randint(2, len(words), (2, 6), generator=torch.Generator().manual_seed(2))
    text = {"tokenizer": work / "tok.json", "ids": "input_ids", "mask": "attention_mask", "max_tokens": 16}
    axes = {"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}}
    examples = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.int64)}
    logits_only = EarlyExitModel(list(model.stages), [_LogitsOnly(model.exit_at(k)) for k in range(model.num_stages)])
    package = export_package(logits_only, examples, work / "text.eexit", name="bert-text-golden",
                             labels=["neg", "neutral", "pos"], thresholds=[0.5], dynamic_axes=axes, text=text,
                             log=None)
    _copy(package.root, 7)
    package = export_package(model, examples, work / "signals.eexit", name="bert-signals-golden", policy="q_exit",
                             labels=["neg", "neutral", "pos"], thresholds=[0.5], dynamic_axes=axes, text=text,
                             log=None)
    _copy(package.root, 8)


def make_temperature(work: Path) -> None:
    from edgeexit.export import export_package
    from edgeexit.export.compile import compile_package
    from edgeexit.package import set_temperatures
    from edgeexit.zoo.blenet import blenet

    torch.manual_seed(0)
    package = export_package(blenet(), {"image": torch.randn(4, 1, 28, 28)}, work / "temperature.eexit",
                             thresholds=[0.05], labels=[str(i) for i in range(10)], name="blenet-temperature-golden",
                             include_full_model=True, log=None)
    set_temperatures(package.root, [1.5, 0.8])   # the compiled graph is stale now: built with none
    compile_package(package.root, log=None)
    _copy(package.root, 9)


class _LogitsOnly(torch.nn.Module):
    """A bert-exits head without its signals: (logits, halt, gate) -> logits."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *carry: torch.Tensor) -> torch.Tensor:
        return self.head(*carry)[0]  # type: ignore[no-any-return]


def main(versions: set[int]) -> None:
    makers = [({5, 6}, make_seq2seq), ({7, 8}, make_text), ({9}, make_temperature)]
    with tempfile.TemporaryDirectory(prefix="edgeexit-goldens-") as tmp:
        for made, make in makers:
            if made & versions:
                make(Path(tmp))


if __name__ == "__main__":
    main({int(v) for v in sys.argv[1:]} or {5, 6, 7, 8, 9})
