"""Both GPT stacks split over two tensor-parallel ranks (or two pipeline stages) give the single-process
logits, loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.legacy.model import GPTModel as LegacyGPTModel
from megatron.core.tensor_parallel.state_dict_sharding import shard_of, split_rule
from megatron.core.transformer.pipeline_layout import split_pipeline
from megatron.legacy.model.checkpoint_names import legacy_to_mcore_names, mcore_to_legacy_names

VOCAB, SEQUENCE, BATCH = 64, 8, 2

LLAMA_LIKE = dict(
    config=dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        num_query_groups=2,
        qk_layernorm=True,
    ),
    model=dict(position_embedding_type="rope", share_embeddings_and_output_weights=False, rotary_base=500000),
)
GPT_LIKE = dict(
    config=dict(bias_activation_fusion=True),
    model=dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
)


def build(legacy, variant, tensor_parallel_size=1, sequence_parallel=False, pipeline_parallel_size=1, **stage):
    """The model (or, with `stage` = pre_process/post_process, one pipeline stage of it)."""
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.2,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        sequence_parallel=sequence_parallel,
        **variant["config"],
    )
    kwargs = dict(vocab_size=VOCAB, max_sequence_length=SEQUENCE, parallel_output=False, **variant["model"], **stage)
    if legacy:
        return LegacyGPTModel(config, **kwargs)
    return GPTModel(config, get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm), **kwargs)


def batch():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQUENCE + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def run_model(model):
    inputs, labels = batch()
    positions = torch.arange(SEQUENCE).unsqueeze(0).expand(BATCH, -1)
    logits = model(inputs, positions, None)
    loss = model(inputs, positions, None, labels=labels)
    loss.mean().backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _mcore_names(legacy, state):
    return legacy_to_mcore_names(state) if legacy else state


def _check_case(rank, legacy, variant, sequence_parallel, expected):
    expected_logits, expected_loss, expected_grads = expected
    model = build(legacy, variant, tensor_parallel_size=2, sequence_parallel=sequence_parallel)
    logits, loss, grads = run_model(model)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    grads = _mcore_names(legacy, grads)
    params = _mcore_names(legacy, dict(model.named_parameters()))
    for name, grad in grads.items():
        dim, stride = split_rule(params[name])  # as the sharded layer recorded it
        expected_grad = expected_grads[name] if dim < 0 else shard_of(expected_grads[name], rank, 2, dim, stride)
        # Replicated weights that saw half the sequence or half the heads: the sum over ranks is the gradient.
        partial = getattr(params[name], "tensor_parallel_partial_grad", False)
        if partial or (sequence_parallel and getattr(params[name], "sequence_parallel", False)):
            torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, msg=name)


def _tensor_parallel_worker(rank, legacy, cases):
    for variant, sequence_parallel, expected in cases:
        _check_case(rank, legacy, variant, sequence_parallel, expected)


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
def test_two_tensor_parallel_ranks_match_one(run_on_gloo, legacy):
    """Llama-like (GQA, SwiGLU, RoPE, q/k norm, untied) and GPT-like (learned positions, biases, tied),
    each without and with sequence parallelism; one launch per stack keeps the test quick."""
    cases = []
    for variant in (LLAMA_LIKE, GPT_LIKE):
        logits, loss, grads = run_model(build(legacy, variant))
        for sequence_parallel in (False, True):
            cases.append((variant, sequence_parallel, (logits, loss, _mcore_names(legacy, grads))))
    run_on_gloo(2, _tensor_parallel_worker, legacy, cases, tensor_parallel_size=2)

def _pipeline_worker(rank, legacy, variant, full_state, expected_logits):
    """Stage 0 embeds and runs layer 1; stage 1 runs layer 2, the final norm and the tied output layer."""
    model = build(legacy, variant, pipeline_parallel_size=2, pre_process=rank == 0, post_process=rank == 1)
    tied = variant["model"]["share_embeddings_and_output_weights"]
    # The tie at construction: the last stage's output weight starts as the first stage's embeddings.
    shared = model.shared_embedding_or_output_weight().detach().clone()
    torch.distributed.broadcast(shared, src=0)
    assert torch.equal(shared, model.shared_embedding_or_output_weight())

    stage_state = split_pipeline(full_state, 2, 2, tied)[rank]
    model.load_state_dict(mcore_to_legacy_names(stage_state, tied) if legacy else stage_state)
    inputs, _ = batch()
    hidden = torch.empty(SEQUENCE, BATCH, 32)
    with torch.no_grad():
        if rank == 0:
            torch.distributed.send(model(inputs, None, None).contiguous(), dst=1)
        else:
            torch.distributed.recv(hidden, src=0)
            model.set_input_tensor([hidden])
            torch.testing.assert_close(model(None, None, None), expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("legacy", [False, True], ids=["mcore", "legacy"])
def test_two_pipeline_stages_match_one(run_on_gloo, legacy):
    model = build(legacy, GPT_LIKE).eval()
    with torch.no_grad():
        logits = model(batch()[0], None, None)
    full_state = _mcore_names(legacy, model.state_dict())
    run_on_gloo(2, _pipeline_worker, legacy, GPT_LIKE, full_state, logits, pipeline_parallel_size=2)
