"""_validate_data_parallel_args: each inconsistent sequence/data-parallel flag combination gives its message
before any process group forms."""

import pytest

from megatron.training.arguments import ArgumentsError, parse_args, validate_args

BASE = (
    "--num-layers 2 --hidden-size 48 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 1 --train-iters 2 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100"
)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--overlap-param-gather", "--overlap-param-gather needs --use-distributed-optimizer"),
        ("--sequence-parallel", "sequence_parallel shards along the sequence over tensor-parallel ranks"),
        ("--use-legacy-models --sequence-parallel", "sequence_parallel shards along the sequence over tensor-parallel ranks"),
    ],
)
def test_inconsistent_flags_give_one_message(monkeypatch, extra, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(args_list=f"{BASE} {extra}".split())
    with pytest.raises(ArgumentsError, match=message):
        validate_args(args)


def test_distributed_optimizer_flags_are_accepted(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = validate_args(parse_args(args_list=f"{BASE} --use-distributed-optimizer --overlap-grad-reduce".split()))
    assert args.use_distributed_optimizer and args.data_parallel_size == 2
