"""The docs run as written: every fenced block of README.md and docs/*.md.

A block runs as written unless a marker on the line before its fence says otherwise:

    <!-- docs: run in an empty folder -->      bash/python, run in a folder of its own
    <!-- docs: output -->                      "$ command" then its printed output: the command
                                               runs, and every documented line must still be
                                               printed (numbers and engine names aside)
    <!-- docs: synopsis -->                    a usage line: every --option it names exists
    <!-- docs: benchmark -->                   python benchmarks/...: the script exists and
                                               takes every --option named (minutes to run)
    <!-- docs: diagram -->                     a drawing, nothing to run
    <!-- docs: not run: REASON -->             cannot run here (a Pi, an index, your module)
    <!-- docs: checked by TEST -->             another test checks it

Blocks run in a copy of one prepared folder holding what the docs assume: the quickstart's
trained package (``edgeexit-quickstart/blenet.eexit``, copied to ``lenet.eexit`` and
``blenet.eexit``) and real MNIST-5k splits (``digits.npz``, ``val.npz``, ``cal.npz``).
``test_not_run_blocks_are_listed`` prints the blocks that do not run, with their reasons.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeexit.export import export_package
from edgeexit.zoo import blenet

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
KINDS = ("run", "run in an empty folder", "output", "synopsis", "benchmark", "diagram", "not run", "checked by")


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    language: str
    code: str
    kind: str
    reason: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for path in FILES:
        text = path.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
            before = text[:m.start()].rstrip("\n").splitlines()
            marker = re.fullmatch(r"<!-- docs: (.*?) -->", before[-1].strip()) if before else None
            kind, reason = "run", ""
            if marker:
                kind, _, reason = marker.group(1).partition(": ")
                if kind.startswith("checked by "):
                    kind, reason = "checked by", kind.removeprefix("checked by ")
            found.append(Block(path.relative_to(ROOT).as_posix(), text[:m.start()].count("\n") + 1,
                               m.group(1), m.group(2), kind, reason))
    return found


BLOCKS = _blocks()


def _of(*kinds: str) -> list[Block]:
    return [b for b in BLOCKS if b.kind in kinds]


def test_every_block_is_run_or_marked():
    unknown = [f"{b.id} ({b.kind!r})" for b in BLOCKS if b.kind not in KINDS]
    assert not unknown, f"unknown docs markers: {unknown}; use one of {KINDS}"
    unmarked = [b.id for b in BLOCKS if b.kind.startswith("run") and b.language not in ("bash", "python")]
    assert not unmarked, f"blocks that are neither bash nor python need a marker saying what they are: {unmarked}"
    reasonless = [b.id for b in BLOCKS if b.kind in ("not run", "checked by") and not b.reason]
    assert not reasonless, f"say why these blocks do not run: {reasonless}"
    assert len(_of("run", "run in an empty folder")) >= 10


def test_not_run_blocks_are_listed(capsys):
    listed = _of("not run", "diagram", "checked by")
    with capsys.disabled():
        print("\ndocs blocks not run here:")
        for b in listed:
            print(f"  {b.id} [{b.kind}] {b.reason}")
    for b in listed:   # every one of them is still in its file at that line
        assert b.code in (ROOT / b.file).read_text()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The folder the docs assume, and the output of the commands run to make it."""
    from edgeexit.datasets import mnist5k_splits

    folder = tmp_path_factory.mktemp("docs")
    done = subprocess.run(["edgeexit", "quickstart"], cwd=folder, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("lenet.eexit", "blenet.eexit"):
        shutil.copytree(folder / "edgeexit-quickstart" / "blenet.eexit", folder / name)
    splits = mnist5k_splits(0)
    np.savez(folder / "digits.npz", image=splits.test.x, labels=splits.test.y)
    for name in ("val.npz", "cal.npz"):
        np.savez(folder / name, image=splits.calibration.x, labels=splits.calibration.y)
    return folder, {"edgeexit quickstart": done.stdout + done.stderr}


def _workdir(prepared: tuple[Path, dict[str, str]], tmp_path: Path, empty: bool) -> Path:
    work = tmp_path / "work"
    if empty:
        work.mkdir()
    else:
        shutil.copytree(prepared[0], work, symlinks=True)
    return work


def _commands(code: str) -> list[str]:
    """The block's command lines, comments dropped; a trailing backslash continues a line."""
    lines = []
    for raw in code.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _sh(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("block", _of("run", "run in an empty folder"), ids=lambda b: b.id)
def test_block_runs_as_written(block, prepared, tmp_path):
    work = _workdir(prepared, tmp_path, empty=block.kind == "run in an empty folder")
    if block.language == "python":
        done = subprocess.run([sys.executable, "-c", block.code], cwd=work, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{block.id}\n{block.code}\n{done.stdout}\n{done.stderr}"
        return
    assert block.language == "bash", block.id
    for command in _commands(block.code):
        done = _sh(command, work)
        assert done.returncode == 0, f"{block.id}: {command}\n{done.stdout}\n{done.stderr}"


def _shape(line: str) -> str:
    """A printed line without what changes between runs: numbers, paths' temp parts, the engine chosen."""
    line = re.sub(r"stage loop|compiled graph", "ENGINE", line)
    line = re.sub(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?", "#", line)
    return re.sub(r"\s+", " ", line).strip()


def _prefix(line: str) -> str:
    """What a line says before its first number: its wording, which must not drift."""
    return _shape(line).split("#")[0].strip()


@pytest.mark.parametrize("block", _of("output"), ids=lambda b: b.id)
def test_documented_output_is_still_what_the_command_prints(block, prepared, tmp_path):
    first, *documented = block.code.splitlines()
    assert first.startswith("$ "), f"{block.id}: an output block starts with '$ command'"
    command = first.removeprefix("$ ")
    printed = prepared[1].get(command)
    if printed is None:
        done = _sh(command, _workdir(prepared, tmp_path, empty=False))
        assert done.returncode == 0, f"{block.id}: {command}\n{done.stdout}\n{done.stderr}"
        printed = done.stdout + done.stderr
    said = {_prefix(line) for line in printed.splitlines()}
    missing = [line for line in documented if line.strip() and _prefix(line) not in said]
    assert not missing, f"{block.id}: `{command}` no longer prints these documented lines:\n" + "\n".join(missing)


def _options_of(command: list[str]) -> set[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))


@pytest.mark.parametrize("block", _of("synopsis"), ids=lambda b: b.id)
def test_synopsis_names_real_options(block):
    joined = re.sub(r"\n[ \t]+", " ", block.code)   # an indented line continues the usage line above it
    for line in _commands(joined):
        words = line.split()
        assert words[0] == "edgeexit", f"{block.id}: {line}"
        known = _options_of(["edgeexit", words[1], "--help"])
        named = set(re.findall(r"--[a-z][a-z0-9-]*", line))
        assert named <= known, f"{block.id}: edgeexit {words[1]} has no {sorted(named - known)}"


@pytest.mark.parametrize("block", _of("benchmark"), ids=lambda b: b.id)
def test_benchmark_commands_name_real_scripts_and_options(block):
    for line in _commands(block.code):
        words = line.split()
        assert words[0] == "python" and (ROOT / words[1]).is_file(), f"{block.id}: {line}"
        known = _options_of([sys.executable, str(ROOT / words[1]), "--help"])
        named = set(re.findall(r"--[a-z][a-z0-9-]*", line))
        assert named <= known, f"{block.id}: {words[1]} has no {sorted(named - known)}"


def _json_blocks(text: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", text, flags=re.S)


def test_format_md_example_is_what_the_exporter_writes(tmp_path):
    text = (DOCS / "FORMAT.md").read_text()
    section = text[text.index("## 9. Example"):]
    documented = json.loads(_json_blocks(section)[0])
    torch.manual_seed(0)
    package = export_package(blenet(), {"image": torch.randn(4, 1, 28, 28)}, tmp_path / "x.eexit", thresholds=[0.05],
                             labels=[str(i) for i in range(10)], name="blenet", include_full_model=True, log=None)
    written = json.loads((package.root / "manifest.json").read_text())

    def without_versions(m: dict) -> dict:
        # hashes and sizes depend on the torch/onnx versions, producer names them
        m = json.loads(json.dumps(m))
        m.pop("producer")
        for meta in m["files"].values():
            meta.pop("sha256"), meta.pop("size")
        m["compiled"].pop("sources")
        return m

    assert without_versions(written) == without_versions(documented)
    assert list(written) == list(documented)   # same key order


def test_format_md_calibration_entry_has_the_keys_calibration_writes(prepared, tmp_path):
    text = (DOCS / "FORMAT.md").read_text()
    fragment = next(b for b in _json_blocks(text) if b.lstrip().startswith('"calibration"'))
    documented = json.loads("{" + fragment + "}")["calibration"]["history"][0]
    work = _workdir(prepared, tmp_path, empty=False)
    done = _sh("edgeexit calibrate blenet.eexit --data cal.npz --max-drop 0.3 -q", work)
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads((work / "blenet.eexit" / "manifest.json").read_text())["calibration"]["history"][-1]
    assert list(documented) == list(written)
    assert {k: type(v) for k, v in documented.items()} == {k: type(v) for k, v in written.items()}
