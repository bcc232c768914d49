"""Pretrain a GPT-family model (Llama 2/3, Qwen3, classic GPT) on the legacy or the mcore stack.

    torchrun --nproc-per-node N pretrain_gpt.py MODEL_FLAGS DATA_FLAGS TRAINING_FLAGS
    python pretrain_gpt.py ...            (one process; CPU + gloo when there is no GPU)

Laid out like Megatron-LM's pretrain_gpt.py: model_provider, get_batch, loss_func, forward_step and
train_valid_test_datasets_provider handed to megatron.training.pretrain. The model comes from
gpt_builders.gpt_builder (--use-legacy-models selects the legacy stack, --spec a custom layer spec), the
datasets from megatron.training.datasets.
"""

from functools import partial

import torch

from gpt_builders import gpt_builder
from megatron.core import mpu
from megatron.core.enums import ModelType
from megatron.core.utils import StragglerDetector
from megatron.training import get_args, get_timers, pretrain, print_rank_0
from megatron.training.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank

stimer = StragglerDetector()


def model_provider(pre_process=True, post_process=True, vp_stage=None):
    """This rank's model (chunk): `pre_process` holds the embedding, `post_process` the output layer."""
    print_rank_0("building GPT model ...")
    return gpt_builder(get_args(), pre_process, post_process, vp_stage)


def get_batch(data_iterator):
    """tokens, labels, loss_mask, attention_mask, position_ids of the next micro batch on this rank.

    Only the pipeline stages that embed tokens or compute the loss read the data; a middle stage (or model
    chunk) gets its input from the previous stage and returns Nones without consuming a batch.
    """
    if not (mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()):
        return None, None, None, None, None
    batch = get_batch_on_this_tp_rank(data_iterator)
    batch = get_batch_on_this_cp_rank(batch)
    return batch.values()


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of masked per-token losses, token count, report): the schedule divides by the count (unless
    --calculate-per-token-loss), and the report's [sum, count] gives the exact token mean over micro batches
    and data-parallel ranks.

    Under context parallelism each rank holds part of every sequence: the count and the report cover the
    whole sequences (summed over the context-parallel group), and the local sum is multiplied by the
    context-parallel size because gradients are averaged over data x context parallel ranks."""
    losses = output_tensor.float().reshape(-1)
    loss_mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * loss_mask)
    totals = torch.cat([loss.detach().view(1), loss_mask.sum().view(1)])
    cp_size = mpu.get_context_parallel_world_size()
    if cp_size > 1:
        torch.distributed.all_reduce(totals, group=mpu.get_context_parallel_group())
    return loss * cp_size, totals[1].to(torch.int), {"lm loss": totals}


def forward_step(data_iterator, model):
    """Per-token losses of one micro batch, and the function that reduces them."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    with stimer(bdata=True):
        tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    timers("batch-generator").stop()
    with stimer:
        # Multi-token prediction weighs its losses with the loss mask (mcore only).
        extra = {"loss_mask": loss_mask} if getattr(get_args(), "mtp_num_layers", None) else {}
        output_tensor = model(tokens, position_ids, attention_mask, labels=labels, **extra)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """The train, validation and test datasets (GPT datasets, or mock data with --mock-data)."""
    # Imported here so that bench/ and tests can reuse forward_step without the data pipeline.
    from megatron.training.datasets import train_valid_test_datasets_provider as build_datasets

    return build_datasets(train_val_test_num_samples)


# Every rank builds (memory-maps) the datasets itself.
train_valid_test_datasets_provider.is_distributed = True


if __name__ == "__main__":
    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
