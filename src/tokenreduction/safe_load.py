"""Loading checkpoint files without letting them run code.

A ``.pth`` file is a pickle, and unpickling an untrusted pickle can execute
arbitrary code (a ``__reduce__`` that calls ``os.system``). Users pass
checkpoints downloaded from the internet (DeiT, MAE, SWAG releases), so every
checkpoint the package reads goes through :func:`load_checkpoint_file`:
``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers, with an allow-list of exactly the harmless extra types the known
checkpoint formats hold:

``argparse.Namespace``
    the ``args`` entry of DeiT, MAE and timm training checkpoints.
numpy arrays, scalars and their dtypes
    this project's training checkpoints store numpy's RNG state
    (``np.random.get_state()``: a uint32 array); metrics may be numpy scalars.

Anything else (a class, a function such as ``os.system``) is refused with
:class:`UnsafeCheckpointError` naming the file and the type; nothing in the
file runs. A file that is not a readable checkpoint at all (truncated,
corrupt, not a pickle) is a :class:`CorruptCheckpointError` naming the file.
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, Path]


class CheckpointLoadError(ValueError):
    """A checkpoint file could not be loaded safely; the message names the file."""


class UnsafeCheckpointError(CheckpointLoadError):
    """The file needs a type outside the allow-list (it could run code)."""


class CorruptCheckpointError(CheckpointLoadError):
    """The file is not a readable checkpoint (truncated, corrupt, not a pickle)."""


def _numpy_globals() -> list[Any]:
    """numpy's array/scalar reconstruction functions and the plain numeric
    dtypes: what pickled ndarrays and numpy scalars reference."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    names = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
             "Float16", "Float32", "Float64")
    dtypes = [getattr(np.dtypes, f"{n}DType") for n in names if hasattr(np, "dtypes")]
    # files written under numpy 1.x name the same functions numpy.core.multiarray.*
    aliases = [(_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtypes, *aliases]


#: the extra (non-tensor, non-container) types a checkpoint may hold
ALLOWED_GLOBALS: tuple[Any, ...] = (argparse.Namespace, *_numpy_globals())

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def allowed_global_names(extra_globals: Sequence[Any] = ()) -> list[str]:
    """Qualified names of :data:`ALLOWED_GLOBALS` and `extra_globals` (for messages and docs)."""
    return sorted({g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                   for g in (*ALLOWED_GLOBALS, *extra_globals)})


def load_checkpoint_file(path: PathLike, map_location: Any = "cpu", extra_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`ALLOWED_GLOBALS`.

    `extra_globals` widens the allow-list for one caller's file formats, in
    torch's ``safe_globals`` form (a type or function, or ``(object,
    "qualified.name")`` to give the pickle's name that object instead):
    e.g. the detection path's mmengine types
    (:mod:`tokenreduction.detection.checkpoint`).

    Returns what the file holds (usually a dict of tensors and plain values).
    Raises FileNotFoundError when `path` is not a file,
    :class:`UnsafeCheckpointError` when the file references any other type or
    function (nothing from the file is executed), and
    :class:`CorruptCheckpointError` when it cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([*ALLOWED_GLOBALS, *extra_globals]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = _GLOBAL.search(text)
        if found or "Unsupported global" in text:
            what = found.group(1) if found else "a type outside the allow-list"
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: it references {what}, which is not a"
                " type known checkpoint formats need (allowed besides tensors and plain"
                f" containers: {', '.join(allowed_global_names(extra_globals))}); unpickling it could run"
                " code. Re-save the weights from a trusted environment as a plain state dict"
                " (torch.save(model.state_dict(), ...))."
            ) from None
        raise CorruptCheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt or not a checkpoint; nothing in it was"
            f" executed): {_last_line(text)}"
        ) from None
    except (EOFError, zipfile.BadZipFile, OSError) as err:  # OSError: a zip cut inside its records
        raise CorruptCheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err!r}") from None
    except RuntimeError as err:
        text = str(err)
        hint = " (truncated or corrupt?)" if "zip" in text or "archive" in text else ""
        raise CorruptCheckpointError(f"cannot read checkpoint {path}{hint}: {text.splitlines()[0] if text else err!r}") from None


def _last_line(text: str) -> str:
    """The informative line of torch's multi-line weights-only message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation", "Re-running"))]
    return (useful or lines or ["unreadable"])[0]


__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointLoadError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "allowed_global_names",
    "load_checkpoint_file",
]
