"""MoE training with expert parallelism against the single-process run of the same model and data: two ranks
at EP=2 (all-to-all and all-gather dispatchers, the distributed optimizer) log the same losses, aux losses and
grad norms and end with the same weights; their checkpoint has Megatron's mp_rank_TT_EEE layout with local
expert numbers, and tools/checkpoint/convert.py re-shards it to EP=1, where training resumes.

gloo on loopback, CPU, fp32, dropout off, --use-cpu-initialization (every expert is drawn from its own stream,
so all layouts start from the same weights), aux loss, z-loss and the expert bias on."""

import re
import subprocess
import sys

import pytest
import torch

from megatron.training.checkpointing import get_checkpoint_name
from tests.conftest import REPO_ROOT
from tests.functional_tests.training_runs import gpt2_dataset, iteration_records, require_data_pipeline, run_pretrain, training_flags

require_data_pipeline()

TRAIN_ITERS = 10
RELATIVE_TOLERANCE = 1e-5
GRAD_NORM_LOGGED_UNIT = 1e-3
WEIGHT_ABSOLUTE_TOLERANCE = 1e-4  # as the data-parallel tests: Adam amplifies summation-order noise
MOE = [
    "--num-experts", 4, "--moe-router-topk", 2, "--moe-ffn-hidden-size", 32, "--moe-layer-freq", "([0]*1+[1]*1)",
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", 1e-2,
    "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", 1e-2, "--moe-z-loss-coeff", 1e-3,
    "--use-cpu-initialization", "--attention-dropout", 0, "--hidden-dropout", 0,
]
LOGGED = ("lm loss", "load_balancing_loss", "z_loss", "grad norm")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _flags(data_path, *extra):
    return training_flags(data_path, "mcore", "--train-iters", TRAIN_ITERS, *MOE, *extra)


