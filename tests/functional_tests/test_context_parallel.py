"""Context parallelism end to end from pretrain_gpt.py flags (CPU, gloo): CP=2 and CP=4 runs train like the
CP=1 run (losses, grad norms and final weights), and CP=2 checkpoints resume exactly at CP=2 and with the same
losses at CP=1.

Every run uses the three attention algorithms (one per layer, --cp-comm-type p2p all_gather a2a p2p); the
distributed optimizer (sharded over data x context parallel ranks) and --eod-mask-loss (a different token count
on each CP rank) are on in every run so that the loss and gradient reductions are exercised too, and the MLPs
are routed experts with a large aux-loss coefficient (whose gradient scale must undo the averaging over CP).
Four-rank layouts: CP=4; CP=2 x TP=2 with sequence parallel (a vocabulary padded to the CP=1 run's size);
CP=2 x PP=2 on the interleaved schedule (the pipeline messages carry a CP rank's share of the sequence).
A tiny DeepSeek-style model (multi-latent attention with YaRN, sigmoid group routing with expert bias, the
sequence aux loss) trains at CP=2 like at CP=1.
"""

import re

import pytest
import torch

from megatron.training.checkpointing import get_checkpoint_name
from tests.functional_tests.training_runs import (
    LLAMA_TINY,
    gpt2_dataset,
    iteration_records,
    lm_losses,
    require_data_pipeline,
    run_pretrain,
    training_flags,
)

require_data_pipeline()

TRAIN_ITERS = 6
SAVE_INTERVAL = 3
COMM_TYPE_PER_LAYER = ["--cp-comm-type", "p2p", "all_gather", "a2a", "p2p"]
# Losses are logged with 7 significant digits (~1e-5 at a loss of 10): allow that rounding on top of 1e-5.
LOSS_TOLERANCE = 1.5e-5
GRAD_NORM_LOGGED_UNIT = 1e-3
WEIGHT_ABSOLUTE_TOLERANCE = 1e-4  # as the data-parallel and MoE tests: Adam amplifies summation-order noise
MLA_TINY = [
    "--num-layers", 2, "--hidden-size", 32, "--ffn-hidden-size", 64, "--num-attention-heads", 4,
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--norm-epsilon", 1e-6, "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--seq-length", 32, "--max-position-embeddings", 32,
    "--multi-latent-attention", "--q-lora-rank", 16, "--kv-lora-rank", 16, "--qk-head-dim", 8,
    "--qk-pos-emb-head-dim", 8, "--v-head-dim", 12, "--qk-layernorm", "--rotary-scaling-factor", 4, "--mscale", 1,
    "--mscale-all-dim", 1, "--original-max-position-embeddings", 8,
    "--moe-ffn-hidden-size", 16, "--n-shared-experts", 1, "--first-k-dense-replace", 1,
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", 1e-2,
    "--moe-router-num-groups", 2, "--moe-router-group-topk", 1, "--moe-router-topk-scaling-factor", 2.5,
    "--moe-router-load-balancing-type", "seq_aux_loss",
]


def _flags(data_path, *extra, model=LLAMA_TINY):
    return training_flags(
        data_path, "mcore", "--num-layers", 4, "--train-iters", TRAIN_ITERS, "--use-cpu-initialization",
        "--attention-dropout", 0, "--hidden-dropout", 0, "--eod-mask-loss", "--use-distributed-optimizer",
        "--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", 1.0, *extra, model=model,
    )


