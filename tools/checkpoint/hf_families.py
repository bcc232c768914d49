"""Hugging Face model families: their config.json as Megatron flags, and their tensors as the canonical
(mcore, TP=1, PP=1, EP=1) state dict, both ways.

llama2 / llama3 -> LlamaForCausalLM, qwen3 -> Qwen3ForCausalLM (adds per-head q/k RMSNorm),
gpt2 -> GPT2LMHeadModel (Conv1D weights stored transposed, fused c_attn), mixtral -> MixtralForCausalLM and
qwen3_moe -> Qwen3MoeForCausalLM (routed experts, one on-disk tensor set per expert),
deepseek_v3 -> DeepseekV3ForCausalLM (multi-latent attention with YaRN, dense first layers, sigmoid routing with
an expert bias and groups, a shared expert).
"""

import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from megatron.core.errors import UserError
from megatron.core.models.gpt.moe_module_specs import moe_layer_pattern
from megatron.core.transformer.multi_latent_attention import MLA_HF_NAMES

StateDict = Dict[str, torch.Tensor]


class ConversionError(UserError, ValueError):
    """A model the converter cannot represent exactly, or files that do not form one; the message says which."""


def fuse_query_key_value(query, key, value, groups: int) -> torch.Tensor:
    """[q; k; v] projections -> the fused layout, group by group: [q heads of group g, k_g, v_g]."""
    rest = query.shape[1:]
    parts = [tensor.reshape(groups, -1, *rest) for tensor in (query, key, value)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_query_key_value(fused: torch.Tensor, groups: int, heads_per_group: int, head_dim: int):
    """Inverse of fuse_query_key_value: (q, k, v)."""
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, (heads_per_group + 2) * head_dim, *rest)
    query, key, value = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(tensor.reshape(-1, *rest).contiguous() for tensor in (query, key, value))


def pad_vocabulary(tensor: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Extra rows for the padded vocabulary repeat the last real row, as Megatron-LM's converters do."""
    extra = padded_size - tensor.size(0)
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, -1)], dim=0)


# ---- Paired transforms: each maps the Hugging Face tensors of one entry to one Megatron tensor and back.


class Same:
    """One Hugging Face tensor stored unchanged."""

    def to_mcore(self, tensors, args) -> torch.Tensor:
        return tensors[0]

    def from_mcore(self, tensor, args) -> Tuple[torch.Tensor, ...]:
        return (tensor,)


class VocabularyRows:
    """Embedding / output rows: padded to the padded vocabulary on the way in, cropped on the way out."""

    def to_mcore(self, tensors, args) -> torch.Tensor:
        return pad_vocabulary(tensors[0], args.padded_vocab_size)

    def from_mcore(self, tensor, args) -> Tuple[torch.Tensor, ...]:
        return (tensor[: args.true_vocab_size],)


class GroupedQueryKeyValue:
    """Separate q, k, v projections <-> Megatron's fused QKV, interleaved by query group."""

    def to_mcore(self, tensors, args) -> torch.Tensor:
        return fuse_query_key_value(*tensors, args.num_query_groups)

    def from_mcore(self, tensor, args) -> Tuple[torch.Tensor, ...]:
        heads_per_group = args.num_attention_heads // args.num_query_groups
        return split_query_key_value(tensor, args.num_query_groups, heads_per_group, args.kv_channels)


class PackedQueryKeyValue:
    """One [q; k; v] tensor (GPT-2's c_attn, no grouped-query attention) <-> Megatron's per-head fused QKV."""

    def to_mcore(self, tensors, args) -> torch.Tensor:
        return fuse_query_key_value(*tensors[0].chunk(3, dim=0), args.num_attention_heads)

    def from_mcore(self, tensor, args) -> Tuple[torch.Tensor, ...]:
        parts = split_query_key_value(tensor, args.num_attention_heads, 1, args.kv_channels)
        return (torch.cat(parts, dim=0),)


class GateUp:
    """SwiGLU's gate and up projections <-> Megatron's fc1, which stacks them [gate; up]."""

    def to_mcore(self, tensors, args) -> torch.Tensor:
        return torch.cat(tensors, dim=0)

    def from_mcore(self, tensor, args) -> Tuple[torch.Tensor, ...]:
        return tuple(part.contiguous() for part in torch.chunk(tensor, 2, dim=0))


class Transposed:
    """A weight Hugging Face stores [in, out] (GPT-2's Conv1D), around another transform."""

    def __init__(self, inner=None):
        self.inner = inner or Same()

    def to_mcore(self, tensors, args) -> torch.Tensor:
        return self.inner.to_mcore([tensor.t() for tensor in tensors], args).contiguous()

    def from_mcore(self, tensor, args) -> Tuple[torch.Tensor, ...]:
        return tuple(part.t().contiguous() for part in self.inner.from_mcore(tensor, args))


def _always(args) -> bool:
    return True


def _weight_only(args) -> Tuple[str, ...]:
    return ("weight",)


def _linear_parameters(args) -> Tuple[str, ...]:
    """A linear layer's parameters: the bias too unless --disable-bias-linear."""
    return ("weight", "bias") if args.add_bias_linear else ("weight",)


def _weight_and_bias(args) -> Tuple[str, ...]:
    return ("weight", "bias")


def _is_moe_layer(args, layer: int) -> bool:
    """Whether 0-based decoder layer `layer` is a mixture of experts under --moe-layer-freq."""
    if getattr(args, "num_experts", None) is None:
        return False
    return moe_layer_pattern(args.moe_layer_freq, args.num_layers)[layer]


