"""From parsed flags to a model: the model-flag checks and the one place that builds a TransformerConfig."""

import dataclasses
import importlib.util

import torch
import torch.nn.functional as F

from megatron.core.model_parallel_config import ConfigError
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import ArgumentsError


class ModelArgumentsError(ArgumentsError):
    """Model flags that contradict each other; the message names the flags and the fix."""


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelArgumentsError(message)


def _swiglu_ffn_hidden_size(hidden_size: int) -> int:
    """Megatron-LM's SwiGLU width: 2/3 of 4h (two input projections keep the parameter count), rounded
    down to a multiple of 64."""
    return int((4 * hidden_size * 2 / 3) / 64) * 64


def _check_stack(args) -> None:
    _require(
        not (args.use_legacy_models and args.use_mcore_models),
        "--use-legacy-models and --use-mcore-models are mutually exclusive; choose one stack",
    )
    if args.transformer_impl == "transformer_engine":
        _require(
            transformer_engine_available(),
            "--transformer-impl transformer_engine needs the transformer_engine package, which is not installed; "
            "install it or use --transformer-impl local",
        )
        _require(
            False,
            "--transformer-impl transformer_engine: this project has no Transformer Engine layer spec yet; use "
            "--transformer-impl local (the same model on torch kernels; checkpoints convert either way)",
        )
    if args.transformer_impl is None:
        args.transformer_impl = "local"
    if args.use_flash_attn and getattr(args, "device", None) == "cpu":
        _require(
            args.attention_dropout == 0.0,
            "--use-flash-attn on the CPU has no kernel with attention dropout; set --attention-dropout 0",
        )


def _check_sizes(args) -> None:
    for flag, value in (
        ("--num-layers", args.num_layers),
        ("--hidden-size", args.hidden_size),
        ("--num-attention-heads", args.num_attention_heads),
    ):
        _require(value is not None and value > 0, f"{flag} is required and must be positive")
    heads = args.num_attention_heads
    if args.group_query_attention:
        groups = args.num_query_groups
        _require(
            groups > 0 and heads % groups == 0,
            f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; every key/value "
            "group must serve the same number of heads",
        )
    else:
        args.num_query_groups = heads
    if args.kv_channels is None:
        _require(
            args.hidden_size % heads == 0,
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}; choose sizes "
            "that divide or give the head width with --kv-channels",
        )
        args.kv_channels = args.hidden_size // heads
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = _swiglu_ffn_hidden_size(args.hidden_size) if args.swiglu else 4 * args.hidden_size
    _require(args.ffn_hidden_size > 0, f"--ffn-hidden-size must be positive, got {args.ffn_hidden_size}")


def _check_positions(args) -> None:
    seq_length = getattr(args, "seq_length", None)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = seq_length
    if args.position_embedding_type == "learned_absolute":
        _require(
            args.max_position_embeddings is not None,
            "learned absolute position embeddings need --max-position-embeddings (or --seq-length)",
        )
        _require(
            seq_length is None or seq_length <= args.max_position_embeddings,
            f"--seq-length {seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}, "
            "which learned position embeddings cannot cover",
        )
    _require(0.0 < args.rotary_percent <= 1.0, f"--rotary-percent must lie in (0, 1], got {args.rotary_percent}")
    _require(
        not args.use_rope_scaling or args.position_embedding_type == "rope",
        "--use-rope-scaling scales rotary embeddings and needs --position-embedding-type rope",
    )


def _check_regularization(args) -> None:
    for flag, value in (("--hidden-dropout", args.hidden_dropout), ("--attention-dropout", args.attention_dropout)):
        _require(0.0 <= value < 1.0, f"{flag} must lie in [0, 1), got {value}")
    _require(args.init_method_std > 0, f"--init-method-std must be positive, got {args.init_method_std}")
    _require(args.norm_epsilon > 0, f"--norm-epsilon must be positive, got {args.norm_epsilon}")
    if not args.add_bias_linear:
        # Megatron-LM: the fused bias-GeLU needs a bias; without biases GeLU is the exact one.
        args.bias_gelu_fusion = False


def validate_model_args(args) -> None:
    """Complete and check the model flags in place (called from arguments.validate_args)."""
    _check_stack(args)
    _check_sizes(args)
    _check_positions(args)
    _check_regularization(args)
    try:
        core_transformer_config_from_args(args)
    except ConfigError as error:
        raise ModelArgumentsError(str(error)) from None


def _attention_backend(args) -> AttnBackend:
    return AttnBackend.flash if args.use_flash_attn else AttnBackend.auto


def core_transformer_config_from_args(args, config_class=TransformerConfig) -> TransformerConfig:
    """The TransformerConfig the parsed (and validated) flags describe; the only place flags become one."""
    kwargs = {}
    for field in dataclasses.fields(config_class):
        if hasattr(args, field.name):
            kwargs[field.name] = getattr(args, field.name)
    kwargs["layernorm_epsilon"] = args.norm_epsilon
    kwargs["params_dtype"] = getattr(args, "params_dtype", torch.float32)
    kwargs["fp16"] = bool(getattr(args, "fp16", False))
    kwargs["bf16"] = bool(getattr(args, "bf16", False))
    kwargs["use_cpu_initialization"] = bool(args.use_cpu_initialization)
    kwargs["sequence_parallel"] = bool(getattr(args, "sequence_parallel", False))
    kwargs["virtual_pipeline_model_parallel_size"] = getattr(args, "virtual_pipeline_model_parallel_size", None)
    kwargs["num_layers_in_first_pipeline_stage"] = getattr(args, "decoder_first_pipeline_num_layers", None)
    kwargs["num_layers_in_last_pipeline_stage"] = getattr(args, "decoder_last_pipeline_num_layers", None)
    kwargs["attention_backend"] = _attention_backend(args)
    kwargs["num_moe_experts"] = getattr(args, "num_experts", None)
    if args.swiglu:
        kwargs["activation_func"] = F.silu
        kwargs["gated_linear_unit"] = True
        kwargs["bias_activation_fusion"] = False
    else:
        kwargs["bias_activation_fusion"] = bool(args.bias_gelu_fusion)
    return config_class(**kwargs)
