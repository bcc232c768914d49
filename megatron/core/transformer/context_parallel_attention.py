"""Causal attention over a sequence split across a context-parallel (CP) group, in plain PyTorch so that it runs
on gloo/CPU as on NCCL/GPU (Megatron-LM's CP needs Transformer Engine).

Megatron's load-balanced layout: the sequence is cut into 2 x CP chunks and CP rank r holds chunks r and
2CP-1-r, concatenated, which gives every rank the same share of causal work. Three algorithms
(`--cp-comm-type`):

- `all_gather`: keys/values are all-gathered (their gradients reduce-scattered back) and each local query chunk
  attends to the keys before it, in the ring's blocks and query tiles (no [s/CP, s] score matrix is kept);
- `p2p` (ring): key/value blocks travel around the ring while the block in hand is attended to; partial results
  merge by their log-sum-exp, fully masked blocks are skipped, and the backward sends dK/dV around the ring;
- `a2a` (Ulysses): an all-to-all trades the sequence split for a head split, every rank attends over the whole
  sequence with its share of the heads, and a second all-to-all trades back (heads must divide by CP; key/value
  heads too few to split are copied per query head).
"""

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_utils import all_to_all

CP_COMM_TYPES = ("p2p", "all_gather", "a2a")
# Query rows per tile of the block attention (ring and all_gather): bounds its fp32 scores to QUERY_TILE x keys
# per head.
QUERY_TILE = 1024
_KEY_VALUE_TAG = 0
_GRADIENT_TAG = 1


def load_balanced_indices(seq_length: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions held by `cp_rank`, in local order: chunk r then chunk 2CP-1-r of 2CP equal chunks."""
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context-parallel size {2 * cp_size}: "
            "choose a sequence length that is a multiple of it"
        )
    chunk = seq_length // (2 * cp_size)
    starts = (cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(start, start + chunk, device=device) for start in starts])


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cp_group,
    comm_type: str = "p2p",
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of this rank's load-balanced chunks against the whole sequence.

    query [s/CP, b, heads, d_qk], key [s/CP, b, groups, d_qk], value [s/CP, b, groups, d_v] (groups divides heads;
    d_v may differ from d_qk) -> context [s/CP, b, heads, d_v] in the same local order. `softmax_scale` defaults
    to 1/sqrt(d_qk).
    """
    if comm_type not in CP_COMM_TYPES:
        raise ValueError(f"unknown context-parallel comm type {comm_type!r}: choose one of {', '.join(CP_COMM_TYPES)}")
    if query.size(0) % 2:
        raise ValueError(f"a context-parallel rank holds two equal chunks, but got {query.size(0)} tokens")
    if query.size(2) % key.size(2):
        raise ValueError(f"{query.size(2)} query heads cannot share {key.size(2)} key/value heads evenly")
    scale = query.size(-1) ** -0.5 if softmax_scale is None else softmax_scale
    if dist.get_world_size(cp_group) == 1:
        return _causal_attention(query, key, value, scale)
    if comm_type == "all_gather":
        return _all_gather_attention(query, key, value, cp_group, scale)
    if comm_type == "a2a":
        return _all_to_all_attention(query, key, value, cp_group, scale)
    context = _RingAttention.apply(*_to_block_layout(query, key, value), cp_group, scale)
    return context.flatten(1, 2).permute(2, 0, 1, 3)


def _all_gather_attention(query, key, value, group, scale: float) -> torch.Tensor:
    """Gather keys/values in global order (their gradients reduce-scattered back), then attend with each local
    chunk to the keys up to its end, block by block like the ring (scores bounded to query tiles)."""
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    key_value = gather_from_sequence_parallel_region(torch.cat((key, value), dim=-1), True, group)
    key_value = _rank_major_to_global(key_value, cp_size)
    key_all, value_all = key_value.split((key.size(-1), value.size(-1)), dim=-1)
    query_blocks, key_blocks, value_blocks = _to_block_layout(query, key_all, value_all)
    context = _GatheredAttention.apply(query_blocks, key_blocks, value_blocks, cp_rank, scale)
    return context.flatten(1, 2).permute(2, 0, 1, 3)


def _to_block_layout(query, key, value):
    """[s, b, n, d] -> query [b, groups, heads per group, s, d], key/value [b, groups, 1, s, d]: the layout of
    the block attention."""
    query = query.permute(1, 2, 0, 3).unflatten(1, (key.size(2), -1))
    key, value = (tensor.permute(1, 2, 0, 3).unsqueeze(2) for tensor in (key, value))
    return query, key, value


def _gathered_blocks(cp_rank: int, cp_size: int, chunk: int):
    """(local query rows, global key rows, causal) of the blocks a rank's two chunks see among the gathered
    keys: each chunk's own keys (causal, first: it covers every row of the chunk), then all keys before it."""
    for local_start, chunk_index in ((0, cp_rank), (chunk, 2 * cp_size - 1 - cp_rank)):
        rows = slice(local_start, local_start + chunk)
        yield rows, slice(chunk_index * chunk, (chunk_index + 1) * chunk), True
        if chunk_index:
            yield rows, slice(0, chunk_index * chunk), False


def _all_to_all_attention(query, key, value, group, scale: float) -> torch.Tensor:
    """Ulysses: each rank attends over the whole sequence with 1/CP of the heads."""
    cp_size = dist.get_world_size(group)
    if query.size(2) % cp_size:
        raise ValueError(
            f"a2a context parallelism splits heads: {query.size(2)} heads are not divisible by CP={cp_size}"
        )
    if key.size(2) % cp_size:  # too few key/value heads to split: give every query head its own copy
        key, value = (tensor.repeat_interleave(query.size(2) // key.size(2), dim=2) for tensor in (key, value))
    # [s/CP, b, n, d] -> [s, b, n/CP, d] in global order
    query, key, value = (
        _rank_major_to_global(_heads_to_sequence(tensor, group), cp_size) for tensor in (query, key, value)
    )
    context = _causal_attention(query, key, value, scale)
    return _sequence_to_heads(_global_to_rank_major(context, cp_size), group)


def _causal_attention(query, key, value, scale: float) -> torch.Tensor:
    """Causal SDPA over a whole sequence in global order, [s, b, n, d] in and out."""
    query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))
    context = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.size(1) != key.size(1)
    )
    return context.permute(2, 0, 1, 3)


