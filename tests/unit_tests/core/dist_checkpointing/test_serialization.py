"""dist_checkpointing.save / load on one process: blocks land where their offsets say, a padded vocabulary
reads the overlap, and a wrong shape or a missing key fails in one line naming it."""

import pytest
import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import CheckpointingException, ShardedObject, ShardedTensor


@pytest.fixture
def saved(tmp_path):
    """A [4, 6] tensor written as two row blocks, a stacked [2, 3] tensor, an object and a common value."""
    whole = torch.arange(24.0).view(4, 6)
    state = {
        "top": ShardedTensor.from_rank_offsets("x.weight", whole[:2].clone(), (0, 0, 2)),
        "bottom": ShardedTensor.from_rank_offsets("x.weight", whole[2:].clone(), (0, 1, 2)),
        "layers": [
            ShardedTensor("layers.weight", torch.full((3,), float(layer)), (2, 3), (layer, 0), prepend_axis_num=1)
            for layer in range(2)
        ],
        "rng": ShardedObject("rng", {"seed": 5}),
        "iteration": 7,
    }
    directory = tmp_path / "iter_0000007"
    dist_checkpointing.save(state, str(directory))
    return directory, whole


def test_blocks_read_back_at_another_split(saved):
    directory, whole = saved
    middle = torch.zeros(2, 6)
    layer = torch.zeros(3)
    loaded = dist_checkpointing.load(
        {
            "middle": ShardedTensor("x.weight", middle, (4, 6), (1, 0)),
            "layer": ShardedTensor("layers.weight", layer, (2, 3), (1, 0), prepend_axis_num=1),
            "rng": ShardedObject("rng", None),
        },
        str(directory),
    )
    assert torch.equal(middle, whole[1:3]) and torch.equal(layer, torch.ones(3))
    assert loaded["rng"] == {"seed": 5} and loaded["iteration"] == 7 and loaded["middle"] is middle
    assert dist_checkpointing.check_is_distributed_checkpoint(str(directory))


def test_padded_vocabulary_reads_the_overlapping_rows(saved):
    directory, whole = saved
    padded = torch.full((5, 6), -1.0)
    dist_checkpointing.load({"x": ShardedTensor("x.weight", padded, (5, 6), (0, 0), allow_shape_mismatch=True)}, str(directory))
    assert torch.equal(padded[:4], whole) and torch.equal(padded[4], torch.full((6,), -1.0))


def test_wrong_shape_and_missing_key_fail_in_one_line(saved):
    directory, _ = saved
    with pytest.raises(CheckpointingException, match=r"tensor x\.weight has global shape \(4, 6\) in the checkpoint but \(4, 8\)"):
        dist_checkpointing.load({"x": ShardedTensor("x.weight", torch.zeros(4, 8), (4, 8), (0, 0))}, str(directory))
    with pytest.raises(CheckpointingException, match=r"has no tensor y\.weight .*global shape \(2,\)"):
        dist_checkpointing.load({"y": ShardedTensor("y.weight", torch.zeros(2), (2,), (0,))}, str(directory))
