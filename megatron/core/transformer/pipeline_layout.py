"""Which decoder layers each pipeline stage (and virtual chunk) owns: pure functions of the sizes, shared by
the model builders and the checkpoint converter, and the split of a whole state dict into stages and back."""

import contextlib
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron.core.model_parallel_config import ConfigError

# A decoder layer's tensor in a model's state dict: (global or stage-local layer number, name within the layer).
DECODER_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


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




def split_pipeline(
    state: Dict[str, torch.Tensor],
    num_layers: int,
    pipeline_size: int,
    tied: bool,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    prediction_embedding: bool = False,
) -> List[Dict[str, torch.Tensor]]:
    """A whole mcore state dict (global layer numbers) -> per-stage state dicts with local layer numbers;
    the last stage of a tied model with several stages gets its own copy of the word embeddings as
    `output_layer.weight`, and with `prediction_embedding` (multi-token prediction) a copy of the embedding."""
    stages = [{} for _ in range(pipeline_size)]
    layers = [
        layer_offset_and_count(num_layers, pipeline_size, stage, 1, 0, first_stage_layers, last_stage_layers)
        for stage in range(pipeline_size)
    ]
    for name, tensor in state.items():
        match = DECODER_LAYER_NAME.match(name)
        if match:
            index = int(match.group(1))
            stage = next(s for s, (offset, count) in enumerate(layers) if offset <= index < offset + count)
            stages[stage][f"decoder.layers.{index - layers[stage][0]}.{match.group(2)}"] = tensor
        elif name.startswith("embedding."):
            stages[0][name] = tensor
        else:
            stages[-1][name] = tensor
    if tied and pipeline_size > 1:
        stages[-1]["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
    if prediction_embedding and pipeline_size > 1:
        stages[-1].update({name: tensor.clone() for name, tensor in stages[0].items() if name.startswith("embedding.")})
    return stages


def merge_pipeline(
    stages: List[List[Dict[str, torch.Tensor]]],
    num_layers: int,
    tied: bool,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Inverse of split_pipeline, also for virtual pipeline chunks: `stages[p][v]` is chunk v of stage p
    (one chunk per stage without virtual stages). The last stage's copies of the embeddings (tied output layer,
    multi-token prediction's embedding) are dropped."""
    merged = {}
    virtual_size = len(stages[0])
    for stage, chunks in enumerate(stages):
        for chunk, state in enumerate(chunks):
            offset, _ = layer_offset_and_count(
                num_layers, len(stages), stage, virtual_size, chunk, first_stage_layers, last_stage_layers
            )
            for name, tensor in state.items():
                match = DECODER_LAYER_NAME.match(name)
                if match:
                    merged[f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"] = tensor
                elif (stage, chunk) != (0, 0) and (name.startswith("embedding.") or tied and name == "output_layer.weight"):
                    continue
                else:
                    merged[name] = tensor
    return merged