def _assert_losses_close(actual, expected):
    assert actual and set(actual) <= set(expected)
    for iteration, loss in actual.items():
        assert loss == pytest.approx(expected[iteration], abs=LOSS_TOLERANCE), iteration


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _train(flags, nproc=1):
    result = run_pretrain(flags, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def single_rank_run(data_path, tmp_path_factory):
    """(stdout, save directory) of the CP=1 run, saved at its last iteration."""
    save_dir = tmp_path_factory.mktemp("cp1")
    return _train([*_flags(data_path), "--save", save_dir]), save_dir


@pytest.fixture(scope="module")
def context_parallel_save(data_path, tmp_path_factory):
    """(stdout, save directory) of a CP=2 run, one attention algorithm per layer, saved every 3 iterations."""
    save_dir = tmp_path_factory.mktemp("cp2")
    flags = _flags(
        data_path, "--context-parallel-size", 2, *COMM_TYPE_PER_LAYER,
        "--save", save_dir, "--save-interval", SAVE_INTERVAL,
    )
    return _train(flags, nproc=2), save_dir


def _grad_norms(stdout):
    records = iteration_records(stdout).items()
    return {iteration: float(re.search(r"grad norm: (\S+) \|", line).group(1)) for iteration, line in records}


def _assert_trains_like(stdout, reference_stdout):
    """Every iteration logged, with the reference's losses and grad norms (logged with 3 decimals)."""
    losses = lm_losses(stdout)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    _assert_losses_close(losses, lm_losses(reference_stdout))
    expected_norms = _grad_norms(reference_stdout)
    for iteration, norm in _grad_norms(stdout).items():
        assert norm == pytest.approx(expected_norms[iteration], abs=GRAD_NORM_LOGGED_UNIT), iteration


def _final_weights(save_dir):
    path = get_checkpoint_name(str(save_dir), TRAIN_ITERS, pipeline_parallel=False, tensor_rank=0)
    state = torch.load(path, weights_only=False)["model"]
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def _assert_same_weights(save_dir, reference_dir):
    weights, expected = _final_weights(save_dir), _final_weights(reference_dir)
    assert weights.keys() == expected.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=WEIGHT_ABSOLUTE_TOLERANCE, msg=name)


def test_context_parallel_trains_like_single_rank(single_rank_run, context_parallel_save):
    _assert_trains_like(context_parallel_save[0], single_rank_run[0])
    _assert_same_weights(context_parallel_save[1], single_rank_run[1])


def test_context_parallel_size_4_trains_like_single_rank(data_path, single_rank_run, tmp_path):
    flags = [*_flags(data_path, "--context-parallel-size", 4, *COMM_TYPE_PER_LAYER), "--save", tmp_path]
    stdout = _train(flags, nproc=4)
    _assert_trains_like(stdout, single_rank_run[0])
    _assert_same_weights(tmp_path, single_rank_run[1])


@pytest.mark.parametrize(
    "layout",
    [
        # The vocabulary padded to the CP=1 run's size (a multiple of 64 x TP = 128 rows).
        ["--tensor-model-parallel-size", 2, "--sequence-parallel", "--make-vocab-size-divisible-by", 64],
        ["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1],
    ],
    ids=["tp2-sp", "pp2-interleaved"],
)
def test_context_parallel_size_2_with_model_parallelism_trains_like_single_rank(data_path, single_rank_run, layout):
    flags = _flags(data_path, "--context-parallel-size", 2, *layout, *COMM_TYPE_PER_LAYER)
    _assert_trains_like(_train(flags, nproc=4), single_rank_run[0])


def test_multi_latent_attention_at_cp2_trains_like_cp1(data_path, tmp_path_factory):
    """MLA with YaRN (value heads wider than query/key heads) and DeepSeek routing: RoPE on global positions,
    the router's expert-bias counts and the sequence aux loss over the whole sequence."""
    saves = {cp: tmp_path_factory.mktemp(f"mla_cp{cp}") for cp in (1, 2)}
    runs = {
        cp: _train(
            [
                *_flags(data_path, "--context-parallel-size", cp, *COMM_TYPE_PER_LAYER, model=MLA_TINY),
                "--save", saves[cp],
            ],
            nproc=cp,
        )
        for cp in (1, 2)
    }
    _assert_trains_like(runs[2], runs[1])
    _assert_same_weights(saves[2], saves[1])


def test_context_parallel_resume_is_exact(data_path, context_parallel_save):
    stdout, save_dir = context_parallel_save
    resumed = run_pretrain(
        _flags(
            data_path, "--context-parallel-size", 2, *COMM_TYPE_PER_LAYER,
            "--load", save_dir, "--ckpt-step", SAVE_INTERVAL,
        ),
        nproc=2,
    )
    assert resumed.returncode == 0, resumed.stderr
    expected, records = iteration_records(stdout), iteration_records(resumed.stdout)
    assert sorted(records) == list(range(SAVE_INTERVAL + 1, TRAIN_ITERS + 1))
    for iteration, record in records.items():
        assert record == expected[iteration]


def test_context_parallel_checkpoint_resumes_on_one_rank(data_path, single_rank_run, context_parallel_save):
    _, save_dir = context_parallel_save
    resumed = run_pretrain(_flags(data_path, "--load", save_dir, "--ckpt-step", SAVE_INTERVAL))
    assert resumed.returncode == 0, resumed.stderr
    losses = lm_losses(resumed.stdout)
    assert sorted(losses) == list(range(SAVE_INTERVAL + 1, TRAIN_ITERS + 1))
    _assert_losses_close(losses, lm_losses(single_rank_run[0]))
