"""Logits of a Megatron checkpoint computed by the model's own tensor- and pipeline-parallel layers.

    torchrun --nproc-per-node TP*PP tests/unit_tests/tools/parallel_logits.py CKPT TP PP TOKENS.pt LOGITS.pt

Every rank builds its part of the model at the checkpoint's layout, loads its own mp_rank_TT[_PPP] file
unchanged, and the stages pass activations forward point to point; the last stage gathers the
vocabulary-parallel logits and its first tensor rank saves them [batch, sequence, padded vocabulary].
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gpt_builders import gpt_builder  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.legacy.model.gpt_model import flatten_legacy_state_dict  # noqa: E402
from megatron.training.checkpointing import (  # noqa: E402
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    read_metadata,
)
from megatron.training.model_config import core_transformer_config_from_args  # noqa: E402


def _load_rank_checkpoint(load_dir: str, pipeline_size: int) -> dict:
    iteration, release = read_metadata(get_checkpoint_tracker_filename(load_dir))
    path = get_checkpoint_name(
        load_dir,
        iteration,
        release,
        pipeline_parallel=pipeline_size > 1,
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
    )
    return torch.load(path, map_location="cpu", weights_only=False)


def _build_model(checkpoint: dict):
    args = checkpoint["args"]
    config = core_transformer_config_from_args(args)
    config.perform_initialization = False
    config.use_cpu_initialization = True
    model = gpt_builder(
        args,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        config=config,
    )
    model.load_state_dict(flatten_legacy_state_dict(checkpoint["model"]))
    return model.eval(), args


def _forward(model, args, tokens: torch.Tensor) -> torch.Tensor:
    """This stage's output: hidden states [s, b, h] or, on the last stage, this tensor rank's logits."""
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    if not parallel_state.is_pipeline_first_stage():
        received = torch.empty(tokens.size(1), tokens.size(0), args.hidden_size)
        dist.recv(received, parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    output = model(tokens, positions, None)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(output.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
    return output


def main(load_dir: str, tensor_size: str, pipeline_size: str, tokens_path: str, output_path: str) -> None:
    dist.init_process_group("gloo")
    tensor_size, pipeline_size = int(tensor_size), int(pipeline_size)
    parallel_state.initialize_model_parallel(tensor_size, pipeline_size)
    model, args = _build_model(_load_rank_checkpoint(load_dir, pipeline_size))
    tokens = torch.load(tokens_path)
    with torch.no_grad():
        output = _forward(model, args, tokens)
    if parallel_state.is_pipeline_last_stage():
        pieces = [torch.empty_like(output) for _ in range(tensor_size)]
        dist.all_gather(pieces, output.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(torch.cat(pieces, dim=-1), output_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
