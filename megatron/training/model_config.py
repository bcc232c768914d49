"""The one module where parsed flags become core's config objects: the TransformerConfig of the model, the
OptimizerConfig, the DistributedDataParallelConfig and the GPTDatasetConfig. Each config validates itself and
derives its own defaults; the flag-only rules live beside their flags in arguments.py."""

import dataclasses
import json
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.utils import Blend, DatasetError, Split, get_blend_from_list
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig


def core_transformer_config_from_args(args, config_class=TransformerConfig) -> TransformerConfig:
    """The TransformerConfig the parsed flags describe: every config field whose flag has the same name, plus
    the few flags named differently. Without --group-query-attention the config gives one group per head;
    --multi-latent-attention makes it an MLATransformerConfig (MLA's RoPE is YaRN unless --rope-type says)."""
    if getattr(args, "multi_latent_attention", False) and config_class is TransformerConfig:
        config_class = MLATransformerConfig
    kwargs = {field.name: getattr(args, field.name) for field in dataclasses.fields(config_class) if hasattr(args, field.name)}
    if kwargs.get("rope_type", "") is None:
        del kwargs["rope_type"]
    if not getattr(args, "group_query_attention", True):
        kwargs["num_query_groups"] = None
    kwargs["layernorm_epsilon"] = args.norm_epsilon
    kwargs["params_dtype"] = getattr(args, "params_dtype", torch.float32)
    kwargs["fp16"] = bool(getattr(args, "fp16", False))
    kwargs["bf16"] = bool(getattr(args, "bf16", False))
    kwargs["use_cpu_initialization"] = bool(args.use_cpu_initialization)
    kwargs["sequence_parallel"] = bool(getattr(args, "sequence_parallel", False))
    kwargs["virtual_pipeline_model_parallel_size"] = getattr(args, "virtual_pipeline_model_parallel_size", None)
    kwargs["num_layers_in_first_pipeline_stage"] = getattr(args, "decoder_first_pipeline_num_layers", None)
    kwargs["num_layers_in_last_pipeline_stage"] = getattr(args, "decoder_last_pipeline_num_layers", None)
    kwargs["attention_backend"] = AttnBackend.flash if args.use_flash_attn else AttnBackend.auto
    kwargs["num_moe_experts"] = getattr(args, "num_experts", None)
    if args.swiglu:
        kwargs["activation_func"] = F.silu
        kwargs["gated_linear_unit"] = True
        kwargs["bias_activation_fusion"] = bool(getattr(args, "bias_swiglu_fusion", True))  # not in older saved args
    else:
        kwargs["bias_activation_fusion"] = bool(args.bias_gelu_fusion)
    return config_class(**kwargs)


def optimizer_config_from_args(args) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=args.params_dtype,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )


def ddp_config_from_args(args) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size,
    )


def core_gpt_dataset_config_from_args(args, tokenizer) -> GPTDatasetConfig:
    """The GPTDatasetConfig of the data flags (the blend read from --data-path or the per-split paths)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split if blend is not None or blend_per_split is None else None,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        renormalize_blend_weights=args.renormalize_blend_weights,
        shared_storage=not args.no_shared_storage,
        vocab_size=getattr(args, "padded_vocab_size", None),
    )


def _tokens(values: Optional[List[str]]) -> Optional[List[str]]:
    """Flag values split at whitespace, so a quoted "0.3 A 0.7 B" reads like the unquoted tokens."""
    if values is None:
        return None
    return [token for value in values for token in value.split()]


def _read(path: str, flag: str) -> str:
    try:
        with open(path) as stream:
            return stream.read()
    except OSError as error:
        raise DatasetError(f"{flag} {path}: cannot read the file ({error.strerror})") from None


def get_blend_and_blend_per_split(args) -> Tuple[Optional[Blend], Optional[List[Optional[Blend]]]]:
    """(blend shared by the splits, per-split blends) from --data-path / --data-args-path or the per-split flags."""
    if args.data_path is not None:
        return get_blend_from_list(_tokens(args.data_path), "--data-path"), None
    if args.data_args_path is not None:
        tokens = _read(args.data_args_path, "--data-args-path").split()
        return get_blend_from_list(tokens, f"--data-args-path {args.data_args_path}"), None
    if args.per_split_data_args_path is not None:
        path = args.per_split_data_args_path
        try:
            per_split = json.loads(_read(path, "--per-split-data-args-path"))
        except json.JSONDecodeError as error:
            raise DatasetError(f"--per-split-data-args-path {path} is not valid JSON: {error}") from None
        if not isinstance(per_split, dict) or not set(per_split) <= {split.name for split in Split}:
            raise DatasetError(
                f'--per-split-data-args-path {path} must be an object with keys "train", "valid", "test"'
            )
        blends = []
        for split in Split:
            value = per_split.get(split.name)
            tokens = None if value is None else _tokens([value] if isinstance(value, str) else value)
            blends.append(get_blend_from_list(tokens, f"{split.name} in {path}"))
        return None, blends
    per_split_paths = (args.train_data_path, args.valid_data_path, args.test_data_path)
    if any(path is not None for path in per_split_paths):
        return None, [
            get_blend_from_list(_tokens(path), f"--{split.name}-data-path")
            for split, path in zip(Split, per_split_paths)
        ]
    return None, None
