"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full logits are never gathered: the ranks agree on the maximum, the target's logit (held by one rank)
and the sum of exponentials with three all-reduces of [s, b]-sized tensors.

linear_vocab_parallel_cross_entropy fuses the output layer in: it walks the vocabulary in chunks, so only one
chunk's fp32 logits exist at a time, and recomputes them in backward instead of keeping the softmax.
"""

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import accumulate_weight_grad, fuses_weight_grad_accumulation
from megatron.core.tensor_parallel.utils import VocabUtility


def _all_reduce(tensor: torch.Tensor, op) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())


def _target_on_this_rank(target: torch.Tensor, partition_vocab_size: int):
    """(outside, local_target): which targets another rank's vocabulary slice holds, and the others' local
    index (0 where outside)."""
    vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
        partition_vocab_size,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    outside = (target < vocab_start) | (target >= vocab_end)
    return outside, (target - vocab_start).masked_fill(outside, 0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target):
        logits_max = vocab_parallel_logits.max(dim=-1)[0]
        _all_reduce(logits_max, torch.distributed.ReduceOp.MAX)
        shifted = vocab_parallel_logits - logits_max.unsqueeze(-1)

        outside, local_target = _target_on_this_rank(target, shifted.size(-1))
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
    """Per-token loss -log softmax(logits)[target], shape of `target`; logits are [..., vocab / tp].

    Without tensor parallelism the whole vocabulary is here: torch's fused log-softmax + NLL (one pass over the
    logits each way instead of the split version's five) gives the same loss and gradient."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        vocab = vocab_parallel_logits.size(-1)
        loss = F.cross_entropy(vocab_parallel_logits.reshape(-1, vocab), target.reshape(-1), reduction="none")
        return loss.view_as(target)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)


# fp32 logits one chunk may hold: small enough to stay in a large cache on CPU, large enough for efficient
# matmuls. The chunk width in vocabulary entries is this over the number of tokens.
CHUNK_LOGITS_BYTES = 16 * 2**20
MIN_CHUNK_VOCAB = 128


def _vocab_chunks(partition_vocab_size: int, num_tokens: int):
    """Slices of the local vocabulary, each with about CHUNK_LOGITS_BYTES of fp32 logits for all the tokens."""
    step = max(MIN_CHUNK_VOCAB, CHUNK_LOGITS_BYTES // (4 * num_tokens))
    return [slice(start, min(start + step, partition_vocab_size)) for start in range(0, partition_vocab_size, step)]


def _target_in_chunk(local_target, outside, chunk: slice):
    """(in_chunk, index): which tokens' targets fall in this vocabulary chunk, and their index in it (0 if not)."""
    in_chunk = (local_target >= chunk.start) & (local_target < chunk.stop) & ~outside
    return in_chunk, (local_target - chunk.start).masked_fill(~in_chunk, 0)


class _LinearVocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss of logits = hidden @ weight.T, walking the vocabulary in chunks with a running maximum and
    sum of exponentials (online softmax); backward recomputes each chunk's logits from the saved log-sum-exp.

    Chunks split the vocabulary rather than the tokens: each chunk's weight gradient is then written once,
    where token chunks would each re-read and re-write the whole weight gradient (2.4x slower at vocab 152k on
    CPU); what is summed over the chunks is the hidden gradient, tokens x hidden, which is small.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, accumulate_into_main_grad):
        # Kept here: a recomputed forward's saved weight comes back as a plain tensor, without main_grad.
        ctx.main_grad = weight.main_grad if accumulate_into_main_grad else None
        tokens = hidden.reshape(-1, hidden.size(-1))
        outside, local_target = _target_on_this_rank(target.reshape(-1), weight.size(0))
        log_sum_exp = torch.full((tokens.size(0),), float("-inf"), dtype=torch.float32, device=hidden.device)
        predicted_logits = torch.zeros_like(log_sum_exp)
        for chunk in _vocab_chunks(weight.size(0), tokens.size(0)):
            logits = F.linear(tokens, weight[chunk]).float()
            in_chunk, index = _target_in_chunk(local_target, outside, chunk)
            predicted_logits += logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill_(~in_chunk, 0.0)
            # torch's logsumexp reads the chunk twice (maximum, then the shifted exponentials) and writes nothing.
            log_sum_exp = torch.logaddexp(log_sum_exp, torch.logsumexp(logits, dim=-1))
        # Across the tensor-parallel ranks: one maximum, each rank's sum of exponentials rescaled to it, then summed.
        global_max = log_sum_exp.clone()
        _all_reduce(global_max, torch.distributed.ReduceOp.MAX)
        sum_exp = (log_sum_exp - global_max).exp_()
        _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM)
        _all_reduce(predicted_logits, torch.distributed.ReduceOp.SUM)
        log_sum_exp = sum_exp.log_().add_(global_max)
        loss = log_sum_exp - predicted_logits
        ctx.save_for_backward(hidden, weight, outside, local_target, log_sum_exp)
        return loss.view_as(target)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, outside, local_target, log_sum_exp = ctx.saved_tensors
        tokens = hidden.reshape(-1, hidden.size(-1))
        # Each token's incoming gradient scales a row of d loss / d logits; it is applied to the token side of both
        # products instead (the hidden gradient's rows after the loop, the tokens before the weight gradient), so
        # the vocabulary-wide chunks are never multiplied by it.
        grad_scale = grad_output.reshape(-1, 1).float()
        scaled_tokens = (tokens * grad_scale).to(tokens.dtype)
        # The hidden gradient is summed over the chunks in fp32 and rounded once, like the unfused one.
        grad_tokens = torch.zeros(tokens.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] and ctx.main_grad is None else None
        for chunk in _vocab_chunks(weight.size(0), tokens.size(0)):
            # d loss / d logits = softmax - one_hot(target), before the incoming gradient of each token's loss.
            grad_logits = F.linear(tokens, weight[chunk]).float().sub_(log_sum_exp.unsqueeze(-1)).exp_()
            in_chunk, index = _target_in_chunk(local_target, outside, chunk)
            grad_logits.scatter_add_(-1, index.unsqueeze(-1), -in_chunk.unsqueeze(-1).float())
            grad_logits = grad_logits.to(weight.dtype)
            if weight.dtype == torch.float32:
                grad_tokens.addmm_(grad_logits, weight[chunk])
            else:
                grad_tokens += grad_logits.mm(weight[chunk])
            if grad_weight is not None:
                torch.mm(grad_logits.t(), scaled_tokens, out=grad_weight[chunk])
            elif ctx.main_grad is not None:
                accumulate_weight_grad(ctx.main_grad[chunk], grad_logits.t(), scaled_tokens)
        # The sum of hidden's gradient over the tensor-parallel ranks is the region mapping's, before this op.
        grad_hidden = grad_tokens.mul_(grad_scale).to(hidden.dtype).view_as(hidden) if ctx.needs_input_grad[0] else None
        return grad_hidden, grad_weight, None, None


def linear_vocab_parallel_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, gradient_accumulation_fusion: bool = False
) -> torch.Tensor:
    """vocab_parallel_cross_entropy(F.linear(hidden, weight).float(), target) without the logits of all tokens:
    hidden [..., h] (already in the output layer's parallel region), weight [vocab / tp, h], target [...].
    `gradient_accumulation_fusion`: the weight gradient goes into `weight.main_grad` where it has one."""
    accumulate = fuses_weight_grad_accumulation(weight, gradient_accumulation_fusion)
    return _LinearVocabParallelCrossEntropy.apply(hidden, weight, target, accumulate)