def _heads_to_sequence(tensor, group) -> torch.Tensor:
    """[s/CP, b, n, d] -> [s (rank-major), b, n/CP, d]: rank j receives everyone's tokens of head part j."""
    cp_size = dist.get_world_size(group)
    by_destination = tensor.unflatten(2, (cp_size, -1)).permute(2, 0, 1, 3, 4)
    return all_to_all(group, by_destination.flatten(0, 1), [tensor.size(0)] * cp_size, [tensor.size(0)] * cp_size)


def _sequence_to_heads(tensor, group) -> torch.Tensor:
    """Inverse of _heads_to_sequence: [s (rank-major), b, n/CP, d] -> [s/CP, b, n, d]."""
    cp_size = dist.get_world_size(group)
    local_length = tensor.size(0) // cp_size
    heads = all_to_all(group, tensor, [local_length] * cp_size, [local_length] * cp_size)
    return heads.unflatten(0, (cp_size, local_length)).permute(1, 2, 0, 3, 4).flatten(2, 3)


def _rank_major_to_global(tensor, cp_size: int) -> torch.Tensor:
    """Rows [rank, (chunk r, chunk 2CP-1-r)] -> global order: first chunks by rank, then second ones reversed."""
    by_rank = tensor.unflatten(0, (cp_size, 2, -1))
    return torch.cat((by_rank[:, 0], by_rank.flip(0)[:, 1])).flatten(0, 1)


def _global_to_rank_major(tensor, cp_size: int) -> torch.Tensor:
    """Inverse of _rank_major_to_global."""
    halves = tensor.unflatten(0, (2, cp_size, -1))
    return torch.stack((halves[0], halves[1].flip(0)), dim=1).flatten(0, 2)


class _Ring:
    """Asynchronous shifts around the CP group: send to the next rank, receive from the previous one."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.previous_rank = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensor: torch.Tensor, tag: int) -> Callable[[], torch.Tensor]:
        """Start sending `tensor` on; the returned function waits and gives the previous rank's tensor."""
        received = torch.empty_like(tensor)
        requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, tensor, self.next_rank, self.group, tag),
                dist.P2POp(dist.irecv, received, self.previous_rank, self.group, tag),
            ]
        )

        def wait() -> torch.Tensor:
            for request in requests:
                request.wait()
            return received

        return wait


