"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full logits are never gathered: the ranks agree on the maximum, the target's logit (held by one rank)
and the sum of exponentials with three all-reduces of [s, b]-sized tensors.
"""

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility


def _all_reduce(tensor: torch.Tensor, op) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target):
        logits_max = vocab_parallel_logits.max(dim=-1)[0]
        _all_reduce(logits_max, torch.distributed.ReduceOp.MAX)
        shifted = vocab_parallel_logits - logits_max.unsqueeze(-1)

        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            shifted.size(-1),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
        outside = (target < vocab_start) | (target >= vocab_end)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        predicted_logits = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(predicted_logits, torch.distributed.ReduceOp.SUM)

        exp_logits = shifted.exp()
        sum_exp_logits = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp_logits, torch.distributed.ReduceOp.SUM)
        loss = sum_exp_logits.log() - predicted_logits

        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))
        ctx.save_for_backward(softmax, outside, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, outside, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), the one-hot living on the target's rank only.
        grad_input = softmax.clone()
        grad_input.scatter_add_(
            -1, local_target.unsqueeze(-1), -(~outside).to(grad_input.dtype).unsqueeze(-1)
        )
        grad_input.mul_(grad_output.unsqueeze(-1))
        return grad_input, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss -log softmax(logits)[target], shape of `target`; logits are [..., vocab / tp]."""
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)
