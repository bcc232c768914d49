"""Tensor, sequence and data parallelism (with and without the distributed optimizer) against the
single-process run of the same model and data: per-iteration losses and grad norms agree, checkpoints of
the distributed optimizer resume at another data-parallel size, and mismatched layouts are refused.

gloo on loopback, CPU, fp32, dropout off, `--use-cpu-initialization` so every layout starts from the same
full weights. The padded vocabulary is held equal at every tensor-parallel size (50304 for GPT-2)."""

import re

import pytest
import torch

from megatron.training.checkpointing import get_checkpoint_name
from tests.functional_tests.training_runs import gpt2_dataset, iteration_records, require_data_pipeline, run_pretrain, training_flags

require_data_pipeline()

TRAIN_ITERS = 10
RELATIVE_TOLERANCE = 1e-5
GRAD_NORM_LOGGED_UNIT = 1e-3
# Adam turns summation-order noise in near-zero gradients (rare tokens' embedding rows) into updates of
# up to ~2e-5 after 10 steps; 1e-4 is still a hundredth of one step at lr 1e-2.
WEIGHT_ABSOLUTE_TOLERANCE = 1e-4
EXACT_INIT = ["--use-cpu-initialization", "--attention-dropout", "0", "--hidden-dropout", "0"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _flags(data_path, stack, tensor_parallel=1, *extra):
    """Same padded vocabulary at every TP size: --make-vocab-size-divisible-by x TP stays 128."""
    return training_flags(
        data_path, stack, "--train-iters", TRAIN_ITERS, *EXACT_INIT,
        "--tensor-model-parallel-size", tensor_parallel, "--make-vocab-size-divisible-by", 128 // tensor_parallel,
        *extra,
    )


def _loss_and_grad_norm(stdout):
    """{iteration: (lm loss, grad norm)} as logged."""
    return {
        iteration: (
            float(re.search(r"lm loss: (\S+) \|", line).group(1)),
            float(re.search(r"grad norm: (\S+) \|", line).group(1)),
        )
        for iteration, line in iteration_records(stdout).items()
    }


def _train(flags, nproc):
    result = run_pretrain(flags, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = _loss_and_grad_norm(result.stdout)
    assert sorted(records) == list(range(1, TRAIN_ITERS + 1)), result.stdout
    return records


def _assert_close(records, reference):
    """Losses are logged to 7 significant digits; grad norms to 3 decimals, so a last-digit rounding flip
    (one logged unit) is within the tolerance there."""
    for iteration, (loss, grad_norm) in reference.items():
        assert records[iteration][0] == pytest.approx(loss, rel=RELATIVE_TOLERANCE), iteration
        assert records[iteration][1] == pytest.approx(grad_norm, rel=RELATIVE_TOLERANCE, abs=GRAD_NORM_LOGGED_UNIT), iteration


def _final_weights(save_dir):
    state = torch.load(get_checkpoint_name(str(save_dir), TRAIN_ITERS, pipeline_parallel=False, tensor_rank=0), weights_only=False)
    return {name: value for name, value in state["model"].items() if isinstance(value, torch.Tensor)}


def _assert_same_weights(save_dir, reference_dir):
    weights, reference = _final_weights(save_dir), _final_weights(reference_dir)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=RELATIVE_TOLERANCE, atol=WEIGHT_ABSOLUTE_TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def single_process(data_path, tmp_path_factory):
    """{stack: (per-iteration (loss, grad norm), checkpoint directory)} of the one-process run."""
    runs = {}
    for stack in ("mcore", "legacy"):
        save_dir = tmp_path_factory.mktemp(f"single-{stack}")
        runs[stack] = (_train([*_flags(data_path, stack), "--save", save_dir], nproc=1), save_dir)
    return runs


LAYOUTS = [
    ("mcore", 2, []),
    ("mcore", 2, ["--sequence-parallel"]),
    ("mcore", 1, []),
    ("mcore", 1, ["--use-distributed-optimizer"]),
    ("mcore", 1, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]),
    ("mcore", 1, ["--overlap-grad-reduce", "--ddp-bucket-size", 20000]),
    ("legacy", 2, []),
    ("legacy", 2, ["--sequence-parallel"]),
    ("legacy", 1, []),
]


@pytest.mark.parametrize(
    "stack, tensor_parallel, extra",
    LAYOUTS,
    ids=["mcore-tp2", "mcore-tp2-sp", "mcore-dp2", "mcore-dp2-distopt", "mcore-dp2-distopt-overlap-grad-and-param", "mcore-dp2-overlap", "legacy-tp2", "legacy-tp2-sp", "legacy-dp2"],
)
def test_two_ranks_match_the_single_process_run(data_path, single_process, tmp_path, stack, tensor_parallel, extra):
    """Two ranks: TP2 when tensor_parallel is 2, else DP2 (whose saved weights must also match)."""
    reference, reference_dir = single_process[stack]
    records = _train([*_flags(data_path, stack, tensor_parallel, *extra), "--save", tmp_path], nproc=2)
    _assert_close(records, reference)
    if tensor_parallel == 1:
        _assert_same_weights(tmp_path, reference_dir)


def test_distributed_optimizer_checkpoint_resumes_at_another_data_parallel_size(data_path, single_process, tmp_path):
    save_dir = tmp_path / "dp2"
    flags = _flags(data_path, "mcore", 1, "--use-distributed-optimizer")
    saved = _train([*flags, "--save", save_dir, "--save-interval", 5], nproc=2)
    _assert_close(saved, single_process["mcore"][0])
    checkpoint_directory = get_checkpoint_name(str(save_dir), 5, return_base_dir=True)
    sharded_state = torch.load(f"{checkpoint_directory}/mp_rank_00/distrib_optim.pt", weights_only=False)
    assert {"param", "exp_avg", "exp_avg_sq"} <= set(sharded_state["buffers"][0])

    resumed = run_pretrain([*flags, "--load", save_dir, "--ckpt-step", 5, "--save", tmp_path / "dp1"], nproc=1)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = _loss_and_grad_norm(resumed.stdout)
    assert sorted(records) == list(range(6, TRAIN_ITERS + 1)), resumed.stdout
    _assert_close(records, {iteration: saved[iteration] for iteration in records})

    whole_optimizer = run_pretrain([*_flags(data_path, "mcore"), "--load", save_dir], nproc=1)
    assert whole_optimizer.returncode != 0
    assert "was saved with --use-distributed-optimizer but this run is without it" in whole_optimizer.stderr + whole_optimizer.stdout


def test_loading_at_another_tensor_parallel_layout_names_both_and_the_converter(data_path, tmp_path):
    save_dir = tmp_path / "tp1"
    run = run_pretrain([*_flags(data_path, "mcore"), "--train-iters", 3, "--save", save_dir], nproc=1)
    assert run.returncode == 0, run.stderr
    mismatched = run_pretrain([*_flags(data_path, "mcore", 2), "--load", save_dir], nproc=2)
    output = mismatched.stdout + mismatched.stderr
    assert mismatched.returncode != 0
    assert "saved at tensor-parallel 1 x pipeline-parallel 1 but this run uses tensor-parallel 2 x pipeline-parallel 1" in output
    assert "tools/checkpoint/convert.py" in output and "--target-tensor-parallel-size 2" in output
