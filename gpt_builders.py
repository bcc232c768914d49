"""Build this rank's GPT model from parsed flags: the legacy stack with --use-legacy-models, else mcore.

pretrain_gpt.py's model_provider calls gpt_builder; the checkpoint and generation tools call it directly.
"""

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.gpt.mla_module_specs import get_gpt_mla_layer_local_spec
from megatron.core.models.gpt.moe_module_specs import get_moe_or_dense_mlp_spec
from megatron.core.transformer.spec_utils import import_module
from megatron.legacy.model import GPTModel as LegacyGPTModel
from megatron.training.arguments import ModelArgumentsError
from megatron.training.model_config import core_transformer_config_from_args
from megatron.training.yaml_arguments import core_transformer_config_from_yaml


def gpt_model_kwargs(args) -> dict:
    """The constructor keywords both stacks share, from the flags."""
    padded_vocab_size = getattr(args, "padded_vocab_size", None)
    if padded_vocab_size is None:
        raise ModelArgumentsError(
            "the model's vocabulary size is unknown: build the tokenizer first (--tokenizer-type ...), which sets "
            "args.padded_vocab_size"
        )
    return dict(
        vocab_size=padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        rope_scaling_low_freq_factor=args.rope_scaling_low_freq_factor,
        rope_scaling_high_freq_factor=args.rope_scaling_high_freq_factor,
        rope_scaling_original_max_position_embeddings=args.rope_scaling_original_max_position_embeddings,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
    )


def transformer_layer_spec_from_args(args):
    """The layer spec: --spec's, else Transformer Engine's (--transformer-impl transformer_engine), else local
    (with multi-latent attention under --multi-latent-attention)."""
    if getattr(args, "spec", None) is not None:
        return import_module(args.spec)
    num_experts, moe_grouped_gemm = getattr(args, "num_experts", None), getattr(args, "moe_grouped_gemm", False)
    if getattr(args, "transformer_impl", "local") == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts, moe_grouped_gemm, args.qk_layernorm, getattr(args, "fp8", None)
        )
    if getattr(args, "multi_latent_attention", False):
        mlp = None if num_experts is None else get_moe_or_dense_mlp_spec(num_experts, moe_grouped_gemm)
        return get_gpt_mla_layer_local_spec(args.qk_layernorm, mlp=mlp)
    return get_gpt_layer_local_spec(num_experts, moe_grouped_gemm, args.qk_layernorm)


def gpt_builder(args, pre_process: bool = True, post_process: bool = True, vp_stage=None, config=None):
    """The model chunk for this rank (`pre_process`: holds the embedding, `post_process`: the output layer)."""
    if config is None and getattr(args, "yaml_cfg", None) is not None:
        config = core_transformer_config_from_yaml(args, "language_model")
    if config is None:
        config = core_transformer_config_from_args(args)
    kwargs = gpt_model_kwargs(args)
    if args.use_legacy_models:
        return LegacyGPTModel(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, **kwargs)
    spec = transformer_layer_spec_from_args(args)
    return GPTModel(config, spec, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, **kwargs)
