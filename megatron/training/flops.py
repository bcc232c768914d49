"""Training FLOPs of the GPT models, for the TFLOP/s and MFU columns of the training log.

Counted as in Megatron-LM (Narayanan et al. 2021, appendix): only matrix multiplications, 2 FLOPs per
multiply-add, backward = 2 x forward; causal attention scores count the non-zero lower triangle (half of
the s x s matrix). Norms, activations, softmax and the loss are not counted.
"""

from megatron.core.models.gpt.moe_module_specs import moe_layer_pattern


def forward_flops_per_token(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    ffn_hidden_size: int,
    gated_linear_unit: bool,
    vocab_size: int,
    seq_length: int,
    num_moe_layers: int = 0,
    moe_active_ffn_hidden_size: int = 0,
    num_experts: int = 0,
) -> float:
    """Forward-pass FLOPs per token of a decoder (GQA, gated MLPs and any head width included). In the
    `num_moe_layers` MoE layers a token passes the router and only its active experts: top-k routed plus the
    shared ones, `moe_active_ffn_hidden_size` wide in all."""
    query_width = num_attention_heads * kv_channels
    key_value_width = num_query_groups * kv_channels
    qkv_projection = 2 * hidden_size * (query_width + 2 * key_value_width)
    output_projection = 2 * query_width * hidden_size
    # Q K^T and (attention probabilities) V over the seq_length / 2 keys a token sees on average.
    attention_scores = 2 * 2 * query_width * seq_length / 2
    projections = 3 if gated_linear_unit else 2
    mlp = 2 * hidden_size * ffn_hidden_size * projections
    moe = 2 * hidden_size * (moe_active_ffn_hidden_size * projections + num_experts)
    attention = qkv_projection + output_projection + attention_scores
    logits = 2 * hidden_size * vocab_size
    return num_layers * attention + (num_layers - num_moe_layers) * mlp + num_moe_layers * moe + logits


def num_floating_point_operations(args, batch_size: int) -> float:
    """Training FLOPs (forward + backward) of one batch of `batch_size` sequences of --seq-length tokens."""
    per_token = forward_flops_per_token(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        ffn_hidden_size=args.ffn_hidden_size,
        gated_linear_unit=args.swiglu,
        vocab_size=args.padded_vocab_size,
        seq_length=args.seq_length,
        **_moe_flops_args(args),
    )
    return 3 * per_token * batch_size * args.seq_length


def _moe_flops_args(args) -> dict:
    """The MoE terms of forward_flops_per_token from the flags (none for a dense model)."""
    if getattr(args, "num_experts", None) is None:
        return {}
    expert_width = args.moe_ffn_hidden_size or args.ffn_hidden_size
    return dict(
        num_moe_layers=sum(moe_layer_pattern(args.moe_layer_freq, args.num_layers)),
        moe_active_ffn_hidden_size=args.moe_router_topk * expert_width + (args.moe_shared_expert_intermediate_size or 0),
        num_experts=args.num_experts,
    )
