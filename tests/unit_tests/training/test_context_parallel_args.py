"""Context-parallel flags: what each inconsistent combination says before any process group forms, the
data-parallel size they leave, and MindSpeed's --context-parallel-algo names."""

import pytest

from megatron.training.arguments import ArgumentsError, parse_args, validate_args

BASE = (
    "--num-layers 2 --hidden-size 48 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 1 --train-iters 2 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100 "
    "--attention-dropout 0"
)


def _validated(extra):
    return validate_args(parse_args(args_list=f"{BASE} {extra}".split()))


@pytest.fixture
def world_of(monkeypatch):
    def world(size):
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("RANK", "0")

    return world


@pytest.mark.parametrize(
    "extra, world_size, message",
    [
        ("--context-parallel-size 2", 3, "world size 3 is not divisible by tensor x pipeline x --context-parallel-size 2"),
        ("--context-parallel-size 0", 1, "--context-parallel-size must be at least 1"),
        ("--context-parallel-size 2 --seq-length 30", 2, "--seq-length 30 is not divisible by 2 x --context-parallel-size = 4"),
        (
            "--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel --seq-length 36",
            4,
            "--seq-length 36 is not divisible by 2 x --context-parallel-size x --tensor-model-parallel-size "
            "(sequence parallel) = 8",
        ),
        ("--context-parallel-size 2 --reset-attention-mask", 2, "--reset-attention-mask with --context-parallel-size 2 is not supported"),
        ("--context-parallel-size 2 --reset-position-ids", 2, "--reset-position-ids with --context-parallel-size 2 is not supported"),
        ("--context-parallel-size 2 --attention-dropout 0.1", 2, "context-parallel attention has no dropout; set --attention-dropout 0"),
        ("--context-parallel-size 2 --use-legacy-models", 2, "--context-parallel-size 2 needs the mcore stack"),
        ("--context-parallel-size 2 --cp-comm-type ring", 2, "--cp-comm-type 'ring' is not supported; choose one of p2p, all_gather, a2a"),
        ("--context-parallel-size 2 --cp-comm-type p2p a2a all_gather", 2, "--cp-comm-type lists 3 types for 2 layers"),
        ("--context-parallel-size 8 --cp-comm-type a2a --seq-length 48", 8, "splits the 4 attention heads of a tensor-parallel rank over --context-parallel-size 8"),
        ("--context-parallel-size 2 --context-parallel-algo hybrid_cp_algo", 2, "--context-parallel-algo hybrid_cp_algo is not supported"),
        (
            "--context-parallel-size 2 --context-parallel-algo ulysses_cp_algo --cp-comm-type p2p",
            2,
            "--context-parallel-algo ulysses_cp_algo means --cp-comm-type a2a, but --cp-comm-type is p2p",
        ),
    ],
)
def test_inconsistent_flags_give_one_message(world_of, extra, world_size, message):
    world_of(world_size)
    with pytest.raises(ArgumentsError) as error:
        _validated(extra)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_context_parallel_ranks_leave_the_data_parallel_size(world_of):
    world_of(8)
    args = _validated("--context-parallel-size 2 --tensor-model-parallel-size 2")
    assert args.data_parallel_size == 2 and args.cp_comm_type == "p2p"


@pytest.mark.parametrize(
    "extra, comm_type",
    [
        ("--cp-comm-type all_gather", "all_gather"),
        ("--cp-comm-type p2p a2a", ["p2p", "a2a"]),
        ("--context-parallel-algo megatron_cp_algo", "p2p"),
        ("--context-parallel-algo ulysses_cp_algo", "a2a"),
        ("--context-parallel-algo kvallgather_cp_algo --cp-comm-type all_gather", "all_gather"),
    ],
)
def test_comm_type_flags(world_of, extra, comm_type):
    world_of(2)
    args = _validated(f"--context-parallel-size 2 {extra}")
    assert args.cp_comm_type == comm_type
