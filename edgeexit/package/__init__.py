"""The exit package: a directory holding ``manifest.json`` and one ONNX file per stage.

This package reads, verifies and writes packages with the standard library and numpy
only.  The format is specified in ``docs/FORMAT.md``; the rules enforced here are the
MUST rules of that document.  Reading verifies everything that can be verified
without onnxruntime (format version, schema, file names, presence, size, sha256,
policy names) before any session is built.  The constants and dataclasses live in
``_spec``, the manifest's schema checks in ``_parse``, the checks on one file in
``_files``, verified reading in ``_read`` and atomic writing in ``_write``.
"""

from __future__ import annotations

from ._files import check_file_name as check_file_name
from ._files import refuse_external_data as refuse_external_data
from ._files import sha256_file as sha256_file
from ._parse import parse_manifest as parse_manifest
from ._read import load_package as load_package
from ._read import read_manifest as read_manifest
from ._spec import COMPILED_OUTPUTS as COMPILED_OUTPUTS
from ._spec import DISABLED_EXITS_VERSION as DISABLED_EXITS_VERSION
from ._spec import DTYPES as DTYPES
from ._spec import ENCODER_EXITS_VERSION as ENCODER_EXITS_VERSION
from ._spec import FORMAT_NAME as FORMAT_NAME
from ._spec import FORMAT_VERSION as FORMAT_VERSION
from ._spec import KINDS as KINDS
from ._spec import MANIFEST_NAME as MANIFEST_NAME
from ._spec import MAX_DIM as MAX_DIM
from ._spec import SEQ2SEQ_VERSION as SEQ2SEQ_VERSION
from ._spec import SIGNALS_VERSION as SIGNALS_VERSION
from ._spec import SUPPORTED_FORMAT_VERSIONS as SUPPORTED_FORMAT_VERSIONS
from ._spec import TEMPERATURE_VERSION as TEMPERATURE_VERSION
from ._spec import TEXT_VERSION as TEXT_VERSION
from ._spec import CompiledSpec as CompiledSpec
from ._spec import ExitSpec as ExitSpec
from ._spec import FullModelSpec as FullModelSpec
from ._spec import InputSpec as InputSpec
from ._spec import Package as Package
from ._spec import Seq2SeqSpec as Seq2SeqSpec
from ._spec import StageSpec as StageSpec
from ._spec import TextSpec as TextSpec
from ._write import check_replaceable as check_replaceable
from ._write import manifest_bytes as manifest_bytes
from ._write import pack_package as pack_package
from ._write import set_temperatures as set_temperatures
from ._write import set_thresholds as set_thresholds
from ._write import update_manifest as update_manifest
from ._write import write_package as write_package