@dataclass(frozen=True)
class TensorMap:
    """One row of a family's table: a Megatron (mcore, TP=1) tensor, the Hugging Face tensor(s) it is made of,
    and the paired transform between them. Names may hold `{p}`, filled with each of `parameters(args)`
    ("weight", "bias"), and `{e}`, filled with each routed expert 0 .. num_experts - 1; rows whose `when(args)`
    is false are absent from the model. Layer rows with `moe` True exist in MoE layers only, False in dense
    layers only (None: every layer)."""

    megatron: str
    hf: Union[str, Tuple[str, ...]]
    transform: object = Same()
    parameters: Callable = _weight_only
    when: Callable = _always
    moe: Optional[bool] = None

    def expand(self, args, megatron_prefix: str = "", hf_prefix: str = "", layer: Optional[int] = None):
        """(megatron name, hf names, transform) for each parameter (and expert) this row covers under `args`."""
        if not self.when(args) or (self.moe is not None and self.moe != _is_moe_layer(args, layer)):
            return
        hf_names = (self.hf,) if isinstance(self.hf, str) else self.hf
        experts = range(args.num_experts) if "{e}" in self.megatron else [None]
        for expert in experts:
            for parameter in self.parameters(args):
                yield (
                    megatron_prefix + self.megatron.format(p=parameter, e=expert),
                    tuple(hf_prefix + name.format(p=parameter, e=expert) for name in hf_names),
                    self.transform,
                )


class HFTable:
    """A family's tensors as one declarative table: rows before the layers, rows of every layer, rows after.
    Both directions are read from the same table, so they cannot disagree."""

    def __init__(self, hf_prefix: str, hf_layer: str, head, layer, tail, tied_copies=(), ignorable=()):
        self.hf_prefix = hf_prefix  # every Hugging Face name but the tied copies starts with it
        self.hf_layer = hf_layer  # e.g. "model.layers.{layer}."
        self.head, self.layer, self.tail = head, layer, tail
        self.tied_copies = tied_copies  # names a tied model may also store, as a copy of another tensor
        self.ignorable = ignorable  # parts of the names of buffers that hold no weights

    def entries(self, args):
        """Every (megatron name, hf names, transform) of the model `args` describes, in model order."""
        for row in self.head:
            yield from row.expand(args)
        for index in range(args.num_layers):
            for row in self.layer:
                yield from row.expand(args, f"decoder.layers.{index}.", self.hf_layer.format(layer=index), index)
        for row in self.tail:
            yield from row.expand(args)

    def _canonical(self, name: str) -> str:
        """Hugging Face names with the base model's prefix, whether or not the file stored it."""
        if name.startswith(self.hf_prefix) or name in self.tied_copies:
            return name
        return self.hf_prefix + name

    def to_mcore(self, hf_state: StateDict, args) -> StateDict:
        hf_state = {self._canonical(name): tensor for name, tensor in hf_state.items()}
        state = {
            megatron: transform.to_mcore([_take(hf_state, name) for name in hf_names], args)
            for megatron, hf_names, transform in self.entries(args)
        }
        for name in self.tied_copies:
            hf_state.pop(name, None)
        _check_all_used(hf_state, self.ignorable)
        return state

    def from_mcore(self, state: StateDict, args) -> StateDict:
        hf = {}
        for megatron, hf_names, transform in self.entries(args):
            hf.update(zip(hf_names, transform.from_mcore(state[megatron], args)))
        return hf


def _take(hf_state: StateDict, name: str) -> torch.Tensor:
    if name not in hf_state:
        raise ConversionError(f"the Hugging Face checkpoint lacks {name}; is --model-type-hf right for it?")
    return hf_state.pop(name)


def _check_all_used(hf_state: StateDict, ignorable=()) -> None:
    leftover = [name for name in hf_state if not any(part in name for part in ignorable)]
    if leftover:
        raise ConversionError(
            f"the Hugging Face checkpoint holds {len(leftover)} tensor(s) this model type does not use, e.g. "
            f"{leftover[0]}; is --model-type-hf right for it?"
        )


def _rope_settings(config: dict) -> dict:
    """RoPE settings from either transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`)."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    parameters.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    parameters.setdefault("rope_type", parameters.get("type", "default"))
    return parameters


def _untied(args) -> bool:
    return args.untie_embeddings_and_output_weights


def _qk_layernorm(args) -> bool:
    return args.qk_layernorm


LLAMA_TABLE = HFTable(
    hf_prefix="model.",
    hf_layer="model.layers.{layer}.",
    head=(TensorMap("embedding.word_embeddings.weight", "model.embed_tokens.weight", VocabularyRows()),),
    layer=(
        TensorMap("input_layernorm.weight", "input_layernorm.weight"),
        TensorMap(
            "self_attention.linear_qkv.{p}",
            ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
            GroupedQueryKeyValue(),
            _linear_parameters,
        ),
        TensorMap("self_attention.linear_proj.{p}", "self_attn.o_proj.{p}", parameters=_linear_parameters),
        TensorMap(
            "mlp.linear_fc1.{p}", ("mlp.gate_proj.{p}", "mlp.up_proj.{p}"), GateUp(), _linear_parameters, moe=False
        ),
        TensorMap("mlp.linear_fc2.{p}", "mlp.down_proj.{p}", parameters=_linear_parameters, moe=False),
        TensorMap("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", when=_qk_layernorm),
        TensorMap("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", when=_qk_layernorm),
        TensorMap("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ),
    tail=(
        TensorMap("decoder.final_layernorm.weight", "model.norm.weight"),
        TensorMap("output_layer.weight", "lm_head.weight", VocabularyRows(), when=_untied),
    ),
    tied_copies=("lm_head.weight",),
    ignorable=("rotary_emb.inv_freq",),
)


def _routed_expert_rows(block: str, gate: str, up: str, down: str) -> Tuple[TensorMap, ...]:
    """The router `{block}.gate` and expert e's projections `{block}.experts.{e}.{gate|up|down}` (Megatron's
    local_experts.{e}, global numbers) of a MoE layer."""
    experts = f"{block}.experts.{{e}}."
    return (
        TensorMap("mlp.router.weight", f"{block}.gate.weight", moe=True),
        TensorMap("mlp.experts.local_experts.{e}.linear_fc1.weight", (experts + gate, experts + up), GateUp(), moe=True),
        TensorMap("mlp.experts.local_experts.{e}.linear_fc2.weight", experts + down, moe=True),
    )


def _moe_table(block: str, gate: str, up: str, down: str) -> HFTable:
    """Llama's table with routed experts in the MoE layers."""
    return HFTable(
        LLAMA_TABLE.hf_prefix, LLAMA_TABLE.hf_layer, LLAMA_TABLE.head,
        LLAMA_TABLE.layer + _routed_expert_rows(block, gate, up, down), LLAMA_TABLE.tail, LLAMA_TABLE.tied_copies,
        LLAMA_TABLE.ignorable,
    )


