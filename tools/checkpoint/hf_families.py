"""Hugging Face model families: their config.json as Megatron flags, and their tensors as the canonical
(mcore, TP=1, PP=1) state dict, both ways.

llama2 / llama3 -> LlamaForCausalLM, qwen3 -> Qwen3ForCausalLM (adds per-head q/k RMSNorm),
gpt2 -> GPT2LMHeadModel (Conv1D weights stored transposed, fused c_attn).
"""

import inspect
from typing import Dict, List

import torch
from megatron.core.errors import UserError

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
    return (tensor.reshape(-1, *rest).contiguous() for tensor in (query, key, value))


def pad_vocabulary(tensor: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Extra rows for the padded vocabulary repeat the last real row, as Megatron-LM's converters do."""
    extra = padded_size - tensor.size(0)
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(extra, -1)], dim=0)


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


class LlamaFamily:
    """LlamaForCausalLM: RMSNorm, SwiGLU, RoPE (optionally Llama 3.1-scaled), GQA, no biases."""

    model_types = ("llama",)
    architecture = "LlamaForCausalLM"
    qk_layernorm = False

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

    def to_mcore(self, hf_state: StateDict, args) -> StateDict:
        hf_state = {name.removeprefix("model."): tensor for name, tensor in hf_state.items()}
        embeddings = pad_vocabulary(_take(hf_state, "embed_tokens.weight"), args.padded_vocab_size)
        state = {"embedding.word_embeddings.weight": embeddings}
        for layer in range(args.num_layers):
            hf, mg = f"layers.{layer}.", f"decoder.layers.{layer}."
            state[mg + "input_layernorm.weight"] = _take(hf_state, hf + "input_layernorm.weight")
            for suffix in ("weight", "bias") if args.add_bias_linear else ("weight",):
                q, k, v = (_take(hf_state, f"{hf}self_attn.{p}_proj.{suffix}") for p in "qkv")
                state[f"{mg}self_attention.linear_qkv.{suffix}"] = fuse_query_key_value(q, k, v, args.num_query_groups)
                state[f"{mg}self_attention.linear_proj.{suffix}"] = _take(hf_state, f"{hf}self_attn.o_proj.{suffix}")
                gate = _take(hf_state, f"{hf}mlp.gate_proj.{suffix}")
                up = _take(hf_state, f"{hf}mlp.up_proj.{suffix}")
                state[f"{mg}mlp.linear_fc1.{suffix}"] = torch.cat([gate, up], dim=0)
                state[f"{mg}mlp.linear_fc2.{suffix}"] = _take(hf_state, f"{hf}mlp.down_proj.{suffix}")
            if self.qk_layernorm:
                state[mg + "self_attention.q_layernorm.weight"] = _take(hf_state, hf + "self_attn.q_norm.weight")
                state[mg + "self_attention.k_layernorm.weight"] = _take(hf_state, hf + "self_attn.k_norm.weight")
            state[mg + "pre_mlp_layernorm.weight"] = _take(hf_state, hf + "post_attention_layernorm.weight")
        state["decoder.final_layernorm.weight"] = _take(hf_state, "norm.weight")
        if args.untie_embeddings_and_output_weights:
            state["output_layer.weight"] = pad_vocabulary(_take(hf_state, "lm_head.weight"), args.padded_vocab_size)
        else:
            hf_state.pop("lm_head.weight", None)
        _check_all_used(hf_state, ignorable=("rotary_emb.inv_freq",))
        return state

    def from_mcore(self, state: StateDict, args) -> StateDict:
        vocab = args.true_vocab_size
        hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab]}
        heads_per_group = args.num_attention_heads // args.num_query_groups
        for layer in range(args.num_layers):
            h, mg = f"model.layers.{layer}.", f"decoder.layers.{layer}."
            hf[h + "input_layernorm.weight"] = state[mg + "input_layernorm.weight"]
            for suffix in ("weight", "bias") if args.add_bias_linear else ("weight",):
                fused = state[f"{mg}self_attention.linear_qkv.{suffix}"]
                q, k, v = split_query_key_value(fused, args.num_query_groups, heads_per_group, args.kv_channels)
                hf[f"{h}self_attn.q_proj.{suffix}"], hf[f"{h}self_attn.k_proj.{suffix}"] = q, k
                hf[f"{h}self_attn.v_proj.{suffix}"] = v
                hf[f"{h}self_attn.o_proj.{suffix}"] = state[f"{mg}self_attention.linear_proj.{suffix}"]
                gate, up = torch.chunk(state[f"{mg}mlp.linear_fc1.{suffix}"], 2, dim=0)
                hf[f"{h}mlp.gate_proj.{suffix}"], hf[f"{h}mlp.up_proj.{suffix}"] = gate.contiguous(), up.contiguous()
                hf[f"{h}mlp.down_proj.{suffix}"] = state[f"{mg}mlp.linear_fc2.{suffix}"]
            if self.qk_layernorm:
                hf[h + "self_attn.q_norm.weight"] = state[mg + "self_attention.q_layernorm.weight"]
                hf[h + "self_attn.k_norm.weight"] = state[mg + "self_attention.k_layernorm.weight"]
            hf[h + "post_attention_layernorm.weight"] = state[mg + "pre_mlp_layernorm.weight"]
        hf["model.norm.weight"] = state["decoder.final_layernorm.weight"]
        if args.untie_embeddings_and_output_weights:
            hf["lm_head.weight"] = state["output_layer.weight"][:vocab]
        return hf

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


