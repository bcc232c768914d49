"""TransformerConfig: every number and switch that shapes a transformer, validated on construction."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch.nn.functional as F

from megatron.core.model_parallel_config import ConfigError, ModelParallelConfig
from megatron.core.transformer.context_parallel_attention import CP_COMM_TYPES
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.pipeline_layout import layer_offset_and_count
from megatron.core.utils import init_method_normal, scaled_init_method_normal

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
MOE_DISPATCHERS = ("allgather", "alltoall")
MOE_DROP_POLICIES = ("probs", "position")
MOE_ROUTER_DTYPES = ("fp32", "fp64")
MLA_ROPE_TYPES = ("rope", "yarn")


@dataclass
class TransformerConfig(ModelParallelConfig):
    """Architecture of a decoder stack (Megatron-core field names and defaults)."""

    num_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per attention head."""
    ffn_hidden_size: Optional[int] = None
    """MLP width; None means 4 * hidden_size."""
    kv_channels: Optional[int] = None
    """Width of one attention head; None means hidden_size // num_attention_heads."""

    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    fp32_residual_connection: bool = False
    apply_residual_connection_post_layernorm: bool = False
    layernorm_epsilon: float = 1e-5
    normalization: str = "LayerNorm"
    qk_layernorm: bool = False

    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    gated_linear_unit: bool = False
    activation_func: Callable = F.gelu
    bias_activation_fusion: bool = False
    """With GeLU this selects Megatron's fused bias-GeLU, the tanh approximation (GPT-2's "gelu_new"); with a
    gated unit, the compiled activation when torch_compile_fusions is on."""
    apply_rope_fusion: bool = False
    """The compiled RoPE when torch_compile_fusions is on."""
    rotary_interleaved: bool = False
    torch_compile_fusions: bool = False
    """RMSNorm through torch.compile (megatron.core.fusions.compiled), and the gated MLP activation and RoPE
    where bias_activation_fusion / apply_rope_fusion ask for their fused forms."""
    fused_output_cross_entropy: bool = True
    """Training loss straight from the output layer's input, a chunk of tokens at a time, without the fp32
    logits of the whole micro batch (same losses and gradients within rounding)."""
    multi_latent_attention: bool = False
    """True for MLATransformerConfig (DeepSeek's multi-latent attention)."""

    init_method: Optional[Callable] = None
    output_layer_init_method: Optional[Callable] = None
    init_method_std: float = 0.02

    attention_softmax_in_fp32: bool = True
    attention_backend: AttnBackend = AttnBackend.auto

    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None

    cp_comm_type: Union[str, List[str], None] = None
    """Context-parallel attention algorithm ("p2p", "all_gather" or "a2a"): one for every layer or a list with
    one per layer; None means "p2p"."""

    calculate_per_token_loss: bool = False
    """The loss is a sum over tokens: schedules do not divide it; gradients are divided by the step's tokens."""

    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None

    # Mixture of experts (megatron/core/transformer/moe); num_moe_experts None means a dense MLP. Megatron keeps
    # the two expert parallel sizes in ModelParallelConfig; they live here with the rest of MoE.
    num_moe_experts: Optional[int] = None
    moe_layer_freq: Union[int, List[int]] = 1
    """An MoE layer every N layers from layer 0, or one 0/1 entry per layer (1 = MoE)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of one routed expert; None means ffn_hidden_size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Total width of the shared experts (number of shared experts x per-expert width); None means none."""
    moe_shared_expert_gate: bool = False
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_dtype: Optional[str] = None
    moe_router_load_balancing_type: Union[str, List[str]] = "aux_loss"
    moe_aux_loss_coeff: Union[float, List[float]] = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_input_jitter_eps: Optional[float] = None
    moe_router_enable_expert_bias: bool = False
    moe_router_force_load_balancing: bool = False
    """Benchmarks only: route on random logits (about uniform load); gradients pass straight through."""
    moe_router_bias_update_rate: float = 1e-3
    moe_token_dispatcher_type: str = "allgather"
    moe_grouped_gemm: bool = False
    moe_expert_capacity_factor: Optional[float] = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_token_drop_policy: str = "probs"
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    """None means tensor_model_parallel_size."""

    # Multi-token prediction (DeepSeek-V3): mtp_num_layers extra modules after the decoder, each predicting one
    # token further; their mean loss times mtp_loss_scaling_factor joins the gradient (not the lm loss).
    mtp_num_layers: Optional[int] = None
    mtp_loss_scaling_factor: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        self._check_mtp()
        self._check_sizes()
        self._check_attention_heads()
        self._check_ranges()
        self._check_pipeline_split()
        self._check_recompute()
        self._check_moe()
        self._check_context_parallel()
        if self.init_method is None:
            self.init_method = init_method_normal(self.init_method_std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = scaled_init_method_normal(self.init_method_std, self.num_layers)

    def _check_mtp(self):
        if self.mtp_num_layers is not None and self.mtp_num_layers < 1:
            raise ConfigError(f"--mtp-num-layers must be at least 1 (or omitted), got {self.mtp_num_layers}")
        if self.mtp_num_layers is not None and self.mtp_loss_scaling_factor < 0:
            raise ConfigError(f"--mtp-loss-scaling-factor must not be negative, got {self.mtp_loss_scaling_factor}")

    def _check_sizes(self):
        for flag, value in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
        ):
            if value is None or value <= 0:
                raise ConfigError(f"{flag} is required and must be positive")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.ffn_hidden_size <= 0:
            raise ConfigError(f"--ffn-hidden-size must be positive, got {self.ffn_hidden_size}")

    def _check_attention_heads(self):
        heads = self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = heads
        groups = self.num_query_groups
        if groups <= 0 or heads % groups:
            raise ConfigError(
                f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; every key/value "
                "group must serve the same number of heads"
            )
        if self.kv_channels is None:
            if self.hidden_size % heads:
                raise ConfigError(
                    f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {heads}; choose "
                    "sizes that divide or give the head width with --kv-channels"
                )
            self.kv_channels = self.hidden_size // heads
        if self.kv_channels <= 0:
            raise ConfigError(f"--kv-channels must be positive, got {self.kv_channels}")
        tp = self.tensor_model_parallel_size
        if heads % tp or groups % tp:
            raise ConfigError(
                f"attention heads ({heads}) and query groups ({groups}) must both be divisible by the "
                f"tensor-parallel size {tp}, since each rank computes whole heads; "
                "lower --tensor-model-parallel-size or raise --num-query-groups"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}"
            )

    def _check_ranges(self):
        for flag, value in (("--hidden-dropout", self.hidden_dropout), ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{flag} must lie in [0, 1), got {value}")
        if self.layernorm_epsilon <= 0:
            raise ConfigError(f"--norm-epsilon must be positive, got {self.layernorm_epsilon}")
        if self.init_method_std <= 0:
            raise ConfigError(f"--init-method-std must be positive, got {self.init_method_std}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"--normalization {self.normalization!r} is not supported; choose one of {', '.join(NORMALIZATIONS)}"
            )
        if not isinstance(self.attention_backend, AttnBackend):
            raise ConfigError(f"attention_backend must be an AttnBackend, got {self.attention_backend!r}")
        if self.bias_activation_fusion and self.activation_func is F.gelu and not self.add_bias_linear:
            raise ConfigError("bias_activation_fusion with GeLU fuses the MLP bias and needs add_bias_linear")

    def _check_context_parallel(self):
        comm_types = self.cp_comm_type if isinstance(self.cp_comm_type, list) else [self.cp_comm_type or "p2p"]
        unknown = [name for name in comm_types if name not in CP_COMM_TYPES]
        if unknown:
            raise ConfigError(
                f"--cp-comm-type {unknown[0]!r} is not supported; choose one of {', '.join(CP_COMM_TYPES)}"
            )
        if isinstance(self.cp_comm_type, list) and len(comm_types) != self.num_layers:
            raise ConfigError(
                f"--cp-comm-type lists {len(comm_types)} types for {self.num_layers} layers; give one for all layers "
                "or one per layer"
            )
        cp = self.context_parallel_size
        if "a2a" in comm_types and (self.num_attention_heads // self.tensor_model_parallel_size) % cp:
            raise ConfigError(
                f"--cp-comm-type a2a splits the {self.num_attention_heads // self.tensor_model_parallel_size} "
                f"attention heads of a tensor-parallel rank over --context-parallel-size {cp}, which must divide them"
            )

    def cp_comm_type_of_layer(self, layer_number: int) -> str:
        """The context-parallel algorithm of layer `layer_number` (1-based, as Megatron numbers layers)."""
        if isinstance(self.cp_comm_type, list):
            return self.cp_comm_type[layer_number - 1]
        return self.cp_comm_type or "p2p"

    def _check_pipeline_split(self):
        """Each pipeline stage (and virtual chunk) must receive a whole number of layers."""
        layer_offset_and_count(
            self.num_layers,
            self.pipeline_model_parallel_size,
            0,
            self.virtual_pipeline_model_parallel_size,
            0,
            self.num_layers_in_first_pipeline_stage,
            self.num_layers_in_last_pipeline_stage,
        )

    def _check_recompute(self):
        if self.recompute_granularity != "full":
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")
            if self.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
                raise ConfigError(
                    f"--recompute-granularity {self.recompute_granularity!r}: choose one of "
                    f"{', '.join(RECOMPUTE_GRANULARITIES)}"
                )
            return
        if self.recompute_method not in RECOMPUTE_METHODS or self.recompute_num_layers is None:
            raise ConfigError(
                "--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers N"
            )
        # A count above a pipeline stage's layers (stages may be uneven) recomputes that whole stage.
        if not 1 <= self.recompute_num_layers <= self.num_layers:
            raise ConfigError(
                f"--recompute-num-layers {self.recompute_num_layers} must lie between 1 and --num-layers "
                f"({self.num_layers})"
            )

    def _check_moe(self):
        """MoE fields; each message names the flag to change."""
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = self.tensor_model_parallel_size
        experts, ep = self.num_moe_experts, self.expert_model_parallel_size
        if experts is None:
            if ep > 1:
                raise ConfigError(f"--expert-model-parallel-size {ep} needs --num-experts")
            return
        if experts <= 0:
            raise ConfigError(f"--num-experts must be positive, got {experts}")
        if ep < 1 or experts % ep:
            raise ConfigError(f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        widths = {
            "--moe-ffn-hidden-size": self.moe_ffn_hidden_size,
            "--moe-shared-expert-intermediate-size": self.moe_shared_expert_intermediate_size,
        }
        for flag, width in widths.items():
            if width is not None and width <= 0:
                raise ConfigError(f"{flag} must be positive, got {width}")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ConfigError("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        self._check_moe_tensor_parallel()
        self._check_moe_layer_freq()
        self._check_moe_router()
        self._check_moe_load_balancing()
        _check_choice("--moe-token-dispatcher-type", self.moe_token_dispatcher_type, MOE_DISPATCHERS)
        _check_choice("--moe-token-drop-policy", self.moe_token_drop_policy, MOE_DROP_POLICIES)
        jitter = self.moe_input_jitter_eps
        if jitter is not None and not 0 < jitter < 1:
            raise ConfigError(f"--moe-input-jitter-eps must lie in (0, 1), got {jitter}")
        capacity_factor = self.moe_expert_capacity_factor
        if capacity_factor is not None and capacity_factor <= 0:
            raise ConfigError(f"--moe-expert-capacity-factor must be positive, got {capacity_factor}")
        if self.moe_pad_expert_input_to_capacity and capacity_factor is None:
            raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")

    def _check_moe_tensor_parallel(self):
        etp = self.expert_tensor_parallel_size
        if etp < 1:
            raise ConfigError(f"--expert-tensor-parallel-size must be at least 1, got {etp}")
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ConfigError(
                "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel (each tensor-parallel "
                "rank routes its own part of the sequence)"
            )
        if etp > 1 and self.add_bias_linear:
            raise ConfigError(
                f"--expert-tensor-parallel-size {etp} splits experts without biases: add --disable-bias-linear "
                "or use --expert-tensor-parallel-size 1"
            )
        if self.moe_ffn_hidden_size % etp:
            raise ConfigError(
                f"--moe-ffn-hidden-size {self.moe_ffn_hidden_size} is not divisible by --expert-tensor-parallel-size "
                f"{etp}"
            )

    def _check_moe_layer_freq(self):
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            if freq < 1:
                raise ConfigError(f"--moe-layer-freq must be at least 1, got {freq}")
        elif len(freq) != self.num_layers or any(entry not in (0, 1) for entry in freq):
            raise ConfigError(
                f"--moe-layer-freq needs one 0/1 entry per layer (--num-layers {self.num_layers}), got {freq}"
            )

    def _check_moe_router(self):
        experts, topk = self.num_moe_experts, self.moe_router_topk
        if topk > experts:
            raise ConfigError(f"--moe-router-topk {topk} exceeds --num-experts {experts}")
        if topk < 1:
            raise ConfigError(f"--moe-router-topk must be at least 1, got {topk}")
        _check_choice("--moe-router-score-function", self.moe_router_score_function, MOE_SCORE_FUNCTIONS)
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
        if self.moe_router_dtype is not None:
            _check_choice("--moe-router-dtype", self.moe_router_dtype, MOE_ROUTER_DTYPES)
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ConfigError("--moe-router-num-groups and --moe-router-group-topk must be given together")
        if groups is None:
            return
        if groups <= 0 or experts % groups:
            raise ConfigError(f"--num-experts {experts} is not divisible by --moe-router-num-groups {groups}")
        if not 1 <= group_topk <= groups:
            raise ConfigError(f"--moe-router-group-topk {group_topk} must lie in [1, --moe-router-num-groups {groups}]")
        if topk % group_topk or topk // group_topk > experts // groups:
            raise ConfigError(
                f"--moe-router-topk {topk} must be a multiple of --moe-router-group-topk {group_topk}, taking at "
                f"most {experts // groups} experts (one group) from each selected group"
            )

    def _check_moe_load_balancing(self):
        types, coeffs = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        for name in [types] if isinstance(types, str) else types:
            _check_choice("--moe-router-load-balancing-type", name, MOE_LOAD_BALANCING_TYPES)
        if not isinstance(types, str) and (isinstance(coeffs, (int, float)) or len(coeffs) != len(types)):
            raise ConfigError(
                f"--moe-aux-loss-coeff needs one value per --moe-router-load-balancing-type ({len(types)}), "
                f"got {coeffs}"
            )


@dataclass
class MLATransformerConfig(TransformerConfig):
    """A transformer with multi-latent attention (DeepSeek-V2/V3; Megatron-core field names and defaults).

    Query and key heads are qk_head_dim channels without position plus qk_pos_emb_head_dim rotated ones; keys
    and values are up-projected from a kv_lora_rank latent, queries from a q_lora_rank latent (None: from the
    hidden states directly). The rotary fields configure MLA's own rotary embedding of the rotated channels.
    """

    multi_latent_attention: bool = True
    q_lora_rank: Optional[int] = 512
    """Width of the query latent; None projects queries straight from the hidden states (linear_q_proj)."""
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    """Channels of each query/key head that carry no position (HF qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int = 64
    """Rotated channels of each query/key head (HF qk_rope_head_dim); the key part is shared by all heads."""
    v_head_dim: int = 128
    normalization: str = "RMSNorm"
    rope_type: str = "yarn"
    rotary_base: float = 10000
    rotary_percent: float = 1.0
    rotary_scaling_factor: float = 40
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32
    beta_slow: float = 1
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self._check_latent_sizes()
        self._check_mla_rope()
        self._check_latent_split()

    def _check_latent_sizes(self):
        if self.kv_lora_rank is None or self.kv_lora_rank <= 0:
            raise ConfigError(
                f"multi-latent attention needs --kv-lora-rank, the width of the key/value latent (DeepSeek-V3: 512), "
                f"got {self.kv_lora_rank}"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(
                f"--q-lora-rank must be positive, or omitted for queries without a latent, got {self.q_lora_rank}"
            )
        for flag, width in (("--qk-head-dim", self.qk_head_dim), ("--v-head-dim", self.v_head_dim)):
            if width is None or width <= 0:
                raise ConfigError(f"{flag} must be positive for multi-latent attention, got {width}")
        if self.num_query_groups != self.num_attention_heads:
            raise ConfigError(
                f"multi-latent attention has one key/value head per query head; drop --group-query-attention "
                f"(--num-query-groups {self.num_query_groups} != --num-attention-heads {self.num_attention_heads})"
            )

    def _check_latent_split(self):
        tp = self.tensor_model_parallel_size
        latents = {
            "--q-lora-rank": self.q_lora_rank,
            "--kv-lora-rank + --qk-pos-emb-head-dim": self.kv_lora_rank + self.qk_pos_emb_head_dim,
        }
        for flag, width in latents.items():
            if width is not None and width % tp:
                raise ConfigError(
                    f"{flag} ({width}) must be divisible by --tensor-model-parallel-size {tp}: the latent "
                    "down-projections are split over tensor-parallel ranks"
                )

    def _check_mla_rope(self):
        _check_choice("--rope-type", self.rope_type, MLA_ROPE_TYPES)
        rotated = self.qk_pos_emb_head_dim
        if self.rope_type == "rope" and rotated is not None:
            rotated = int(rotated * self.rotary_percent)
        if rotated is None or rotated <= 0 or rotated % 2:
            raise ConfigError(
                f"--qk-pos-emb-head-dim {self.qk_pos_emb_head_dim} (x --rotary-percent for rope) must give a "
                f"positive, even number of rotated channels, got {rotated}"
            )
        if self.rotary_interleaved:
            raise ConfigError(
                "--rotary-interleaved does not apply to multi-latent attention, which always reads its rotated "
                "channels in DeepSeek's interleaved layout"
            )
        if self.rope_type != "yarn":
            return
        if self.rotary_scaling_factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ConfigError(
                f"YaRN needs a positive --rotary-scaling-factor ({self.rotary_scaling_factor}) and "
                f"--original-max-position-embeddings ({self.original_max_position_embeddings})"
            )
        if not 0 < self.beta_slow < self.beta_fast:
            raise ConfigError(
                f"YaRN needs 0 < --beta-slow < --beta-fast, got --beta-slow {self.beta_slow} "
                f"--beta-fast {self.beta_fast}"
            )


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value}: choose one of {', '.join(choices)}")