MIXTRAL_TABLE = _moe_table("block_sparse_moe", "w1.weight", "w3.weight", "w2.weight")
QWEN3_MOE_TABLE = _moe_table("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight")

GPT2_TABLE = HFTable(
    hf_prefix="transformer.",
    hf_layer="transformer.h.{layer}.",
    head=(
        TensorMap("embedding.word_embeddings.weight", "transformer.wte.weight", VocabularyRows()),
        TensorMap("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    ),
    layer=(
        TensorMap("input_layernorm.{p}", "ln_1.{p}", parameters=_weight_and_bias),
        TensorMap("pre_mlp_layernorm.{p}", "ln_2.{p}", parameters=_weight_and_bias),
        TensorMap("self_attention.linear_qkv.weight", "attn.c_attn.weight", Transposed(PackedQueryKeyValue())),
        TensorMap("self_attention.linear_qkv.bias", "attn.c_attn.bias", PackedQueryKeyValue()),
        TensorMap("self_attention.linear_proj.weight", "attn.c_proj.weight", Transposed()),
        TensorMap("self_attention.linear_proj.bias", "attn.c_proj.bias"),
        TensorMap("mlp.linear_fc1.weight", "mlp.c_fc.weight", Transposed()),
        TensorMap("mlp.linear_fc1.bias", "mlp.c_fc.bias"),
        TensorMap("mlp.linear_fc2.weight", "mlp.c_proj.weight", Transposed()),
        TensorMap("mlp.linear_fc2.bias", "mlp.c_proj.bias"),
    ),
    tail=(TensorMap("decoder.final_layernorm.{p}", "transformer.ln_f.{p}", parameters=_weight_and_bias),),
    tied_copies=("lm_head.weight",),
    ignorable=("attn.bias", "attn.masked_bias"),
)


class HFFamily:
    """A Hugging Face family is a table of its tensors plus a translator of its config (`flags` from
    config.json, `check_args` / `hf_config` back); subclasses give both."""

    table: HFTable

    def config_for_tensors(self, config: dict, names) -> dict:
        """config.json completed by what the checkpoint's tensor `names` show (nothing, unless a family says)."""
        return config

    def to_mcore(self, hf_state: StateDict, args) -> StateDict:
        return self.table.to_mcore(hf_state, args)

    def from_mcore(self, state: StateDict, args) -> StateDict:
        return self.table.from_mcore(state, args)


class LlamaFamily(HFFamily):
    """LlamaForCausalLM: RMSNorm, SwiGLU, RoPE (optionally Llama 3.1-scaled), GQA, no biases."""

    model_types = ("llama",)
    architecture = "LlamaForCausalLM"
    qk_layernorm = False
    table = LLAMA_TABLE

    def check_config(self, config: dict) -> None:
        if config.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"hidden_act {config['hidden_act']!r} is not supported (only silu, as SwiGLU)")

    def flags(self, config: dict) -> List[str]:
        self.check_config(config)
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        groups = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        flags = [
            "--num-layers", config["num_hidden_layers"],
            "--hidden-size", hidden,
            "--ffn-hidden-size", config["intermediate_size"],
            "--num-attention-heads", heads,
            "--kv-channels", head_dim,
            "--max-position-embeddings", config["max_position_embeddings"],
            "--position-embedding-type", "rope",
            "--normalization", "RMSNorm",
            "--norm-epsilon", config.get("rms_norm_eps", 1e-6),
            "--swiglu",
            "--hidden-dropout", 0.0,
            "--attention-dropout", config.get("attention_dropout", 0.0),
        ]
        if groups != heads:
            flags += ["--group-query-attention", "--num-query-groups", groups]
        if not config.get("tie_word_embeddings", False):
            flags.append("--untie-embeddings-and-output-weights")
        if self.qk_layernorm:
            flags.append("--qk-layernorm")
        flags += self._bias_flags(config) + self._rope_flags(config)
        return [str(flag) for flag in flags]

    @staticmethod
    def _bias_flags(config: dict) -> List[str]:
        attention_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            raise ConversionError(
                f"attention_bias={attention_bias} with mlp_bias={mlp_bias} cannot be represented: "
                "--disable-bias-linear switches the biases of every projection together"
            )
        return [] if attention_bias else ["--disable-bias-linear"]

    @staticmethod
    def _rope_flags(config: dict) -> List[str]:
        rope = _rope_settings(config)
        flags = ["--rotary-base", rope["rope_theta"]]
        if config.get("partial_rotary_factor") is not None:
            flags += ["--rotary-percent", config["partial_rotary_factor"]]
        if rope["rope_type"] == "llama3":
            flags += [
                "--use-rope-scaling",
                "--rope-scaling-factor", rope["factor"],
                "--rope-scaling-low-freq-factor", rope["low_freq_factor"],
                "--rope-scaling-high-freq-factor", rope["high_freq_factor"],
                "--rope-scaling-original-max-position-embeddings", rope["original_max_position_embeddings"],
            ]
        elif rope["rope_type"] == "linear":
            factor = rope["factor"]
            if float(factor) != int(factor):
                raise ConversionError(f"linear RoPE scaling factor {factor} must be a whole number")
            flags += ["--rotary-seq-len-interpolation-factor", int(factor)]
        elif rope["rope_type"] != "default":
            raise ConversionError(f"RoPE type {rope['rope_type']!r} is not supported (default, linear, llama3)")
        return flags

    def check_args(self, args) -> None:
        """The Megatron model must be one this family can express."""
        wanted = {
            "normalization": "RMSNorm",
            "swiglu": True,
            "position_embedding_type": "rope",
            "qk_layernorm": self.qk_layernorm,
            "apply_residual_connection_post_layernorm": False,
            "rotary_interleaved": False,
        }
        _require_args(args, wanted, self.architecture)
        if args.add_qkv_bias and not args.add_bias_linear:
            raise ConversionError(f"{self.architecture} cannot hold a q/k/v bias without the other biases")

    def config_kwargs(self, args) -> dict:
        kwargs = dict(
            vocab_size=args.true_vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.ffn_hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_query_groups,
            head_dim=args.kv_channels,
            max_position_embeddings=args.max_position_embeddings,
            rms_norm_eps=args.norm_epsilon,
            hidden_act="silu",
            tie_word_embeddings=not args.untie_embeddings_and_output_weights,
            attention_bias=args.add_bias_linear,
            attention_dropout=args.attention_dropout,
        )
        if self.architecture == "LlamaForCausalLM":
            kwargs["mlp_bias"] = args.add_bias_linear
        return kwargs

    def rope_parameters(self, args) -> dict:
        parameters = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
        if args.use_rope_scaling:
            parameters.update(
                rope_type="llama3",
                factor=args.rope_scaling_factor,
                low_freq_factor=args.rope_scaling_low_freq_factor,
                high_freq_factor=args.rope_scaling_high_freq_factor,
                original_max_position_embeddings=args.rope_scaling_original_max_position_embeddings,
            )
        elif args.rotary_seq_len_interpolation_factor:
            parameters.update(rope_type="linear", factor=float(args.rotary_seq_len_interpolation_factor))
        return parameters

    def hf_config(self, args, dtype: torch.dtype):
        import transformers

        config_class = getattr(transformers, self.architecture.replace("ForCausalLM", "Config"))
        kwargs = self.config_kwargs(args)
        rope = self.rope_parameters(args)
        if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
            kwargs["rope_parameters"] = rope
        else:
            kwargs["rope_theta"] = rope.pop("rope_theta")
            kwargs["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        if args.rotary_percent != 1.0:
            kwargs["partial_rotary_factor"] = args.rotary_percent
        config = config_class(**kwargs)
        return _finish_config(config, self.architecture, dtype)


class Qwen3Family(LlamaFamily):
    """Qwen3ForCausalLM: Llama's layout plus RMSNorm on each query and key head."""

    model_types = ("qwen3",)
    architecture = "Qwen3ForCausalLM"
    qk_layernorm = True

    def check_config(self, config: dict) -> None:
        super().check_config(config)
        if config.get("use_sliding_window"):
            raise ConversionError("Qwen3 sliding-window attention is not supported (use_sliding_window is set)")


class MoEFamilyMixin:
    """Routed experts of a Llama-style family (softmax router, top-k, no shared experts), both ways."""

    def moe_flags(self, config: dict, num_experts: int, expert_width: int, pattern: List[bool], pre_softmax: bool) -> List[str]:
        flags = [
            "--num-experts", num_experts,
            "--moe-router-topk", config["num_experts_per_tok"],
            "--moe-ffn-hidden-size", expert_width,
            "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", config.get("router_aux_loss_coef", 0.0),
        ]
        if pre_softmax:
            flags.append("--moe-router-pre-softmax")
        if not all(pattern):
            flags += ["--moe-layer-freq", str([int(moe) for moe in pattern])]
        return [str(flag) for flag in flags]

    def check_moe_args(self, args) -> None:
        if getattr(args, "num_experts", None) is None:
            raise ConversionError(f"the checkpoint has no routed experts (--num-experts), so it is not {self.architecture}")
        wanted = {
            "moe_router_score_function": "softmax",
            "moe_shared_expert_intermediate_size": None,
            "moe_router_num_groups": None,
            "moe_router_topk_scaling_factor": None,
            "moe_router_enable_expert_bias": False,
            "moe_expert_capacity_factor": None,
        }
        _require_args(args, wanted, self.architecture)

    def moe_config_kwargs(self, args) -> dict:
        coeff = args.moe_aux_loss_coeff
        return dict(
            num_experts_per_tok=args.moe_router_topk,
            router_aux_loss_coef=float(coeff[0] if isinstance(coeff, list) else coeff),
        )


class MixtralFamily(MoEFamilyMixin, LlamaFamily):
    """MixtralForCausalLM: Llama's attention, every MLP a softmax top-k mixture of SwiGLU experts
    (`block_sparse_moe.experts.{e}.w1/w3/w2` = gate / up / down)."""

    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"
    table = MIXTRAL_TABLE

    def check_config(self, config: dict) -> None:
        super().check_config(config)
        if config.get("router_jitter_noise"):
            raise ConversionError("Mixtral router_jitter_noise > 0 is not supported (Megatron has no router jitter here)")
        if config.get("sliding_window") is not None:
            raise ConversionError("Mixtral sliding-window attention is not supported (sliding_window is set)")

    def flags(self, config: dict) -> List[str]:
        layers = [True] * config["num_hidden_layers"]
        expert_width = config["intermediate_size"]
        return super().flags(config) + self.moe_flags(config, config["num_local_experts"], expert_width, layers, False)

    def check_args(self, args) -> None:
        super().check_args(args)
        self.check_moe_args(args)
        if args.moe_router_pre_softmax or not all(moe_layer_pattern(args.moe_layer_freq, args.num_layers)):
            raise ConversionError(
                "MixtralForCausalLM routes with a softmax over the top-k logits in every layer: the checkpoint has "
                "--moe-router-pre-softmax or dense layers (--moe-layer-freq)"
            )

    def config_kwargs(self, args) -> dict:
        kwargs = super().config_kwargs(args)
        kwargs.pop("attention_bias")
        kwargs.update(self.moe_config_kwargs(args), intermediate_size=args.moe_ffn_hidden_size, num_local_experts=args.num_experts)
        return kwargs


class Qwen3MoeFamily(MoEFamilyMixin, Qwen3Family):
    """Qwen3MoeForCausalLM: Qwen3's attention; MoE MLPs except `mlp_only_layers` (and off the
    `decoder_sparse_step`); `norm_topk_prob` false is Megatron's --moe-router-pre-softmax."""

    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"
    table = QWEN3_MOE_TABLE

    def flags(self, config: dict) -> List[str]:
        num_experts = config.get("num_experts") or config.get("num_local_experts")
        if not num_experts:
            raise ConversionError("the Qwen3-MoE config names no experts (num_experts / num_local_experts)")
        dense, step = set(config.get("mlp_only_layers") or []), config.get("decoder_sparse_step", 1)
        pattern = [layer not in dense and (layer + 1) % step == 0 for layer in range(config["num_hidden_layers"])]
        pre_softmax = not config.get("norm_topk_prob", False)
        moe = self.moe_flags(config, num_experts, config["moe_intermediate_size"], pattern, pre_softmax)
        return super().flags(config) + moe

    def check_args(self, args) -> None:
        super().check_args(args)
        self.check_moe_args(args)

    def config_kwargs(self, args) -> dict:
        kwargs = super().config_kwargs(args)
        pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
        kwargs.update(
            self.moe_config_kwargs(args),
            num_experts=args.num_experts,
            moe_intermediate_size=args.moe_ffn_hidden_size,
            norm_topk_prob=not args.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[layer for layer, moe in enumerate(pattern) if not moe],
        )
        return kwargs


def _query_lora(args) -> bool:
    return args.q_lora_rank is not None


def _query_without_lora(args) -> bool:
    return args.q_lora_rank is None


_QUERY_LORA_NAMES = ("linear_q_down_proj.weight", "q_layernorm.weight", "linear_q_up_proj.weight")


def _mla_rows() -> Tuple[TensorMap, ...]:
    """MLA's tensors, copied unchanged (MLA_HF_NAMES); the query ones depend on --q-lora-rank."""
    rows = []
    for megatron, hf in MLA_HF_NAMES.items():
        when = _always
        if megatron in _QUERY_LORA_NAMES:
            when = _query_lora
        elif megatron == "linear_q_proj.weight":
            when = _query_without_lora
        rows.append(TensorMap(f"self_attention.{megatron}", f"self_attn.{hf}", when=when))
    return tuple(rows)


class DeepseekV3Table(HFTable):
    """HFTable plus the multi-token prediction depths: depth k (Megatron mtp.layers.{k}) is Hugging Face layer
    num_layers + k, its decoder layer (the last decoder layer's kind) under `transformer_layer.`."""

    depth_rows = (
        TensorMap("enorm.weight", "enorm.weight"),
        TensorMap("hnorm.weight", "hnorm.weight"),
        TensorMap("eh_proj.weight", "eh_proj.weight"),
        TensorMap("final_layernorm.weight", "shared_head.norm.weight"),
    )

    def entries(self, args):
        yield from super().entries(args)
        last = args.num_layers - 1
        for depth in range(args.mtp_num_layers or 0):
            megatron, hf = f"mtp.layers.{depth}.", self.hf_layer.format(layer=args.num_layers + depth)
            for row in self.depth_rows:
                yield from row.expand(args, megatron, hf, last)
            for row in self.layer:
                yield from row.expand(args, megatron + "transformer_layer.", hf, last)


def _deepseek_v3_table() -> HFTable:
    """Llama's embedding, norms, dense MLP (first layers) and head; MLA attention; MoE layers with the
    router's expert bias (`e_score_correction_bias`) and the shared experts."""
    attention = {"self_attention.linear_qkv.{p}", "self_attention.linear_proj.{p}", "self_attention.q_layernorm.weight",
                 "self_attention.k_layernorm.weight"}
    llama_rows = tuple(row for row in LLAMA_TABLE.layer if row.megatron not in attention)
    shared = "mlp.shared_experts."
    moe_rows = _routed_expert_rows("mlp", "gate_proj.weight", "up_proj.weight", "down_proj.weight") + (
        TensorMap("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias", moe=True),
        TensorMap(shared + "linear_fc1.weight", (shared + "gate_proj.weight", shared + "up_proj.weight"), GateUp(), moe=True),
        TensorMap(shared + "linear_fc2.weight", shared + "down_proj.weight", moe=True),
    )
    return DeepseekV3Table(
        LLAMA_TABLE.hf_prefix, LLAMA_TABLE.hf_layer, LLAMA_TABLE.head, llama_rows + _mla_rows() + moe_rows,
        LLAMA_TABLE.tail, LLAMA_TABLE.tied_copies, LLAMA_TABLE.ignorable,
    )


# HF's q_a_layernorm and kv_a_layernorm always use eps 1e-6; Megatron gives every norm --norm-epsilon.
DEEPSEEK_LATENT_NORM_EPSILON = 1e-6
# Config values the converter refuses unless they hold these (transformers' defaults; what Megatron computes).
_DEEPSEEK_V3_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "rope_interleave": True,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
}


class DeepseekV3Family(HFFamily):
    """DeepseekV3ForCausalLM: MLA (q-LoRA or not, YaRN or plain RoPE, interleaved rotary channels), the first
    `first_k_dense_replace` layers dense, then MoE layers routing as Megatron's sigmoid router with an expert
    bias, groups, the scaling factor and the shared experts. Multi-token prediction depths are the layers at
    index num_hidden_layers + k (DeepSeek's layout, which transformers does not load); each also stores copies
    of the embedding (`embed_tokens`) and the output layer (`shared_head.head`)."""

    model_types = ("deepseek_v3",)
    architecture = "DeepseekV3ForCausalLM"
    table = _deepseek_v3_table()

    def check_config(self, config: dict) -> None:
        for field, wanted in _DEEPSEEK_V3_FIXED.items():
            if config.get(field, wanted) != wanted:
                raise ConversionError(
                    f"DeepSeek-V3 {field}={config[field]!r} cannot be expressed in Megatron (it needs {wanted!r})"
                )
        heads = config["num_attention_heads"]
        if config.get("num_key_value_heads", heads) != heads:
            raise ConversionError(f"DeepSeek-V3 num_key_value_heads must equal num_attention_heads ({heads})")
        if config.get("rms_norm_eps", 1e-6) != DEEPSEEK_LATENT_NORM_EPSILON:
            raise ConversionError(
                f"DeepSeek-V3 rms_norm_eps={config['rms_norm_eps']} differs from its latent norms' fixed 1e-6, and "
                "Megatron has one --norm-epsilon for every norm"
            )
        if config.get("n_shared_experts", 1) < 1:
            raise ConversionError("DeepSeek-V3 n_shared_experts must be at least 1 (Megatron's shared expert)")
        groups, group_topk, topk = config.get("n_group", 1), config.get("topk_group", 1), config["num_experts_per_tok"]
        if groups > 1 and group_topk < groups and topk != 2 * group_topk:
            raise ConversionError(
                f"DeepSeek-V3 scores a group by its top-2 experts but Megatron by its top num_experts_per_tok // "
                f"topk_group = {topk // group_topk}: num_experts_per_tok must be 2 x topk_group ({2 * group_topk})"
            )

    def flags(self, config: dict) -> List[str]:
        self.check_config(config)
        layers, first_dense = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
        expert_width = config["moe_intermediate_size"]
        flags = [
            "--num-layers", layers,
            "--hidden-size", config["hidden_size"],
            "--ffn-hidden-size", config["intermediate_size"],
            "--num-attention-heads", config["num_attention_heads"],
            "--max-position-embeddings", config["max_position_embeddings"],
            "--position-embedding-type", "rope",
            "--normalization", "RMSNorm",
            "--norm-epsilon", config.get("rms_norm_eps", 1e-6),
            "--swiglu",
            "--disable-bias-linear",
            "--hidden-dropout", 0.0,
            "--attention-dropout", config.get("attention_dropout", 0.0),
            "--multi-latent-attention",
            "--qk-layernorm",
            "--kv-lora-rank", config["kv_lora_rank"],
            "--qk-head-dim", config["qk_nope_head_dim"],
            "--qk-pos-emb-head-dim", config["qk_rope_head_dim"],
            "--v-head-dim", config["v_head_dim"],
            "--num-experts", config["n_routed_experts"],
            "--moe-router-topk", config["num_experts_per_tok"],
            "--moe-ffn-hidden-size", expert_width,
            "--moe-shared-expert-intermediate-size", config.get("n_shared_experts", 1) * expert_width,
            "--moe-layer-freq", str([int(layer >= first_dense) for layer in range(layers)]),
            "--moe-router-score-function", "sigmoid",
            "--moe-router-enable-expert-bias",
            "--moe-router-topk-scaling-factor", config.get("routed_scaling_factor", 1.0),
            "--moe-router-dtype", "fp32",
        ]
        if config.get("q_lora_rank") is not None:
            flags += ["--q-lora-rank", config["q_lora_rank"]]
        if config.get("num_nextn_predict_layers"):
            flags += ["--mtp-num-layers", config["num_nextn_predict_layers"]]
        if config.get("n_group", 1) > 1:
            flags += ["--moe-router-num-groups", config["n_group"], "--moe-router-group-topk", config["topk_group"]]
        if not config.get("tie_word_embeddings", False):
            flags.append("--untie-embeddings-and-output-weights")
        return [str(flag) for flag in flags + self._rope_flags(config)]

    @staticmethod
    def _rope_flags(config: dict) -> List[str]:
        rope = _rope_settings(config)
        flags = ["--rotary-base", rope["rope_theta"]]
        if rope["rope_type"] == "default":
            return flags + ["--rope-type", "rope"]
        if rope["rope_type"] != "yarn":
            raise ConversionError(f"DeepSeek-V3 RoPE type {rope['rope_type']!r} is not supported (default, yarn)")
        for field in ("attention_factor", "truncate"):
            if rope.get(field) not in (None, True):
                raise ConversionError(f"DeepSeek-V3 YaRN {field}={rope[field]!r} is not supported")
        return flags + [
            "--rope-type", "yarn",
            "--rotary-scaling-factor", rope["factor"],
            "--mscale", rope.get("mscale", 1.0),
            "--mscale-all-dim", rope.get("mscale_all_dim", 0.0),
            "--original-max-position-embeddings", rope["original_max_position_embeddings"],
            "--beta-fast", rope.get("beta_fast", 32.0),
            "--beta-slow", rope.get("beta_slow", 1.0),
        ]

    def config_for_tensors(self, config: dict, names) -> dict:
        """num_nextn_predict_layers as the checkpoint holds them: transformers saves the field (default 1)
        without the layers."""
        layers = config["num_hidden_layers"]
        present = {int(match.group(1)) for match in map(_LAYER_INDEX.search, names) if match}
        depths = 0
        while depths < config.get("num_nextn_predict_layers", 0) and layers + depths in present:
            depths += 1
        return {**config, "num_nextn_predict_layers": depths}

    def to_mcore(self, hf_state: StateDict, args) -> StateDict:
        depths = args.mtp_num_layers or 0
        hf_state = _without_layers_from(hf_state, args.num_layers + depths)
        for name in self._depth_copies(args):
            hf_state.pop(name, None)
        return super().to_mcore(hf_state, args)

    def from_mcore(self, state: StateDict, args) -> StateDict:
        hf = super().from_mcore(state, args)
        output = "model.embed_tokens.weight" if not args.untie_embeddings_and_output_weights else "lm_head.weight"
        for name in self._depth_copies(args):
            hf[name] = hf["model.embed_tokens.weight" if name.endswith("embed_tokens.weight") else output].clone()
        return hf

    def _depth_copies(self, args) -> List[str]:
        """Each depth's copies of the embedding and the output layer (not Megatron tensors of their own)."""
        layers = [self.table.hf_layer.format(layer=args.num_layers + depth) for depth in range(args.mtp_num_layers or 0)]
        return [layer + name for layer in layers for name in ("embed_tokens.weight", "shared_head.head.weight")]

    def check_args(self, args) -> None:
        wanted = {
            "normalization": "RMSNorm",
            "swiglu": True,
            "multi_latent_attention": True,
            "qk_layernorm": True,
            "add_bias_linear": False,
            "apply_residual_connection_post_layernorm": False,
            "norm_epsilon": DEEPSEEK_LATENT_NORM_EPSILON,
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_shared_expert_gate": False,
            "moe_expert_capacity_factor": None,
        }
        if getattr(args, "num_experts", None) is None:
            raise ConversionError(f"the checkpoint has no routed experts (--num-experts), so it is not {self.architecture}")
        _require_args(args, wanted, self.architecture)
        shared, width = args.moe_shared_expert_intermediate_size, args.moe_ffn_hidden_size
        if not shared or shared % width:
            raise ConversionError(
                f"{self.architecture} needs shared experts of the routed width: --moe-shared-expert-intermediate-size "
                f"{shared} is not a positive multiple of --moe-ffn-hidden-size {width}"
            )
        pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
        if pattern != sorted(pattern):
            raise ConversionError(f"{self.architecture} has its dense layers first: --moe-layer-freq {args.moe_layer_freq}")
        groups, group_topk = args.moe_router_num_groups, args.moe_router_group_topk
        if groups and group_topk < groups and args.moe_router_topk != 2 * group_topk:
            raise ConversionError(
                f"{self.architecture} scores a group by its top-2 experts: --moe-router-topk must be 2 x "
                f"--moe-router-group-topk ({2 * group_topk})"
            )

    def hf_config(self, args, dtype: torch.dtype):
        from transformers import DeepseekV3Config

        pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
        rope = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
        if args.rope_type in (None, "yarn"):
            rope.update(
                rope_type="yarn", factor=args.rotary_scaling_factor, mscale=args.mscale,
                mscale_all_dim=args.mscale_all_dim, original_max_position_embeddings=args.original_max_position_embeddings,
                beta_fast=args.beta_fast, beta_slow=args.beta_slow,
            )
        config = DeepseekV3Config(
            vocab_size=args.true_vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.ffn_hidden_size,
            moe_intermediate_size=args.moe_ffn_hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_attention_heads,
            n_shared_experts=args.moe_shared_expert_intermediate_size // args.moe_ffn_hidden_size,
            n_routed_experts=args.num_experts,
            routed_scaling_factor=args.moe_router_topk_scaling_factor or 1.0,
            kv_lora_rank=args.kv_lora_rank,
            q_lora_rank=args.q_lora_rank,
            qk_rope_head_dim=args.qk_pos_emb_head_dim,
            v_head_dim=args.v_head_dim,
            qk_nope_head_dim=args.qk_head_dim,
            n_group=args.moe_router_num_groups or 1,
            topk_group=args.moe_router_group_topk or 1,
            num_experts_per_tok=args.moe_router_topk,
            first_k_dense_replace=pattern.count(False),
            norm_topk_prob=True,
            max_position_embeddings=args.max_position_embeddings,
            rms_norm_eps=args.norm_epsilon,
            rope_parameters=rope,
            rope_interleave=True,
            attention_bias=False,
            attention_dropout=args.attention_dropout,
            tie_word_embeddings=not args.untie_embeddings_and_output_weights,
            num_nextn_predict_layers=args.mtp_num_layers or 0,
        )
        return _finish_config(config, self.architecture, dtype)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _without_layers_from(hf_state: StateDict, first_dropped: int) -> StateDict:
    """The tensors of layers below `first_dropped`: further multi-token prediction depths than the config
    names are dropped with a note, as transformers ignores them."""
    kept, dropped = {}, []
    for name, tensor in hf_state.items():
        match = _LAYER_INDEX.search(name)
        if match and int(match.group(1)) >= first_dropped:
            dropped.append(name)
        else:
            kept[name] = tensor
    if dropped:
        print(
            f"note: dropped {len(dropped)} tensor(s) of layers past the decoder and its multi-token prediction "
            f"depths (num_hidden_layers + num_nextn_predict_layers = {first_dropped}), such as {dropped[0]}",
            file=sys.stderr,
        )
    return kept


def _finish_config(config, architecture: str, dtype: torch.dtype):
    config.architectures = [architecture]
    # transformers 5 calls the weights' dtype `dtype`, 4 `torch_dtype`.
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    return config


def _require_args(args, wanted: dict, architecture: str) -> None:
    for name, value in wanted.items():
        if getattr(args, name) != value:
            raise ConversionError(
                f"the checkpoint's {name}={getattr(args, name)!r} cannot be expressed as {architecture} "
                f"(which needs {value!r})"
            )


class GPT2Family(HFFamily):
    """GPT2LMHeadModel: LayerNorm, GeLU, learned positions, biases, tied embeddings."""

    model_types = ("gpt2",)
    architecture = "GPT2LMHeadModel"
    table = GPT2_TABLE
    _ACTIVATION_FLAGS = {"gelu_new": [], "gelu_pytorch_tanh": [], "gelu": ["--no-bias-gelu-fusion"]}

    def flags(self, config: dict) -> List[str]:
        activation = config.get("activation_function", "gelu_new")
        if activation not in self._ACTIVATION_FLAGS:
            raise ConversionError(f"GPT-2 activation_function {activation!r} is not supported")
        if not config.get("tie_word_embeddings", True):
            raise ConversionError("GPT-2 with untied embeddings is not supported")
        if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
            raise ConversionError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        hidden = config["n_embd"]
        flags = [
            "--num-layers", config["n_layer"],
            "--hidden-size", hidden,
            "--ffn-hidden-size", config.get("n_inner") or 4 * hidden,
            "--num-attention-heads", config["n_head"],
            "--max-position-embeddings", config["n_positions"],
            "--position-embedding-type", "learned_absolute",
            "--normalization", "LayerNorm",
            "--norm-epsilon", config.get("layer_norm_epsilon", 1e-5),
            "--hidden-dropout", config.get("resid_pdrop", 0.1),
            "--attention-dropout", config.get("attn_pdrop", 0.1),
        ]
        return [str(flag) for flag in flags + self._ACTIVATION_FLAGS[activation]]

    def check_args(self, args) -> None:
        wanted = {
            "normalization": "LayerNorm",
            "swiglu": False,
            "position_embedding_type": "learned_absolute",
            "add_bias_linear": True,
            "untie_embeddings_and_output_weights": False,
            "qk_layernorm": False,
            "apply_residual_connection_post_layernorm": False,
            "num_query_groups": args.num_attention_heads,
        }
        _require_args(args, wanted, self.architecture)
        if args.kv_channels * args.num_attention_heads != args.hidden_size:
            raise ConversionError("GPT-2 needs kv_channels x num_attention_heads == hidden_size")

    def hf_config(self, args, dtype: torch.dtype):
        import transformers

        config = transformers.GPT2Config(
            vocab_size=args.true_vocab_size,
            n_positions=args.max_position_embeddings,
            n_embd=args.hidden_size,
            n_layer=args.num_layers,
            n_head=args.num_attention_heads,
            n_inner=args.ffn_hidden_size,
            activation_function="gelu_new" if args.bias_gelu_fusion else "gelu",
            layer_norm_epsilon=args.norm_epsilon,
            resid_pdrop=args.hidden_dropout,
            embd_pdrop=args.hidden_dropout,
            attn_pdrop=args.attention_dropout,
            tie_word_embeddings=True,
        )
        return _finish_config(config, self.architecture, dtype)


FAMILIES = {
    "llama2": LlamaFamily(),
    "llama3": LlamaFamily(),
    "qwen3": Qwen3Family(),
    "gpt2": GPT2Family(),
    "mixtral": MixtralFamily(),
    "qwen3_moe": Qwen3MoeFamily(),
    "deepseek_v3": DeepseekV3Family(),
}


def family_for(model_type_hf: str):
    """The family named by --model-type-hf."""
    if model_type_hf not in FAMILIES:
        raise ConversionError(
            f"unknown --model-type-hf {model_type_hf!r}; choose one of: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type_hf]
