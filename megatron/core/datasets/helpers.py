"""Python face of the compiled index builders in helpers.cpp."""

import numpy

try:
    from megatron.core.datasets import helpers_cpp
except ImportError as error:  # a source checkout that was never installed
    raise ImportError(
        "The compiled dataset helper megatron.core.datasets.helpers_cpp is missing. "
        "Build it with `pip install -e .` from the repository root."
    ) from error


def build_sample_idx(
    sizes: numpy.ndarray,
    document_indices: numpy.ndarray,
    sequence_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> numpy.ndarray:
    """Return the [num_samples + 1, 2] sample index (document position, offset) of a GPT dataset.

    int32 when every value fits, int64 otherwise, so billions of tokens never overflow.
    """
    sizes = numpy.ascontiguousarray(sizes, dtype=numpy.int32)
    document_indices = numpy.ascontiguousarray(document_indices, dtype=numpy.int32)
    largest_value = max(document_indices.shape[0], int(sizes.max()) if sizes.size else 0)
    builder = (
        helpers_cpp.build_sample_idx_int32
        if largest_value <= numpy.iinfo(numpy.int32).max
        else helpers_cpp.build_sample_idx_int64
    )
    return builder(
        sizes,
        document_indices,
        sequence_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        1 if add_extra_token_to_sequence else 0,
    )
