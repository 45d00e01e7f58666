"""Every error edgeexit raises on purpose: one base class, one subclass per failure.

Each subclass also derives from the built-in exception that fits, so callers that
catch ``ValueError`` or ``FileNotFoundError`` keep working.  Messages say what went
wrong, why it matters and how to fix it.
"""

from __future__ import annotations


class EdgeExitError(Exception):
    """Base class of every error raised by edgeexit on purpose."""

    exit_code = 1


# --- the exit package -------------------------------------------------------------


class PackageError(EdgeExitError):
    """An exit package cannot be loaded or written."""

    exit_code = 3


class PackageNotFoundError(PackageError, FileNotFoundError):
    """The path is not an exit package directory (or its manifest is missing)."""


class ManifestParseError(PackageError, ValueError):
    """``manifest.json`` is not valid JSON."""


class ManifestSchemaError(PackageError, ValueError):
    """``manifest.json`` is JSON but a field is missing or has the wrong type."""


class UnsupportedFormatError(PackageError, ValueError):
    """The manifest's ``format`` or ``format_version`` is not one this edgeexit reads."""


class UnsafePathError(PackageError, ValueError):
    """The manifest names a file outside the package, in a subfolder, or a symlink."""


class MissingFileError(PackageError, FileNotFoundError):
    """A file listed in the manifest is not in the package."""


class FileIntegrityError(PackageError, ValueError):
    """A file's size or sha256 differs from the manifest."""


class ArchiveError(PackageError, ValueError):
    """A packed package (``.eexit.zip`` bytes) is not a zip archive edgeexit can read safely."""


class GraphMismatchError(PackageError, ValueError):
    """A stage graph's input or output names differ from what the manifest declares."""


# --- policies and thresholds ------------------------------------------------------


class PolicyError(EdgeExitError, ValueError):
    """An exit policy or its thresholds are not usable."""

    exit_code = 2


class UnknownPolicyError(PolicyError, KeyError):
    """No policy of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ThresholdError(PolicyError):
    """Thresholds have the wrong count or a non-finite value."""


# --- inputs -------------------------------------------------------------------------


class InputError(EdgeExitError, ValueError):
    """An input given to ``ExitSession.run`` does not fit the package."""

    exit_code = 2


class InputNameError(InputError):
    """An input is missing or has a name the package does not know."""


class InputDtypeError(InputError, TypeError):
    """An input array has the wrong dtype."""


class InputShapeError(InputError):
    """An input array has the wrong rank, a wrong fixed dimension, or batch sizes differ."""


class EmptyBatchError(InputError):
    """An input batch holds no samples."""


class NonFiniteInputError(InputError):
    """An input array holds NaN or Inf."""


class InputFileError(InputError):
    """An input file (``.npy`` / ``.npz``) cannot be read or does not fit the package."""


class WireFormatError(InputError):
    """A tensor message (``edgeexit.runtime.wire``) is malformed: its header, a dtype outside the
    allow-list, a shape, or a byte count that does not add up."""


class MessageTooLargeError(WireFormatError):
    """A tensor message is larger than the receiver accepts."""


# --- sessions, export, data ---------------------------------------------------------


class SessionError(EdgeExitError, RuntimeError):
    """onnxruntime could not build or run a stage session."""

    exit_code = 4


class OffloadError(SessionError):
    """Offloading to a server failed (unreachable, too slow, refused, or a malformed answer) and
    the session was told not to fall back to the device (``Offload(fallback=False)``)."""


class ExportError(EdgeExitError, RuntimeError):
    """Exporting a model to an exit package failed."""

    exit_code = 5


class ExportValidationError(ExportError):
    """onnxruntime's outputs differ from torch's beyond the tolerance."""


class CompileError(ExportError):
    """A package cannot be compiled into one graph (a policy with no in-graph form, ...)."""


class ModelSpecError(EdgeExitError, ValueError):
    """A model given for export is not a valid early-exit model."""

    exit_code = 2


class UnsupportedModelError(ModelSpecError):
    """A model of an architecture the exporter does not know (the message lists those it does)."""


class DataError(EdgeExitError, RuntimeError):
    """A dataset that must be installed locally is not available."""

    exit_code = 6


class OutputError(EdgeExitError, OSError):
    """An output cannot be written: its folder is missing or not a folder, the path is an
    existing folder, the name is too long, or the filesystem is read-only, full or denies it."""

    exit_code = 8


class MissingExtraError(EdgeExitError, ImportError):
    """A command needs an optional dependency (an extra) that is not installed."""

    exit_code = 6
