"""mcore GPTModel (and the legacy one where behaviour is shared): rotary scaling, masks, cache, recompute,
precision wrappers and checkpoint shape checks."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.fusions.compiled import compiled
from megatron.core.inference_params import InferenceParams
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import cross_entropy, model_parallel_cuda_manual_seed
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import StateDictMismatchError
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.legacy.model import GPTModel as LegacyGPTModel

VOCAB = 50


def make_model(legacy=False, share_embeddings_and_output_weights=None, **overrides):
    model_parallel_cuda_manual_seed(42)
    fields = dict(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.3,
        use_cpu_initialization=True,
    )
    fields.update(overrides)
    config = TransformerConfig(**fields)
    kwargs = dict(vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope", rope_scaling=True)
    if share_embeddings_and_output_weights is not None:
        kwargs["share_embeddings_and_output_weights"] = share_embeddings_and_output_weights
    if legacy:
        return LegacyGPTModel(config, **kwargs)
    return GPTModel(config, get_gpt_layer_local_spec(), **kwargs)


def tokens(length=12, batch=2):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def test_llama3_rotary_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=rope,
                         max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = RotaryEmbedding(128, rotary_base=500000, rope_scaling=True, use_cpu_initialization=True).inv_freq
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    unscaled = RotaryEmbedding(128, rotary_base=500000, use_cpu_initialization=True).inv_freq
    assert not torch.allclose(ours, unscaled)


def test_explicit_causal_mask_equals_the_implicit_one():
    model = make_model().eval()
    ids = tokens()
    mask = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, None, mask), model(ids, None, None))


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
def test_cache_in_chunks_equals_one_forward(legacy):
    model = make_model(legacy).eval()
    ids = tokens(length=9, batch=1)
    cache = InferenceParams(max_batch_size=1, max_sequence_length=9)
    pieces = []
    with torch.no_grad():
        for start, stop in ((0, 4), (4, 7), (7, 8), (8, 9)):
            pieces.append(model(ids[:, start:stop], None, None, inference_params=cache))
            cache.sequence_len_offset = stop
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(ids, None, None), rtol=1e-5, atol=1e-5)


def test_flash_kernel_restriction_gives_the_same_result():
    ids = tokens()
    with torch.no_grad():
        reference = make_model().eval()(ids, None, None)
        flash = make_model(attention_backend=AttnBackend.flash).eval()(ids, None, None)
    torch.testing.assert_close(flash, reference, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model):
    ids = tokens()
    model.train()
    model(ids[:, :-1], None, None, labels=ids[:, 1:]).mean().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
@pytest.mark.parametrize(
    "recompute",
    [dict(recompute_granularity="selective"),
     dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
     dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)],
    ids=["selective", "uniform", "block"],
)
def test_recomputation_gives_the_same_gradients(legacy, recompute):
    # Dropout on: recomputed forward passes must replay the same masks.
    expected = _loss_and_grads(make_model(legacy, hidden_dropout=0.2, attention_dropout=0.2))
    actual = _loss_and_grads(make_model(legacy, hidden_dropout=0.2, attention_dropout=0.2, **recompute))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_output_cross_entropy_gives_the_unfused_losses_and_gradients(legacy, tied, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_LOGITS_BYTES", 0)
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_VOCAB", 16)  # four vocabulary chunks
    ids = tokens()
    token_weights = torch.rand(2, 11, generator=torch.Generator().manual_seed(5)) * (ids[:, 1:] % 3 != 0)
    results = []
    for fused in (False, True):
        model = make_model(legacy, tied, fused_output_cross_entropy=fused).train()
        loss = model(ids[:, :-1], None, None, labels=ids[:, 1:])
        (loss * token_weights).sum().backward()
        results.append((loss.detach(), {name: param.grad for name, param in model.named_parameters()}))
    (unfused_loss, unfused_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, unfused_loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == unfused_grads.keys()
    for name, grad in unfused_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=5e-5, msg=name)  # gradients up to ~20


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
def test_torch_compile_fusions_give_the_same_losses_and_gradients(legacy, monkeypatch):
    """RMSNorm, SwiGLU and RoPE compiled (fused loops, another summation order) against the eager ops."""
    compiled.cache_clear()
    compile_calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function: compile_calls.append(function) or real_compile(function))
    ids = tokens()
    results = []
    for fusions in (False, True):
        model = make_model(legacy, torch_compile_fusions=fusions, bias_activation_fusion=True, apply_rope_fusion=True).train()
        loss = model(ids[:, :-1], None, None, labels=ids[:, 1:])
        loss.mean().backward()
        results.append((loss.detach(), {name: param.grad for name, param in model.named_parameters()}))
    assert sorted(function.__name__ for function in compile_calls) == ["_rotate", "bias_gated_activation", "rms_norm"]
    (eager_loss, eager_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_model_stays_close_to_float32_and_its_loss_is_float32():
    reference = make_model().eval()
    model = make_model(bf16=True, params_dtype=torch.bfloat16, attention_softmax_in_fp32=True).eval()
    model.load_state_dict(reference.state_dict())
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = tokens()
    with torch.no_grad():
        output, expected = model(ids, None, None), reference(ids, None, None)
        assert model(ids, None, None, labels=ids).dtype == torch.float32
    assert output.dtype == torch.bfloat16
    assert (output.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_checkpoint_shapes_that_disagree_with_the_flags_are_named():
    small, large = make_model(ffn_hidden_size=64), make_model(ffn_hidden_size=96)
    with pytest.raises(StateDictMismatchError) as error:
        large.load_state_dict(small.state_dict())
    message = str(error.value)
    assert "decoder.layers.0.mlp.linear_fc1.weight has shape (128, 32) in the checkpoint but (192, 32)" in message
    assert "--ffn-hidden-size" in message
    missing = "lacks 6 tensor.s. the model needs, e.g. decoder.layers.3.input_layernorm.weight"
    with pytest.raises(StateDictMismatchError, match=missing):
        make_model(num_layers=4, ffn_hidden_size=64).load_state_dict(small.state_dict())
