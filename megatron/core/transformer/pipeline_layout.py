"""Which decoder layers each pipeline stage (and virtual chunk) owns: one pure function of the sizes,
shared by the model builders and the checkpoint converter."""

import contextlib
from typing import List, Optional, Tuple

import torch

from megatron.core.model_parallel_config import ConfigError


def pipeline_stage_layer_counts(
    num_layers: int,
    pipeline_size: int,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> List[int]:
    """Layers per pipeline stage: an even split, or the first/last stage sizes given and the rest even."""
    if first_stage_layers is None and last_stage_layers is None:
        if num_layers % pipeline_size:
            raise ConfigError(
                f"num_layers {num_layers} is not divisible by the pipeline-parallel size {pipeline_size}; "
                "change one of them or set --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers"
            )
        return [num_layers // pipeline_size] * pipeline_size
    if pipeline_size == 1:
        raise ConfigError("uneven first/last pipeline stage sizes need pipeline-parallel size > 1")
    counts: List[Optional[int]] = [None] * pipeline_size
    for stage, given, flag in (
        (0, first_stage_layers, "--decoder-first-pipeline-num-layers"),
        (pipeline_size - 1, last_stage_layers, "--decoder-last-pipeline-num-layers"),
    ):
        if given is not None:
            if given < 1:
                raise ConfigError(f"{flag} must be at least 1, got {given}")
            counts[stage] = given
    remaining_layers = num_layers - sum(count for count in counts if count is not None)
    remaining_stages = counts.count(None)
    if remaining_layers < 0 or (remaining_stages == 0 and remaining_layers != 0):
        raise ConfigError(
            f"the first/last pipeline stage sizes ({first_stage_layers}, {last_stage_layers}) do not add up "
            f"with num_layers {num_layers} over {pipeline_size} stages"
        )
    if remaining_stages and (remaining_layers % remaining_stages or remaining_layers == 0):
        raise ConfigError(
            f"after the first/last pipeline stages, {remaining_layers} layers remain for {remaining_stages} "
            "stage(s); they must split evenly with at least one layer each"
        )
    even_share = remaining_layers // remaining_stages if remaining_stages else 0
    return [even_share if count is None else count for count in counts]


def layer_offset_and_count(
    num_layers: int,
    pipeline_size: int,
    pipeline_rank: int,
    virtual_size: Optional[int] = None,
    virtual_stage: Optional[int] = None,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> Tuple[int, int]:
    """(index of the first global layer, number of layers) held by one pipeline rank's model chunk.

    With virtual stages the layers go round-robin: chunk v of every stage, in stage order, then chunk v+1.
    """
    counts = pipeline_stage_layer_counts(num_layers, pipeline_size, first_stage_layers, last_stage_layers)
    chunks = virtual_size or 1
    for stage, count in enumerate(counts):
        if count % chunks:
            raise ConfigError(
                f"pipeline stage {stage} holds {count} layers, not divisible by {chunks} virtual stages "
                "(--num-layers-per-virtual-pipeline-stage must divide every stage's layers)"
            )
    per_chunk = [count // chunks for count in counts]
    chunk = virtual_stage or 0
    offset = chunk * sum(per_chunk) + sum(per_chunk[:pipeline_rank])
    return offset, per_chunk[pipeline_rank]


@contextlib.contextmanager
def layout_independent_init(config, position: int):
    """With --use-cpu-initialization, draw one module's weights from the default generator reseeded by the
    module's position in the whole model (0: embeddings, n: decoder layer n, num_layers + 1: output layer).

    A pipeline stage then builds the same weights as the unsplit model, whatever the earlier stages drew.
    The generator state is restored afterwards; without CPU initialisation nothing changes.
    """
    if not config.use_cpu_initialization:
        yield
        return
    base_seed = torch.initial_seed()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed + position)
        yield
