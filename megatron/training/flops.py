"""Training FLOPs of the GPT models, for the TFLOP/s and MFU columns of the training log.

Counted as in Megatron-LM (Narayanan et al. 2021, appendix): only matrix multiplications, 2 FLOPs per
multiply-add, backward = 2 x forward; causal attention scores count the non-zero lower triangle (half of
the s x s matrix). Norms, activations, softmax and the loss are not counted.
"""


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
) -> float:
    """Forward-pass FLOPs per token of a dense decoder (GQA, gated MLPs and any head width included)."""
    query_width = num_attention_heads * kv_channels
    key_value_width = num_query_groups * kv_channels
    qkv_projection = 2 * hidden_size * (query_width + 2 * key_value_width)
    output_projection = 2 * query_width * hidden_size
    # Q K^T and (attention probabilities) V over the seq_length / 2 keys a token sees on average.
    attention_scores = 2 * 2 * query_width * seq_length / 2
    mlp = 2 * hidden_size * ffn_hidden_size * (3 if gated_linear_unit else 2)
    per_layer = qkv_projection + output_projection + attention_scores + mlp
    logits = 2 * hidden_size * vocab_size
    return num_layers * per_layer + logits


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
    )
    return 3 * per_token * batch_size * args.seq_length