def _train(flags, nproc):
    result = run_pretrain(flags, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = {
        iteration: {name: float(re.search(rf" {name}: (\S+) \|", line).group(1)) for name in LOGGED}
        for iteration, line in iteration_records(result.stdout).items()
    }
    assert records and max(records) == TRAIN_ITERS, result.stdout
    return records


# The z-loss squares the router logits' logsumexp: after a few Adam steps it shows summation-order noise first.
Z_LOSS_RELATIVE_TOLERANCE = 1e-4


def _assert_close(records, reference):
    for iteration, logged in records.items():
        for name, value in logged.items():
            absolute = GRAD_NORM_LOGGED_UNIT if name == "grad norm" else 0
            relative = Z_LOSS_RELATIVE_TOLERANCE if name == "z_loss" else RELATIVE_TOLERANCE
            assert value == pytest.approx(reference[iteration][name], rel=relative, abs=absolute), (iteration, name)


def _model_state(path):
    state = torch.load(path, weights_only=False)["model"]
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


@pytest.fixture(scope="module")
def single_process(data_path, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("ep1")
    return _train([*_flags(data_path), "--save", save_dir], nproc=1), save_dir


@pytest.fixture(scope="module")
def expert_parallel(data_path, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("ep2")
    flags = _flags(data_path, "--expert-model-parallel-size", 2, "--moe-token-dispatcher-type", "alltoall")
    return _train([*flags, "--save", save_dir, "--save-interval", 5], nproc=2), save_dir


def test_expert_parallel_matches_the_single_process_run(single_process, expert_parallel):
    (reference, reference_dir), (records, save_dir) = single_process, expert_parallel
    _assert_close(records, reference)
    assert reference[TRAIN_ITERS]["load_balancing_loss"] > 0 and reference[TRAIN_ITERS]["z_loss"] > 0
    whole = _model_state(get_checkpoint_name(str(reference_dir), TRAIN_ITERS, pipeline_parallel=False, tensor_rank=0))
    prefix = "decoder.layers.1.mlp."
    for expert_rank in range(2):
        path = get_checkpoint_name(str(save_dir), TRAIN_ITERS, False, False, 0, 0, True, expert_rank)
        assert path.endswith(f"mp_rank_00_{expert_rank:03d}/model_optim_rng.pt")
        state = _model_state(path)
        experts = {name for name in state if ".local_experts." in name}
        assert {name.split(".local_experts.")[1].split(".")[0] for name in experts} == {"0", "1"}
        for name, value in state.items():
            global_name = re.sub(r"local_experts\.(\d+)", lambda m: f"local_experts.{2 * expert_rank + int(m.group(1))}", name)
            torch.testing.assert_close(value, whole[global_name], rtol=RELATIVE_TOLERANCE, atol=WEIGHT_ABSOLUTE_TOLERANCE, msg=name)
        assert torch.count_nonzero(state[prefix + "router.expert_bias"]) > 0


# Tensor parallelism inside MoE layers: sequence parallel, and a vocabulary padded to the single process's size.
TENSOR_PARALLEL = ["--tensor-model-parallel-size", 2, "--sequence-parallel", "--make-vocab-size-divisible-by", 64]


@pytest.mark.parametrize(
    "extra, nproc",
    [
        (["--expert-model-parallel-size", 2, "--use-distributed-optimizer"], 2),
        (["--pipeline-model-parallel-size", 2], 2),
        # Whole experts (ETP=1) on both tensor-parallel ranks: expert gradients summed over them.
        ([*TENSOR_PARALLEL, "--expert-tensor-parallel-size", 1], 2),
        # EP=2 x TP=2 (ETP=2 by default): each expert split over two ranks, tokens gathered to both slices.
        ([*TENSOR_PARALLEL, "--expert-model-parallel-size", 2, "--moe-token-dispatcher-type", "alltoall"], 4),
        # Experts folded over the context-parallel ranks (EP larger than DP).
        (["--context-parallel-size", 2, "--expert-model-parallel-size", 2, "--moe-token-dispatcher-type", "alltoall"], 2),
    ],
    ids=["ep2-distopt-allgather", "pp2-dense-and-moe-stages", "tp2-etp1", "ep2-tp2-alltoall", "cp2-ep2"],
)
def test_other_layouts_match_the_single_process_run(data_path, single_process, extra, nproc):
    _assert_close(_train(_flags(data_path, *extra), nproc=nproc), single_process[0])


def test_distributed_optimizer_checkpoint_resumes_at_ep2(data_path, single_process, tmp_path):
    """Each expert-parallel rank saves its experts' optimizer shards beside them (distrib_optim.pt)."""
    flags = _flags(data_path, "--expert-model-parallel-size", 2, "--use-distributed-optimizer")
    saved = run_pretrain([*flags, "--save", tmp_path, "--save-interval", 5, "--exit-interval", 5], nproc=2)
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    for expert_rank in range(2):
        assert (tmp_path / "iter_0000005" / f"mp_rank_00_{expert_rank:03d}" / "distrib_optim.pt").is_file()
    resumed = _train_from([*flags, "--load", tmp_path], nproc=2)
    assert sorted(resumed) == list(range(6, TRAIN_ITERS + 1))
    _assert_close(resumed, single_process[0])


def test_expert_parallel_checkpoint_resumes_at_ep1_after_conversion(data_path, expert_parallel, tmp_path):
    records, save_dir = expert_parallel
    converted = tmp_path / "ep1"
    conversion = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "checkpoint" / "convert.py"), "--load-model-type", "mg",
         "--save-model-type", "mg", "--load-dir", str(save_dir), "--save-dir", str(converted)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert conversion.returncode == 0, conversion.stderr
    # The converter keeps the weights (not the optimizer): both layouts resume from them with a fresh optimizer.
    resume = ["--finetune", "--train-iters", 3]
    at_ep1 = _train_from([*_flags(data_path), "--load", converted, *resume], nproc=1)
    at_ep2 = _train_from(
        [*_flags(data_path, "--expert-model-parallel-size", 2), "--load", save_dir, *resume], nproc=2
    )
    _assert_close(at_ep1, at_ep2)
    assert at_ep1[1]["lm loss"] < records[1]["lm loss"]  # resumed from trained weights, not a fresh model


def _train_from(flags, nproc):
    result = run_pretrain(flags, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        iteration: {name: float(re.search(rf" {name}: (\S+) \|", line).group(1)) for name in LOGGED}
        for iteration, line in iteration_records(result.stdout).items()
    }


def test_loading_at_another_expert_parallel_size_names_the_converter(data_path, expert_parallel):
    result = run_pretrain([*_flags(data_path), "--load", expert_parallel[1], "--train-iters", 11], nproc=1)
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "was saved at tensor-parallel 1 x pipeline-parallel 2 (or expert-parallel 2)" in output
    assert "--target-expert-parallel-size 1" in output
