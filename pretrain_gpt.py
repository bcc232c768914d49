"""Pretrain a GPT-family model (Llama 2/3, Qwen3, classic GPT) on the legacy or the mcore stack.

    torchrun --nproc-per-node N pretrain_gpt.py MODEL_FLAGS DATA_FLAGS TRAINING_FLAGS
    python pretrain_gpt.py ...            (one process; CPU + gloo when there is no GPU)

The model comes from gpt_builders.model_provider (--use-legacy-models selects the legacy stack), the
datasets from megatron.training.datasets; this file only turns a batch into a loss.
"""

from functools import partial

import torch

from gpt_builders import model_provider
from megatron.core import parallel_state
from megatron.training.global_vars import get_args
from megatron.training.training import pretrain


def get_batch(data_iterator):
    """The next micro batch on this rank's device: tokens, labels, loss_mask, attention_mask, position_ids.

    Only the pipeline stages that embed tokens or compute the loss read the data; a middle stage (or
    model chunk) gets its input from the previous stage and returns Nones without consuming a batch.
    """
    if not (
        parallel_state.is_pipeline_first_stage(ignore_virtual=False)
        or parallel_state.is_pipeline_last_stage(ignore_virtual=False)
    ):
        return None, None, None, None, None
    args = get_args()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    batch = next(data_iterator)
    attention_mask = batch.get("attention_mask")
    return (
        batch["tokens"].to(device, non_blocking=True),
        batch["labels"].to(device, non_blocking=True),
        batch["loss_mask"].to(device, non_blocking=True),
        attention_mask.to(device, non_blocking=True) if attention_mask is not None else None,
        batch["position_ids"].to(device, non_blocking=True),
    )


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of masked per-token losses, token count, report): the schedule divides by the count, and the
    report's [sum, count] gives the exact token mean over micro batches and data-parallel ranks."""
    losses = output_tensor.float().reshape(-1)
    loss_mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = {"lm loss": torch.cat([loss.detach().view(1), num_tokens.float().view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator, model):
    """Per-token losses of one micro batch, and the function that reduces them."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


if __name__ == "__main__":
    # Imported here so that bench/ and tests can reuse forward_step without the data pipeline.
    from megatron.training.datasets import train_valid_test_datasets_provider

    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
