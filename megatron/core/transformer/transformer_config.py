"""TransformerConfig: every number and switch that shapes a transformer, validated on construction."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn.functional as F

from megatron.core.model_parallel_config import ConfigError, ModelParallelConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.pipeline_layout import layer_offset_and_count
from megatron.core.utils import init_method_normal, scaled_init_method_normal

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


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
    """With GeLU this selects Megatron's fused bias-GeLU, the tanh approximation (GPT-2's "gelu_new")."""
    rotary_interleaved: bool = False

    init_method: Optional[Callable] = None
    output_layer_init_method: Optional[Callable] = None
    init_method_std: float = 0.02

    attention_softmax_in_fp32: bool = True
    attention_backend: AttnBackend = AttnBackend.auto

    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None

    calculate_per_token_loss: bool = False
    """The loss is a sum over tokens: schedules do not divide it; gradients are divided by the step's tokens."""

    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        self._check_sizes()
        self._check_attention_heads()
        self._check_ranges()
        self._check_pipeline_split()
        self._check_recompute()
        if self.init_method is None:
            self.init_method = init_method_normal(self.init_method_std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = scaled_init_method_normal(self.init_method_std, self.num_layers)

    def _check_sizes(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.ffn_hidden_size <= 0:
            raise ConfigError(f"ffn_hidden_size must be positive, got {self.ffn_hidden_size}")

    def _check_attention_heads(self):
        heads = self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = heads
        groups = self.num_query_groups
        if groups <= 0 or heads % groups:
            raise ConfigError(
                f"num_attention_heads {heads} is not divisible by num_query_groups {groups}: every query group "
                "must serve the same number of heads (--num-attention-heads / --num-query-groups)"
            )
        if self.kv_channels is None:
            if self.hidden_size % heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {heads}; "
                    "choose sizes that divide or give the head width with --kv-channels"
                )
            self.kv_channels = self.hidden_size // heads
        if self.kv_channels <= 0:
            raise ConfigError(f"kv_channels must be positive, got {self.kv_channels}")
        tp = self.tensor_model_parallel_size
        if heads % tp or groups % tp:
            raise ConfigError(
                f"attention heads ({heads}) and query groups ({groups}) must both be divisible by the "
                f"tensor-parallel size {tp}, since each rank computes whole heads; "
                "lower --tensor-model-parallel-size or raise --num-query-groups"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by the tensor-parallel size {tp}"
            )

    def _check_ranges(self):
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.layernorm_epsilon <= 0:
            raise ConfigError(f"layernorm_epsilon must be positive, got {self.layernorm_epsilon}")
        if self.init_method_std <= 0:
            raise ConfigError(f"init_method_std must be positive, got {self.init_method_std}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"normalization {self.normalization!r} is not supported; choose one of {', '.join(NORMALIZATIONS)}"
            )
        if not isinstance(self.attention_backend, AttnBackend):
            raise ConfigError(f"attention_backend must be an AttnBackend, got {self.attention_backend!r}")
        if self.bias_activation_fusion and self.activation_func is F.gelu and not self.add_bias_linear:
            raise ConfigError("bias_activation_fusion with GeLU fuses the MLP bias and needs add_bias_linear")

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
        if self.recompute_granularity is None:
            return
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"recompute_granularity {self.recompute_granularity!r}: choose one of "
                f"{', '.join(RECOMPUTE_GRANULARITIES)}"
            )
        if self.recompute_granularity == "full":
            if self.recompute_method not in RECOMPUTE_METHODS:
                raise ConfigError(
                    "full recompute needs recompute_method 'uniform' or 'block' (--recompute-method)"
                )
            if not self.recompute_num_layers or self.recompute_num_layers < 1:
                raise ConfigError("full recompute needs recompute_num_layers >= 1 (--recompute-num-layers)")
