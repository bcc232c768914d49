"""softmax(Q K^T / sqrt(d)) V through torch.nn.functional.scaled_dot_product_attention, which picks a
flash / memory-efficient kernel where the device has one. Shared by both model stacks."""

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.context_parallel_attention import context_parallel_attention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

_SDPA_BACKENDS = {
    AttnBackend.flash: [SDPBackend.FLASH_ATTENTION],
    AttnBackend.fused: [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION],
    AttnBackend.unfused: [SDPBackend.MATH],
    AttnBackend.local: [SDPBackend.MATH],
}


def attention_kernel_context(backend: AttnBackend):
    """Restrict torch's kernel choice to the requested backend (no restriction for `auto`)."""
    if backend == AttnBackend.auto:
        return contextlib.nullcontext()
    return sdpa_kernel(_SDPA_BACKENDS[backend])


def _bottom_right_causal_mask(query_length: int, key_length: int, device) -> torch.Tensor:
    """True where query i (the last `query_length` positions of `key_length`) may attend to key j."""
    query_positions = torch.arange(key_length - query_length, key_length, device=device).unsqueeze(-1)
    return torch.arange(key_length, device=device).unsqueeze(0) <= query_positions


def _heads_first(tensor: torch.Tensor) -> torch.Tensor:
    """[s, b, n, d] -> [b, n, s, d]; a contiguous copy on the CPU, whose flash kernel takes 10-40% longer
    (forward and backward, 4 x 8 heads x 512 x 64, varying between runs) on the strided view of [s, b, ...]."""
    tensor = tensor.permute(1, 2, 0, 3)
    return tensor.contiguous() if tensor.device.type == "cpu" else tensor


def _is_plain_causal(attention_mask: torch.Tensor) -> bool:
    """Whether a mask (True = masked out) hides exactly the future keys, as the dataset's default mask does:
    then is_causal replaces it, so the kernel skips the masked blocks instead of reading the mask. The answer
    is kept on the mask (until it is modified), so the layers sharing it compare it, and sync a GPU, once;
    masks made under torch.inference_mode have no version counter and are compared each time."""
    remember = not attention_mask.is_inference()
    known = getattr(attention_mask, "_megatron_plain_causal", None) if remember else None
    if known is not None and known[0] == attention_mask._version:
        return known[1]
    query_length, key_length = attention_mask.shape[-2:]
    answer = query_length == key_length and attention_mask.dtype == torch.bool
    if answer:
        future = torch.ones(query_length, key_length, dtype=torch.bool, device=attention_mask.device).triu_(1)
        answer = torch.equal(attention_mask, future.expand(attention_mask.shape))
    if remember:
        attention_mask._megatron_plain_causal = (attention_mask._version, answer)
    return answer


class DotProductAttention(MegatronModule):
    """Attention over per-head queries [sq, b, heads, d] and keys/values [sk, b, groups, d] -> [sq, b, heads*d].

    `attention_mask` (bool, True = masked out, broadcastable to [b, 1, sq, sk]) is used when given (one that hides
    exactly the future keys runs as the kernel's own causal mask); otherwise the mask is causal, aligned so the
    last query sees every key (as when decoding with a cache).

    With context parallelism the inputs hold this rank's load-balanced chunks of the sequence and the
    attention runs over the context-parallel group (`config.cp_comm_type`); the mask is then the causal one
    (training flags that would change it are refused), so `attention_mask` is not read.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        softmax_scale: Optional[float] = None,
    ):
        super().__init__(config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_groups_per_partition = divide(config.num_query_groups, world_size)

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor] = None):
        if parallel_state.get_context_parallel_world_size() > 1:
            return self._context_parallel_forward(query, key, value)
        query_length, key_length = query.size(0), key.size(0)
        query, key, value = (_heads_first(tensor) for tensor in (query, key, value))
        heads_per_group = self.num_heads_per_partition // self.num_groups_per_partition
        if heads_per_group > 1:
            key = key.repeat_interleave(heads_per_group, dim=1)
            value = value.repeat_interleave(heads_per_group, dim=1)

        mask, is_causal = self._mask(attention_mask, query_length, key_length, query.device)
        output_dtype = query.dtype
        query, key, value = self._softmax_precision(query, key, value)

        dropout = self.config.attention_dropout if self.training else 0.0
        # Heads are split over tensor-parallel ranks, so their dropout masks must differ between ranks;
        # with sequence parallelism the whole block already runs inside the tensor-parallel stream.
        use_tracker = dropout > 0.0 and not self.config.sequence_parallel
        with get_cuda_rng_tracker().fork() if use_tracker else contextlib.nullcontext():
            with attention_kernel_context(self.config.attention_backend):
                context = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.softmax_scale
                )
        # [b, n, sq, d] -> [sq, b, n * d]
        context = context.to(output_dtype).permute(2, 0, 1, 3)
        return context.reshape(query_length, context.size(1), -1)

    def _softmax_precision(self, query, key, value):
        """q, k, v in fp32 for an fp32 softmax on the CPU: GPU kernels accumulate in fp32 already, the CPU
        kernels follow the input dtype."""
        if self.config.attention_softmax_in_fp32 and query.device.type == "cpu" and query.dtype != torch.float32:
            return query.float(), key.float(), value.float()
        return query, key, value

    def _context_parallel_forward(self, query, key, value) -> torch.Tensor:
        """Causal attention of this rank's chunks against the whole sequence: [s/cp, b, heads * d_v]."""
        output_dtype = query.dtype
        query, key, value = self._softmax_precision(query, key, value)
        context = context_parallel_attention(
            query,
            key,
            value,
            parallel_state.get_context_parallel_group(),
            self.config.cp_comm_type_of_layer(self.layer_number),
            self.softmax_scale,
        )
        return context.to(output_dtype).flatten(2)

    def _mask(self, attention_mask, query_length: int, key_length: int, device):
        """(boolean keep-mask or None, is_causal) for scaled_dot_product_attention."""
        if attention_mask is not None:
            return (None, True) if _is_plain_causal(attention_mask) else (~attention_mask, False)
        if self.attn_mask_type == AttnMaskType.no_mask or query_length == 1:
            return None, False
        if query_length == key_length:
            return None, True
        return _bottom_right_causal_mask(query_length, key_length, device), False
