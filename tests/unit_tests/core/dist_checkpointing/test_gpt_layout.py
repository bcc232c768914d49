"""Megatron's torch_dist keys and global shapes for a DeepSeek-style model (MLA, a dense first layer, routed and
shared experts, MTP: the per-layer form of megatron-core's MoE_MLA_CP §8.2), and a crafted checkpoint that must
not run code when read."""

import os
import pickle

import pytest
import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.gpt_layout import GPTCheckpointLayout, checkpoint_tensors, sharded_model_state
from megatron.core.safe_load import UnsafeCheckpointError
from tools.checkpoint.checkpoint_files import model_args, unsplit_model

HIDDEN, EXPERTS, EXPERT_WIDTH = 32, 4, 16
DEEPSEEK = [
    "--num-layers", 2, "--hidden-size", HIDDEN, "--ffn-hidden-size", 64, "--num-attention-heads", 4,
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--max-position-embeddings", 32,
    "--multi-latent-attention", "--q-lora-rank", 16, "--kv-lora-rank", 16, "--qk-head-dim", 8,
    "--qk-pos-emb-head-dim", 8, "--v-head-dim", 8, "--qk-layernorm",
    "--num-experts", EXPERTS, "--moe-router-topk", 2, "--moe-ffn-hidden-size", EXPERT_WIDTH,
    "--moe-shared-expert-intermediate-size", EXPERT_WIDTH, "--moe-layer-freq", "([0]*1+[1]*1)",
    "--mtp-num-layers", 1,
]


@pytest.fixture(scope="module")
def deepseek_entries():
    args = model_args([str(flag) for flag in DEEPSEEK], 64, 1, 1, 1, False)
    layout = GPTCheckpointLayout(args.num_layers, 0, stacked=False, tied_output=False, num_experts=EXPERTS)
    entries = sharded_model_state(*checkpoint_tensors(unsplit_model(args)), layout)
    tensors = {block.key: block for blocks in entries.values() for block in blocks if isinstance(block, ShardedTensor)}
    objects = {entry.unique_key for blocks in entries.values() for entry in blocks if isinstance(entry, ShardedObject)}
    return tensors, objects


def test_deepseek_style_keys_and_global_shapes(deepseek_entries):
    tensors, objects = deepseek_entries
    expected_shapes = {
        # MLA keeps its norms' own names; the layers differ, so each has its own keys
        "decoder.layers.0.input_layernorm.weight": (HIDDEN,),
        "decoder.layers.0.self_attention.linear_q_down_proj.weight": (16, HIDDEN),
        "decoder.layers.0.mlp.linear_fc1.weight": (128, HIDDEN),
        "decoder.layers.1.mlp.router.weight": (EXPERTS, HIDDEN),
        "decoder.layers.1.mlp.experts.experts.linear_fc1.weight": (EXPERTS, 2 * EXPERT_WIDTH, HIDDEN),
        "decoder.layers.1.mlp.experts.experts.linear_fc2.weight": (EXPERTS, HIDDEN, EXPERT_WIDTH),
        "decoder.layers.1.mlp.shared_experts.linear_fc1.weight": (2 * EXPERT_WIDTH, HIDDEN),
        "mtp.layers.0.eh_proj.weight": (HIDDEN, 2 * HIDDEN),
        "mtp.layers.0.enorm.weight": (HIDDEN,),
        "mtp.layers.0.transformer_layer.self_attention.kv_layernorm.weight": (16,),
    }
    for key, shape in expected_shapes.items():
        assert tensors[key].global_shape == shape, key
    assert not any(key.startswith("decoder.layers.mlp") or "local_experts" in key for key in tensors)
    assert {
        "decoder.layers.0.self_attention.linear_kv_up_proj._extra_state/shard_0_1",
        f"decoder.layers.1.mlp.experts.experts.linear_fc2._extra_state/shard_3_{EXPERTS}",
        "mtp.layers.0.eh_proj._extra_state/shard_0_1",
    } <= objects


def test_from_rank_offsets_places_the_block():
    block = ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), (2, 2, 4), prepend_axis_num=1)
    assert (block.global_shape, block.global_offset) == ((1, 3, 16), (0, 0, 8))
    assert ShardedObject("rng_state", None, (2, 2), (1, 0)).unique_key == "rng_state/shard_1.0_2.2"


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_and_objects_never_run_code(tmp_path):
    directory = tmp_path / "iter_0000001"
    dist_checkpointing.save({"w": ShardedTensor("w", torch.ones(2), (2,), (0,)), "rng": ShardedObject("rng", 1)}, str(directory))
    marker = tmp_path / "pwned"
    (directory / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata"):
        dist_checkpointing.read_checkpoint_metadata(str(directory))
    assert not marker.exists()

    other = tmp_path / "iter_0000002"
    dist_checkpointing.save({"rng": ShardedObject("rng", _RunsCode(marker))}, str(other))
    with pytest.raises(UnsafeCheckpointError, match="rng/shard_0_1"):
        dist_checkpointing.load({"rng": ShardedObject("rng", None)}, str(other))
    assert not marker.exists()