def _visible_block(source_rank: int, cp_rank: int, chunk: int) -> Tuple[slice, slice, bool]:
    """(local query rows, source key rows, causal) of the block of the source rank's keys that this rank's
    queries see. Own keys: causal over the local pair. Lower source: its first chunk precedes both local chunks.
    Higher source: both its chunks precede only the second local chunk. Every other pair is fully masked."""
    if source_rank == cp_rank:
        return slice(None), slice(None), True
    if source_rank < cp_rank:
        return slice(None), slice(0, chunk), False
    return slice(chunk, None), slice(None), False


def _packed(*tensors: torch.Tensor, dtype=None) -> torch.Tensor:
    """One flat buffer holding the tensors, so that one message carries them."""
    return torch.cat([tensor.reshape(-1).to(dtype or tensor.dtype) for tensor in tensors])


def _unpacked(buffer: torch.Tensor, *shapes) -> Tuple[torch.Tensor, ...]:
    """Views of `buffer` with the packed tensors' shapes."""
    sizes = [torch.Size(shape).numel() for shape in shapes]
    return tuple(part.view(shape) for part, shape in zip(buffer.split(sizes), shapes))


def _query_tiles(query_length: int, causal: bool):
    """(query rows, key rows, causal offset or None) of each tile of at most QUERY_TILE rows. A causal block is
    square: a tile sees the keys up to its last row, the ones past its first row masked by the offset."""
    for start in range(0, query_length, QUERY_TILE):
        stop = min(start + QUERY_TILE, query_length)
        yield slice(start, stop), slice(0, stop) if causal else slice(None), start if causal else None


