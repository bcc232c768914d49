"""The kernel floor of a dense GPT training step: its matrix products, attention and Adam update, each timed alone.

No implementation on these kernels can take a step in less time than the products the model's FLOPs need, the
attention kernel's forward and backward and one optimizer update, run back to back on the same machine. So
step / floor is the share of time that goes to everything else (norms, activations, rotary embedding,
residuals, the loss's exponentials, copies, zeroing, framework overhead), and the MFU a step at the floor would
have is the most any implementation on these kernels could reach. A shared machine's speed drifts within
seconds, so bench/train_bench.py --kernel-floor times the floor, a real step and the matmul peak in turn, round
after round, and reports medians of per-round ratios. The floor excludes the embedding lookup, which is memory
traffic, not arithmetic.

Shapes are one micro batch on one process: the fused QKV, output, FC1 (gate and up) and FC2 products forward,
input-gradient and weight-gradient; the vocabulary head's three products at the fused head's chunk width, not
recomputed; causal scaled-dot-product attention with the key/value heads repeated to the query heads as
DotProductAttention hands them over; torch's fused AdamW over tensors shaped like the model's parameters (fp32,
as the main parameters are). When the fused head is on, its recomputed forward product is timed as well, as a part
outside the floor (HEAD_RECOMPUTATION): floor plus that part is the floor of the algorithm the run uses.
"""

import time

import torch
import torch.nn.functional as F

from device_peak import synchronize_device
from megatron.core.tensor_parallel.cross_entropy import _vocab_chunks

# The part that is not in the floor: the fused vocabulary head's backward recomputes its logits (one more forward
# product per chunk) rather than keep them all.
HEAD_RECOMPUTATION = "head recomputation"


def _seconds(run, device: str) -> float:
    synchronize_device(device)
    start = time.perf_counter()
    run()
    synchronize_device(device)
    return time.perf_counter() - start


def linear_products(tokens: int, in_features: int, out_features: int, dtype, device: str):
    """Forward, input-gradient and weight-gradient products of one bias-free linear layer."""
    inputs = torch.randn(tokens, in_features, dtype=dtype, device=device)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
    grad_output = torch.randn(tokens, out_features, dtype=dtype, device=device)
    return [
        lambda: torch.mm(inputs, weight.t()),
        lambda: torch.mm(grad_output, weight),
        lambda: torch.mm(grad_output.t(), inputs),
    ]


def attention_forward_backward(batch: int, heads: int, seq_length: int, head_dim: int, dtype, device: str):
    """Causal scaled-dot-product attention, forward and backward, on [b, heads, s, d] inputs."""
    query, key, value = (
        torch.randn(batch, heads, seq_length, head_dim, dtype=dtype, device=device, requires_grad=True)
        for _ in range(3)
    )
    grad_output = torch.randn(batch, heads, seq_length, head_dim, dtype=dtype, device=device)
    return lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True).backward(grad_output)


def adam_update(parameter_shapes, device: str):
    """One step of torch's fused AdamW over fp32 tensors of these shapes."""
    parameters = [torch.zeros(shape, device=device, requires_grad=True) for shape in parameter_shapes]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    return torch.optim.AdamW(parameters, lr=1e-4, fused=True).step


class DenseGPTKernelFloor:
    """The floor's kernels for a dense GPT given by the training flags, one process: every micro batch's products
    and attention, one optimizer update, and the fused head's recomputed product where the run recomputes it.
    `time_once` times each kernel once and returns seconds per training step for each part (HEAD_RECOMPUTATION
    is not part of the floor); call it several times, interleaved with what it is compared with, on a drifting
    machine."""

    def __init__(self, args, parameter_shapes):
        dtype, self.device = args.params_dtype, ("cuda" if args.device == "cuda" else "cpu")
        tokens = args.micro_batch_size * args.seq_length
        heads, head_dim = args.num_attention_heads, args.kv_channels
        query_groups = args.num_query_groups or heads
        ffn_out = args.ffn_hidden_size * (2 if args.swiglu else 1)
        layer_shapes = [
            (args.hidden_size, (heads + 2 * query_groups) * head_dim),
            (heads * head_dim, args.hidden_size),
            (args.hidden_size, ffn_out),
            (args.ffn_hidden_size, args.hidden_size),
        ]
        chunks = _vocab_chunks(args.padded_vocab_size, tokens)
        chunk_width = chunks[0].stop - chunks[0].start
        micro_batches = args.global_batch_size // args.micro_batch_size
        head_chunks = micro_batches * args.padded_vocab_size / chunk_width
        head_products = linear_products(tokens, args.hidden_size, chunk_width, dtype, self.device)
        # part -> [(kernel, how many times a training step runs it)]
        self.parts = {
            "matmuls": [
                (product, micro_batches * args.num_layers)
                for shape in layer_shapes
                for product in linear_products(tokens, *shape, dtype, self.device)
            ]
            + [(product, head_chunks) for product in head_products],
            "attention": [
                (
                    attention_forward_backward(args.micro_batch_size, heads, args.seq_length, head_dim, dtype, self.device),
                    micro_batches * args.num_layers,
                )
            ],
            "optimizer": [(adam_update(parameter_shapes, self.device), 1)],
        }
        if args.fused_output_cross_entropy and not args.fp16_lm_cross_entropy:
            self.parts[HEAD_RECOMPUTATION] = [(head_products[0], head_chunks)]
        self.time_once()  # warm-up

    def time_once(self) -> dict:
        return {
            part: sum(count * _seconds(kernel, self.device) for kernel, count in kernels)
            for part, kernels in self.parts.items()
        }


def unsupported_reason(args) -> str:
    """Why the floor cannot be computed for this run ('' when it can)."""
    if args.world_size != 1:
        return "the kernel floor is for one process (no tensor, pipeline or data parallelism)"
    if getattr(args, "num_experts", None) or getattr(args, "multi_latent_attention", False):
        return "the kernel floor covers dense models (no MoE, no multi-latent attention)"
    if getattr(args, "mtp_num_layers", None):
        return "the kernel floor covers models without multi-token prediction"
    return ""
