"""A tiny DeepSeek-V3-style model trained from pretrain_gpt.py's flags alone: multi-latent attention with YaRN,
a dense first layer, then MoE layers with sigmoid routing, expert bias, group-limited top-k, a scaling factor,
a shared expert and the sequence aux loss, plus one multi-token prediction depth. Two gloo ranks at EP=2 log the single-process losses; a run killed with
SIGKILL after a save resumes to exactly the log lines and weights of the uninterrupted run."""

import re
import signal

import pytest
import torch

from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename
from tests.functional_tests.training_runs import (
    gpt2_dataset,
    iteration_records,
    require_data_pipeline,
    run_pretrain,
    run_until,
    training_flags,
)

require_data_pipeline()

TRAIN_ITERS = 6
DEEPSEEK_TINY = [
    "--num-layers", 2, "--hidden-size", 32, "--ffn-hidden-size", 64, "--num-attention-heads", 4,
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--norm-epsilon", 1e-6, "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--seq-length", 32, "--max-position-embeddings", 32,
    "--multi-latent-attention", "--q-lora-rank", 16, "--kv-lora-rank", 16, "--qk-head-dim", 8,
    "--qk-pos-emb-head-dim", 8, "--v-head-dim", 8, "--qk-layernorm", "--rotary-scaling-factor", 4, "--mscale", 1,
    "--mscale-all-dim", 1, "--original-max-position-embeddings", 8,
    "--num-experts", 4, "--moe-router-topk", 2, "--moe-ffn-hidden-size", 16, "--n-shared-experts", 1,
    "--first-k-dense-replace", 1, "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
    "--moe-router-bias-update-rate", 1e-2, "--moe-router-num-groups", 2, "--moe-router-group-topk", 1,
    "--moe-router-topk-scaling-factor", 2.5, "--moe-router-load-balancing-type", "seq_aux_loss",
    "--moe-aux-loss-coeff", 1e-3, "--mtp-num-layers", 1, "--mtp-loss-scaling-factor", 0.3,
    "--use-cpu-initialization", "--attention-dropout", 0, "--hidden-dropout", 0,
]
LOGGED = ("lm loss", "mtp_1 loss", "seq_load_balancing_loss", "grad norm")
EXPERT_PARALLEL = ["--expert-model-parallel-size", 2, "--moe-token-dispatcher-type", "alltoall"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _train(data_path, *extra, nproc):
    flags = training_flags(data_path, "mcore", "--train-iters", TRAIN_ITERS, *extra, model=DEEPSEEK_TINY)
    result = run_pretrain(flags, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return iteration_records(result.stdout)


def _values(records):
    return {
        iteration: {name: float(re.search(rf" {name}: (\S+) \|", line).group(1)) for name in LOGGED}
        for iteration, line in records.items()
    }


@pytest.fixture(scope="module")
def expert_parallel(data_path, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("ep2")
    return _train(data_path, *EXPERT_PARALLEL, "--save", save_dir, "--save-interval", 3, nproc=2), save_dir


@pytest.fixture(scope="module")
def single_process(data_path):
    return _values(_train(data_path, nproc=1))


def _assert_same_values(records, reference):
    assert sorted(records) == list(range(1, TRAIN_ITERS + 1))
    for iteration, logged in _values(records).items():
        for name, value in logged.items():
            absolute = 1e-3 if name == "grad norm" else 0  # logged with three decimals
            assert value == pytest.approx(reference[iteration][name], rel=1e-5, abs=absolute), (iteration, name)


def test_expert_parallel_matches_the_single_process_run(expert_parallel, single_process):
    records, save_dir = expert_parallel
    reference = single_process
    _assert_same_values(records, reference)
    assert reference[TRAIN_ITERS]["lm loss"] < reference[1]["lm loss"]
    assert reference[TRAIN_ITERS]["mtp_1 loss"] < reference[1]["mtp_1 loss"]
    path = get_checkpoint_name(str(save_dir), 3, False, False, 0, 0, True, 1)
    state = torch.load(path, weights_only=False)["model"]
    assert "decoder.layers.0.self_attention.linear_kv_down_proj.weight" in state
    assert "decoder.layers.0.mlp.linear_fc1.weight" in state and "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in state
    for router in ("decoder.layers.1.mlp.router", "mtp.layers.0.transformer_layer.mlp.router"):
        assert torch.count_nonzero(state[f"{router}.expert_bias"]) > 0  # three odd steps of +-rate
    assert "mtp.layers.0.eh_proj.weight" in state
    assert not any("rotary_pos_emb" in name and "self_attention" not in name for name in state)


def test_pipeline_parallel_with_the_prediction_depth_on_the_last_stage_matches_the_single_process_run(
    data_path, single_process
):
    """PP=2: the dense layer on the first stage, the MoE layer, the output layer and the prediction depth (with its
    copy of the word embeddings, tied to the first stage's) on the last; losses and grad norms as one process."""
    records = _train(data_path, "--pipeline-model-parallel-size", 2, nproc=2)
    _assert_same_values(records, single_process)


def test_tensor_and_sequence_parallel_match_the_single_process_run(data_path, single_process):
    """MLA heads (and the MoE and prediction layers) split over 2 tensor-parallel ranks with sequence parallelism
    train like one process (the vocabulary padded to the same 50304 rows: 64 x TP2 here, 128 there)."""
    records = _train(data_path, "--tensor-model-parallel-size", 2, "--sequence-parallel",
                     "--make-vocab-size-divisible-by", 64, nproc=2)
    _assert_same_values(records, single_process)


def _saved_models(save_dir, iteration):
    """{expert-parallel rank: model state} of a saved iteration."""
    return {
        rank: torch.load(get_checkpoint_name(str(save_dir), iteration, False, False, 0, 0, True, rank),
                         weights_only=False)["model"]
        for rank in range(2)
    }


def test_resume_after_sigkill_at_ep2_is_exact(data_path, expert_parallel, tmp_path):
    """Killed (SIGKILL, torchrun included) after the iteration-3 save, the EP=2 run resumes with the log lines and
    final weights of the uninterrupted run: prediction depth, expert biases and router state included."""
    records, reference_dir = expert_parallel
    flags = training_flags(data_path, "mcore", "--train-iters", TRAIN_ITERS, *EXPERT_PARALLEL, "--save", tmp_path,
                           "--load", tmp_path, "--save-interval", 3, model=DEEPSEEK_TINY)
    returncode, output = run_until(flags, r"^ iteration\s+4/", signal.SIGKILL, nproc=2)
    assert returncode == -signal.SIGKILL, output
    assert open(get_checkpoint_tracker_filename(str(tmp_path))).read() == "3"
    resumed = run_pretrain(flags, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    resumed_records = iteration_records(resumed.stdout)
    assert sorted(resumed_records) == [4, 5, 6]
    for iteration, line in resumed_records.items():
        assert line == records[iteration]
    expected, final = _saved_models(reference_dir, TRAIN_ITERS), _saved_models(tmp_path, TRAIN_ITERS)
    for rank, state in expected.items():
        tensors = [name for name, value in state.items() if isinstance(value, torch.Tensor)]
        assert "mtp.layers.0.transformer_layer.mlp.router.expert_bias" in tensors
        for name in tensors:
            assert torch.equal(state[name], final[rank][name]), (rank, name)
