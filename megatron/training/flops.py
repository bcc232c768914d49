"""Training FLOPs of the GPT models, for the TFLOP/s and MFU columns of the training log.

Counted as in Megatron-LM (Narayanan et al. 2021, appendix): only matrix multiplications, 2 FLOPs per
multiply-add, backward = 2 x forward; causal attention scores count the non-zero lower triangle (half of
the s x s matrix). Norms, activations, softmax and the loss are not counted.
"""

from typing import Optional

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
    attention_flops: Optional[float] = None,
    mtp_num_layers: int = 0,
    last_layer_is_moe: bool = False,
) -> float:
    """Forward-pass FLOPs per token of a decoder (GQA, gated MLPs and any head width included). In the
    `num_moe_layers` MoE layers a token passes the router and only its active experts: top-k routed plus the
    shared ones, `moe_active_ffn_hidden_size` wide in all. `attention_flops` replaces one layer's attention
    count (multi-latent attention); each of `mtp_num_layers` prediction depths adds its 2h -> h projection, a
    layer of the last decoder layer's kind and the logits."""
    if attention_flops is None:
        query_width = num_attention_heads * kv_channels
        key_value_width = num_query_groups * kv_channels
        qkv_projection = 2 * hidden_size * (query_width + 2 * key_value_width)
        output_projection = 2 * query_width * hidden_size
        # Q K^T and (attention probabilities) V over the seq_length / 2 keys a token sees on average.
        attention_scores = 2 * 2 * query_width * seq_length / 2
        attention_flops = qkv_projection + output_projection + attention_scores
    projections = 3 if gated_linear_unit else 2
    mlp = 2 * hidden_size * ffn_hidden_size * projections
    moe = 2 * hidden_size * (moe_active_ffn_hidden_size * projections + num_experts)
    logits = 2 * hidden_size * vocab_size
    decoder = num_layers * attention_flops + (num_layers - num_moe_layers) * mlp + num_moe_layers * moe
    depth = 2 * 2 * hidden_size * hidden_size + attention_flops + (moe if last_layer_is_moe else mlp) + logits
    return decoder + logits + mtp_num_layers * depth


def mla_attention_flops_per_token(
    hidden_size: int,
    num_attention_heads: int,
    q_lora_rank: Optional[int],
    kv_lora_rank: int,
    qk_head_dim: int,
    qk_pos_emb_head_dim: int,
    v_head_dim: int,
    seq_length: int,
) -> float:
    """One multi-latent attention layer's forward FLOPs per token: the down- and up-projections of queries and
    keys/values (from the latents), scores over qk_head_dim + qk_pos_emb_head_dim channels and values of
    v_head_dim over seq_length / 2 keys on average, and the output projection."""
    query_width = num_attention_heads * (qk_head_dim + qk_pos_emb_head_dim)
    if q_lora_rank is None:
        query = 2 * hidden_size * query_width
    else:
        query = 2 * hidden_size * q_lora_rank + 2 * q_lora_rank * query_width
    key_value = 2 * hidden_size * (kv_lora_rank + qk_pos_emb_head_dim)
    key_value += 2 * kv_lora_rank * num_attention_heads * (qk_head_dim + v_head_dim)
    scores = 2 * (query_width + num_attention_heads * v_head_dim) * seq_length / 2
    output = 2 * num_attention_heads * v_head_dim * hidden_size
    return query + key_value + scores + output


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
        **_deepseek_flops_args(args),
    )
    return 3 * per_token * batch_size * args.seq_length


def _deepseek_flops_args(args) -> dict:
    """The multi-latent attention and multi-token prediction terms of forward_flops_per_token from the flags."""
    flops = {}
    if getattr(args, "multi_latent_attention", False):
        flops["attention_flops"] = mla_attention_flops_per_token(
            args.hidden_size, args.num_attention_heads, args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim,
            args.qk_pos_emb_head_dim, args.v_head_dim, args.seq_length,
        )
    if getattr(args, "mtp_num_layers", None):
        flops["mtp_num_layers"] = args.mtp_num_layers
        flops["last_layer_is_moe"] = bool(_moe_flops_args(args)) and moe_layer_pattern(args.moe_layer_freq, args.num_layers)[-1]
    return flops


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
