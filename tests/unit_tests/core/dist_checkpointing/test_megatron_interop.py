"""torch_dist interop with the published megatron-core package (an independent implementation of the format).

Both directions on CPU/gloo: megatron-core's `dist_checkpointing.load` reads what we save at TP=2 / EP=2 into its
own GPTModel with identical tensors, and a checkpoint megatron-core saves loads into our model at TP=2 and gives
megatron-core's logits.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, SEQUENCE = 64, 6
DENSE = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=24)
MOE = dict(DENSE, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=12, moe_token_dispatcher_type="allgather")
COMMON = dict(
    gated_linear_unit=True, add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0,
    attention_dropout=0.0, init_method_std=0.3, use_cpu_initialization=True,
)

# megatron-core 0.16.1 on CPU: its save writes through a helper process and asks CUDA for a device and a sync;
# its attention forks a CUDA RNG tracker (dropout is off here); its router asks for Transformer Engine's GEMM.
REFERENCE_PRELUDE = """
import contextlib, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
torch.cuda.synchronize = lambda *args, **kwargs: None
torch.cuda.current_device = lambda: "cpu"
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
import megatron.core.transformer.moe.moe_utils as moe_utils
moe_utils.te_general_gemm = None  # its router GEMM without Transformer Engine
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
fields = {fields}
fields.update(activation_func=torch.nn.functional.silu)
num_experts = fields.get("num_moe_experts")
torch.manual_seed(0)
model = GPTModel(TransformerConfig(**fields), get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False),
                 vocab_size={vocab}, max_sequence_length=16, share_embeddings_and_output_weights=False,
                 position_embedding_type="rope")
model.eval()
"""


def _our_model(fields: dict, parallel_output: bool = True) -> GPTModel:
    model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        **fields, activation_func=F.silu,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
    )
    spec = get_gpt_layer_local_spec(num_experts=fields.get("num_moe_experts"))
    return GPTModel(
        config, spec, vocab_size=VOCAB, max_sequence_length=16, position_embedding_type="rope",
        parallel_output=parallel_output,
    )


def _save_ours(rank, directory, fields):
    model = _our_model(fields)
    dist_checkpointing.save({**model.sharded_state_dict(), "iteration": 3}, directory)


def _reference(run_reference_megatron, fields, body):
    from tests.conftest import free_port

    prelude = REFERENCE_PRELUDE.format(port=free_port(), fields=repr({**fields, **COMMON}), vocab=VOCAB)
    return run_reference_megatron(prelude + body)


@pytest.mark.parametrize(
    "fields, layout",
    [(DENSE, dict(tensor_parallel_size=2)), (MOE, dict(expert_parallel_size=2))],
    ids=["dense-tp2", "moe-ep2"],
)
def test_megatron_core_loads_what_we_save(tmp_path, run_on_gloo, run_reference_megatron, fields, layout):
    directory, loaded = str(tmp_path / "iter_0000003"), str(tmp_path / "loaded.pt")
    run_on_gloo(2, _save_ours, directory, {**fields, **COMMON}, **layout)
    assert sorted(os.listdir(directory)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json"]
    _reference(run_reference_megatron, fields, f"""
loaded = dist_checkpointing.load(model.sharded_state_dict(), {directory!r})
assert loaded.pop("iteration") == 3  # the common state comes back merged in
model.load_state_dict(loaded)
torch.save({{name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}}, {loaded!r})
""")
    expected = _our_model({**fields, **COMMON}).state_dict()  # one rank: the same global weights, unsplit
    theirs = torch.load(loaded, weights_only=True)
    assert sorted(theirs) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=name)


def _load_theirs_and_run(rank, directory, logits_path, fields):
    model = _our_model(fields, parallel_output=False)
    dist_checkpointing.load(model.sharded_state_dict(), directory)
    model.eval()
    tokens = torch.arange(12).view(2, SEQUENCE) % VOCAB
    positions = torch.arange(SEQUENCE).expand(2, SEQUENCE)
    mask = torch.triu(torch.ones(1, 1, SEQUENCE, SEQUENCE, dtype=torch.bool), 1)
    with torch.no_grad():
        logits = model(tokens, positions, mask)
    if rank == 0:
        torch.save(logits, logits_path)


@pytest.mark.parametrize(
    "fields, layout",
    [(DENSE, dict(tensor_parallel_size=2)), (MOE, dict(expert_parallel_size=2))],
    ids=["dense-tp2", "moe-ep2"],
)
def test_we_load_what_megatron_core_saves(tmp_path, run_on_gloo, run_reference_megatron, fields, layout):
    directory = tmp_path / "iter_0000001"
    directory.mkdir()
    _reference(run_reference_megatron, fields, f"""
dist_checkpointing.save(model.sharded_state_dict(), {str(directory)!r})
tokens = torch.arange(12).view(2, {SEQUENCE}) % {VOCAB}
positions = torch.arange({SEQUENCE}).expand(2, {SEQUENCE})
mask = torch.triu(torch.ones(1, 1, {SEQUENCE}, {SEQUENCE}, dtype=torch.bool), 1)
with torch.no_grad():
    torch.save(model(tokens, positions, mask), {str(tmp_path / "reference_logits.pt")!r})
""")
    assert dist_checkpointing.check_is_distributed_checkpoint(str(directory))
    ours = tmp_path / "our_logits.pt"
    run_on_gloo(2, _load_theirs_and_run, str(directory), str(ours), {**fields, **COMMON}, **layout)
    reference = torch.load(tmp_path / "reference_logits.pt", weights_only=True)
    logits = torch.load(ours, weights_only=True)
    assert logits.shape == reference.shape == (2, SEQUENCE, VOCAB)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