class GPT2Family:
    """GPT2LMHeadModel: LayerNorm, GeLU, learned positions, biases, tied embeddings."""

    model_types = ("gpt2",)
    architecture = "GPT2LMHeadModel"
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

    def to_mcore(self, hf_state: StateDict, args) -> StateDict:
        hf_state = {name.removeprefix("transformer."): tensor for name, tensor in hf_state.items()}
        heads = args.num_attention_heads
        state = {
            "embedding.word_embeddings.weight": pad_vocabulary(_take(hf_state, "wte.weight"), args.padded_vocab_size),
            "embedding.position_embeddings.weight": _take(hf_state, "wpe.weight"),
        }
        for layer in range(args.num_layers):
            hf, mg = f"h.{layer}.", f"decoder.layers.{layer}."
            for suffix in ("weight", "bias"):
                state[f"{mg}input_layernorm.{suffix}"] = _take(hf_state, f"{hf}ln_1.{suffix}")
                state[f"{mg}pre_mlp_layernorm.{suffix}"] = _take(hf_state, f"{hf}ln_2.{suffix}")
            # Conv1D stores [in, out]; c_attn's outputs are [q; k; v], each one slice per head.
            qkv_weight = _take(hf_state, hf + "attn.c_attn.weight").t()
            qkv_bias = _take(hf_state, hf + "attn.c_attn.bias")
            state[mg + "self_attention.linear_qkv.weight"] = fuse_query_key_value(*qkv_weight.chunk(3, dim=0), heads)
            state[mg + "self_attention.linear_qkv.bias"] = fuse_query_key_value(*qkv_bias.chunk(3, dim=0), heads)
            projection = _take(hf_state, hf + "attn.c_proj.weight")
            state[mg + "self_attention.linear_proj.weight"] = projection.t().contiguous()
            state[mg + "self_attention.linear_proj.bias"] = _take(hf_state, hf + "attn.c_proj.bias")
            state[mg + "mlp.linear_fc1.weight"] = _take(hf_state, hf + "mlp.c_fc.weight").t().contiguous()
            state[mg + "mlp.linear_fc1.bias"] = _take(hf_state, hf + "mlp.c_fc.bias")
            state[mg + "mlp.linear_fc2.weight"] = _take(hf_state, hf + "mlp.c_proj.weight").t().contiguous()
            state[mg + "mlp.linear_fc2.bias"] = _take(hf_state, hf + "mlp.c_proj.bias")
        for suffix in ("weight", "bias"):
            state[f"decoder.final_layernorm.{suffix}"] = _take(hf_state, f"ln_f.{suffix}")
        hf_state.pop("lm_head.weight", None)
        _check_all_used(hf_state, ignorable=("attn.bias", "attn.masked_bias"))
        return state

    def from_mcore(self, state: StateDict, args) -> StateDict:
        heads, head_dim = args.num_attention_heads, args.kv_channels
        hf = {
            "transformer.wte.weight": state["embedding.word_embeddings.weight"][: args.true_vocab_size],
            "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
        }
        for layer in range(args.num_layers):
            h, mg = f"transformer.h.{layer}.", f"decoder.layers.{layer}."
            for suffix in ("weight", "bias"):
                hf[f"{h}ln_1.{suffix}"] = state[f"{mg}input_layernorm.{suffix}"]
                hf[f"{h}ln_2.{suffix}"] = state[f"{mg}pre_mlp_layernorm.{suffix}"]
            q, k, v = split_query_key_value(state[mg + "self_attention.linear_qkv.weight"], heads, 1, head_dim)
            hf[h + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t().contiguous()
            q, k, v = split_query_key_value(state[mg + "self_attention.linear_qkv.bias"], heads, 1, head_dim)
            hf[h + "attn.c_attn.bias"] = torch.cat([q, k, v], dim=0)
            hf[h + "attn.c_proj.weight"] = state[mg + "self_attention.linear_proj.weight"].t().contiguous()
            hf[h + "attn.c_proj.bias"] = state[mg + "self_attention.linear_proj.bias"]
            hf[h + "mlp.c_fc.weight"] = state[mg + "mlp.linear_fc1.weight"].t().contiguous()
            hf[h + "mlp.c_fc.bias"] = state[mg + "mlp.linear_fc1.bias"]
            hf[h + "mlp.c_proj.weight"] = state[mg + "mlp.linear_fc2.weight"].t().contiguous()
            hf[h + "mlp.c_proj.bias"] = state[mg + "mlp.linear_fc2.bias"]
        for suffix in ("weight", "bias"):
            hf[f"transformer.ln_f.{suffix}"] = state[f"decoder.final_layernorm.{suffix}"]
        return hf

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


FAMILIES = {"llama2": LlamaFamily(), "llama3": LlamaFamily(), "qwen3": Qwen3Family(), "gpt2": GPT2Family()}


def family_for(model_type_hf: str):
    """The family named by --model-type-hf."""
    if model_type_hf not in FAMILIES:
        raise ConversionError(
            f"unknown --model-type-hf {model_type_hf!r}; choose one of: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type_hf]