def _tile_scores(query, key, scale: float, causal_offset: Optional[int]) -> torch.Tensor:
    """Fresh fp32 attention scores of a tile, -inf where query row i + causal_offset precedes the key;
    query [..., hpg, sq, d], key [..., 1, sk, d]."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if causal_offset is not None:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(causal_offset + 1)
        scores.masked_fill_(future, float("-inf"))
    return scores


def _block_attention(query, key, value, scale: float, causal: bool):
    """(fp32 output, fp32 log-sum-exp) of one block, tile by tile; the softmax runs in place on the scores."""
    outputs, lses = [], []
    for rows, keys, causal_offset in _query_tiles(query.size(-2), causal):
        probabilities = _tile_scores(query[..., rows, :], key[..., keys, :], scale, causal_offset)
        row_max = probabilities.amax(dim=-1, keepdim=True)
        row_sum = probabilities.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
        probabilities.div_(row_sum)
        lses.append((row_sum.log_() + row_max).squeeze(-1))
        outputs.append(torch.matmul(probabilities.to(value.dtype), value[..., keys, :]).float())
    return torch.cat(outputs, dim=-2), torch.cat(lses, dim=-1)


def _add_block_gradients(block, query, key, value, grad_output, lse, delta, scale: float, grads) -> None:
    """Add the (dq, dk, dv) of one block (query rows, key rows, causal) into the fp32 `grads` (shaped like query,
    key, value), tile by tile, the probabilities recomputed from the rows' final log-sum-exp; `delta` is the row
    sum of grad_output x output (the softmax's backward term)."""
    block_rows, block_keys, causal = block
    query, grad_output = query[..., block_rows, :], grad_output[..., block_rows, :]
    lse, delta = lse[..., block_rows], delta[..., block_rows]
    key, value = key[..., block_keys, :], value[..., block_keys, :]
    grad_query = grads[0][..., block_rows, :]
    grad_key, grad_value = grads[1][..., block_keys, :], grads[2][..., block_keys, :]
    for rows, keys, causal_offset in _query_tiles(query.size(-2), causal):
        tile_query, tile_key, tile_value = query[..., rows, :], key[..., keys, :], value[..., keys, :]
        tile_grad_output = grad_output[..., rows, :]
        probabilities = _tile_scores(tile_query, tile_key, scale, causal_offset)
        probabilities.sub_(lse[..., rows].unsqueeze(-1)).exp_()
        grad_value[..., keys, :] += torch.matmul(
            probabilities.to(tile_grad_output.dtype).transpose(-1, -2), tile_grad_output
        ).sum(2, keepdim=True)
        grad_scores = torch.matmul(tile_grad_output, tile_value.transpose(-1, -2)).float()
        grad_scores = grad_scores.sub_(delta[..., rows].unsqueeze(-1)).mul_(probabilities).mul_(scale)
        grad_scores = grad_scores.to(query.dtype)
        grad_query[..., rows, :] += torch.matmul(grad_scores, tile_key)
        grad_key[..., keys, :] += torch.matmul(grad_scores.transpose(-1, -2), tile_query).sum(2, keepdim=True)


def _ring_blocks(ring: _Ring, key, value):
    """For each step of one turn: (step, (local query rows, source key rows, causal), source keys, source values).
    The next source's keys/values are on their way while the caller works on the block in hand."""
    chunk = key.size(-2) // 2
    key_value = _packed(key, value)
    for step in range(ring.size):
        if step + 1 < ring.size:
            receive_key_value = ring.shift(key_value, _KEY_VALUE_TAG)
        block_key, block_value = _unpacked(key_value, key.shape, value.shape)
        rows, keys, causal = _visible_block((ring.rank - step) % ring.size, ring.rank, chunk)
        yield step, (rows, keys, causal), block_key, block_value
        if step + 1 < ring.size:
            key_value = receive_key_value()


class _RingAttention(torch.autograd.Function):
    """Ring attention on query [b, groups, heads per group, s/CP, d_qk], key/value [b, groups, 1, s/CP, d]."""

    @staticmethod
    def forward(ctx, query, key, value, group, scale):
        for step, (rows, keys, causal), block_key, block_value in _ring_blocks(_Ring(group), key, value):
            block_output, block_lse = _block_attention(
                query[..., rows, :], block_key[..., keys, :], block_value[..., keys, :], scale, causal
            )
            if step == 0:  # the own block covers every local query
                output, lse = block_output, block_lse
            else:
                _merge(output[..., rows, :], lse[..., rows], block_output, block_lse)
        output = output.to(query.dtype)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.group, ctx.scale = group, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        ring, scale = _Ring(ctx.group), ctx.scale
        grad_output = grad_output.contiguous()
        delta = (grad_output.float() * output.float()).sum(-1)
        grad_query = torch.zeros_like(query, dtype=torch.float32)
        for step, block, block_key, block_value in _ring_blocks(ring, key, value):
            # The held block's dK/dV travel with it: add this rank's share to what the ranks before added.
            grad_key_value = torch.zeros(key.numel() + value.numel(), dtype=torch.float32, device=key.device)
            grads = (grad_query, *_unpacked(grad_key_value, key.shape, value.shape))
            _add_block_gradients(block, query, block_key, block_value, grad_output, lse, delta, scale, grads)
            if step > 0:
                grad_key_value += receive_grad_key_value()
            receive_grad_key_value = ring.shift(grad_key_value, _GRADIENT_TAG)
        # After a full turn each block's gradient is back on the rank that owns it.
        grad_key, grad_value = _unpacked(receive_grad_key_value(), key.shape, value.shape)
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


class _GatheredAttention(torch.autograd.Function):
    """Attention of a rank's chunks (query [b, groups, heads per group, s/CP, d_qk]) over the gathered keys and
    values ([b, groups, 1, s, d], global order), block by block; the backward recomputes each block's tiles."""

    @staticmethod
    def forward(ctx, query, key, value, cp_rank, scale):
        chunk = query.size(-2) // 2
        blocks = list(_gathered_blocks(cp_rank, key.size(-2) // query.size(-2), chunk))
        output = query.new_empty(*query.shape[:-1], value.size(-1), dtype=torch.float32)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        for rows, keys, causal in blocks:
            block_output, block_lse = _block_attention(
                query[..., rows, :], key[..., keys, :], value[..., keys, :], scale, causal
            )
            if causal:  # a chunk's own block comes first
                output[..., rows, :], lse[..., rows] = block_output, block_lse
            else:
                _merge(output[..., rows, :], lse[..., rows], block_output, block_lse)
        output = output.to(query.dtype)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        delta = (grad_output.float() * output.float()).sum(-1)
        grads = [torch.zeros_like(tensor, dtype=torch.float32) for tensor in (query, key, value)]
        for block in ctx.blocks:
            _add_block_gradients(block, query, key, value, grad_output, lse, delta, ctx.scale, grads)
        return *(grad.to(tensor.dtype) for grad, tensor in zip(grads, (query, key, value))), None, None


def _merge(output, lse, block_output, block_lse) -> None:
    """Fold one block's (output, log-sum-exp) into the running pair, in place."""
    output.sub_(torch.sigmoid(block_lse - lse).unsqueeze(-1) * (output - block_output))
    lse.sub_(F.logsigmoid(lse - block_lse))
