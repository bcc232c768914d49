"""Loading checkpoint files without letting them run code.

A torch checkpoint is a pickle, and unpickling an arbitrary pickle can call any function. Every checkpoint
file is therefore read with `torch.load(weights_only=True)`, which builds only tensors and plain containers,
plus an explicit allow-list of the few other types checkpoints hold: the saved `argparse.Namespace`, the
pieces of numpy's RNG state (under numpy 1.x and 2.x names), and the plain values (enums, paths, signals,
Transformer Engine's BytesIO extra state) that Megatron-LM stores. None of them can run code when built.
Anything else is refused with one line that names the file and the type.
"""

import argparse
import io
import pathlib
import pickle
import re
import signal
import types

import numpy as np
import torch

from megatron.core.enums import ModelType
from megatron.core.errors import UserError
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds a type outside the allow-list, which unpickling could abuse to run code.

    Not a RuntimeError: callers that describe RuntimeErrors as corrupt files must let this one through.
    """


# One-character codes of every numpy dtype an array in a checkpoint may have.
_DTYPE_CODES = "?bBhHiIlLqQefdgFDG"

CHECKPOINT_SAFE_GLOBALS = [
    argparse.Namespace,
    types.SimpleNamespace,
    pathlib.PosixPath,
    signal.Signals,
    io.BytesIO,  # Transformer Engine's _extra_state in Megatron-LM checkpoints,
    bytes,  # which pickles an empty buffer as a bytes() call
    ModelType,
    AttnBackend,
    AttnMaskType,
    np.ndarray,
    np.dtype,
    # numpy 1.x pickles name the array constructor numpy.core.*, numpy 2.x numpy._core.*
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    *sorted({type(np.dtype(code)) for code in _DTYPE_CODES}, key=str),
]

_DISALLOWED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_checkpoint_file(path, map_location="cpu", name=None):
    """torch.load of `path` (a file name or a binary stream, then described as `name`) with weights_only=True
    and the checkpoint allow-list.

    Raises UnsafeCheckpointError for a disallowed type; other load failures (truncated or corrupt files)
    propagate unchanged for the caller to describe.
    """
    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            disallowed = _DISALLOWED_GLOBAL.search(str(error))
            if disallowed is None:
                raise
            raise UnsafeCheckpointError(
                f"refusing to load {name or path}: it holds a {disallowed.group(1)} object, which checkpoints never "
                "contain and which could run code when loaded; use only checkpoint files from sources you trust"
            ) from None
