"""Pipeline parallelism end to end: pretrain_gpt.py under torchrun (gloo, CPU, fp32, dropout off,
--use-cpu-initialization) gives the per-iteration losses and grad norms of the single-process run for 10
iterations, at every pipeline layout and for both stacks; a layout that cannot run fails with its message."""

import re

import pytest

from tests.functional_tests.training_runs import gpt2_dataset, require_data_pipeline, run_pretrain, training_flags

require_data_pipeline()
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

ITERATIONS = 10
TOLERANCE = 1e-5
COMMON = [
    "--num-layers", "4", "--train-iters", ITERATIONS, "--use-cpu-initialization",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--distributed-timeout-minutes", "1",
    "--tensorboard-log-interval", "1", "--eval-interval", "5", "--eval-iters", "1",
]
# TP2 pads the vocabulary to a multiple of divisible-by x TP: halve it so every layout has the same vocabulary.
TP2 = ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("pipeline_data"))


def _flags(data_path, stack, tied, *extra):
    flags = training_flags(data_path, stack, *COMMON, *extra)
    if tied:
        flags.remove("--untie-embeddings-and-output-weights")
    return flags


def _curves(tensorboard_dir):
    """{iteration: (lm loss, grad norm)} as the last rank wrote them to TensorBoard (full float32)."""
    events = event_accumulator.EventAccumulator(str(tensorboard_dir))
    events.Reload()
    losses = {event.step: event.value for event in events.Scalars("lm loss")}
    norms = {event.step: event.value for event in events.Scalars("grad-norm")}
    return {step: (losses[step], norms[step]) for step in sorted(losses)}


def _validation_losses(stdout):
    """[(where, lm loss value)] of every printed validation/test result."""
    return [
        (where, float(value))
        for where, value in re.findall(r"^ validation loss at (.*?) \| lm loss value: (\S+) \|", stdout, re.MULTILINE)
    ]


def _train(tmp_path, name, flags, nproc):
    tensorboard_dir = tmp_path / name
    result = run_pretrain([*flags, "--tensorboard-dir", tensorboard_dir], nproc=nproc, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout, _curves(tensorboard_dir)


_BASELINES = {}


def _baseline(tmp_path_factory, data_path, stack, tied, tensor_parallel):
    """The unpipelined run (one process, or TP2 alone), trained once per variant for the whole module."""
    key = (stack, tied, tensor_parallel)
    if key not in _BASELINES:
        directory = tmp_path_factory.mktemp(f"baseline_{stack}_{tied}_{tensor_parallel}")
        extra = TP2 if tensor_parallel else []
        _BASELINES[key] = _train(directory, "tb", _flags(data_path, stack, tied, *extra), nproc=2 if tensor_parallel else 1)
    return _BASELINES[key]


# layout: (stack, tied embeddings, processes, flags, with TP2)
LAYOUTS = {
    "pp2_1f1b": ("mcore", False, 2, ["--pipeline-model-parallel-size", "2"], False),
    "pp2_interleaved": (
        "mcore", False, 2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], False
    ),
    "tp2_sp_pp2": ("mcore", False, 4, ["--pipeline-model-parallel-size", "2", *TP2, "--sequence-parallel"], True),
    "pp2_uneven": (
        "mcore", False, 2, ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"], False
    ),
    "pp2_tied_embeddings": ("mcore", True, 2, ["--pipeline-model-parallel-size", "2"], False),
    "legacy_pp2": ("legacy", False, 2, ["--pipeline-model-parallel-size", "2"], False),
    "legacy_pp2_interleaved": (
        "legacy", True, 2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], False
    ),
}


def _assert_same_curves(actual, expected, layout, compare_grad_norms=True):
    assert sorted(actual) == list(range(1, ITERATIONS + 1))
    for iteration, (loss, grad_norm) in expected.items():
        assert actual[iteration][0] == pytest.approx(loss, rel=TOLERANCE), (layout, iteration)
        if compare_grad_norms:
            assert actual[iteration][1] == pytest.approx(grad_norm, rel=TOLERANCE), (layout, iteration)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_matches_single_process(tmp_path, tmp_path_factory, data_path, layout):
    """With TP2 the grad norm itself moves by ~1e-5 relative from the one-process run (tensor-parallel
    partial sums round differently, and Adam amplifies it); there the pipeline is held to the TP2 run's
    grad norms and losses at 1e-5, and to the one-process losses."""
    stack, tied, nproc, extra, tensor_parallel = LAYOUTS[layout]
    stdout, actual = _train(tmp_path, "tb", _flags(data_path, stack, tied, *extra), nproc=nproc)
    single_stdout, single_curves = _baseline(tmp_path_factory, data_path, stack, tied, False)
    _assert_same_curves(actual, single_curves, layout, not tensor_parallel)
    if tensor_parallel:
        _assert_same_curves(actual, _baseline(tmp_path_factory, data_path, stack, tied, True)[1], layout)
    else:
        # Forward-only evaluation runs the same schedules: the same validation and test losses.
        expected_validation = _validation_losses(single_stdout)
        assert [where for where, _ in _validation_losses(stdout)] == [where for where, _ in expected_validation] != []
        assert [loss for _, loss in _validation_losses(stdout)] == pytest.approx(
            [loss for _, loss in expected_validation], rel=TOLERANCE
        )
    # The loss lives on the last stage and is printed once per iteration, by the last rank.
    assert stdout.count(f" iteration {ITERATIONS:>8}/{ITERATIONS:>8} |") == 1


def test_interleaved_checkpoint_resumes_like_an_uninterrupted_run(tmp_path, tmp_path_factory, data_path):
    """Each pipeline rank saves its chunks to mp_rank_00_PPP; resuming continues the single-process curve."""
    flags = _flags(data_path, "mcore", False, "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1")
    save_dir = tmp_path / "checkpoints"
    _train(tmp_path, "first", [*flags, "--save", save_dir, "--save-interval", "5", "--exit-interval", "5"], nproc=2)
    assert sorted(path.name for path in (save_dir / "iter_0000005").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    _, resumed = _train(tmp_path, "resumed", [*flags, "--load", save_dir], nproc=2)
    expected = _baseline(tmp_path_factory, data_path, "mcore", False, False)[1]
    assert sorted(resumed) == list(range(6, ITERATIONS + 1))
    for iteration, (loss, grad_norm) in resumed.items():
        assert (loss, grad_norm) == pytest.approx(expected[iteration], rel=TOLERANCE), iteration


INVALID = {
    "layers_not_divisible": (
        ["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
        "num_layers 3 is not divisible by the pipeline-parallel size 2",
    ),
    "virtual_stage_does_not_divide": (
        ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
        "--num-layers-per-virtual-pipeline-stage 3 must divide the 2 layers of each pipeline stage",
    ),
    "too_few_microbatches": (
        ["--pipeline-model-parallel-size", "2", "--global-batch-size", "2"],
        "1 micro batches per step",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_pipeline_layout_fails_with_its_message(data_path, case):
    extra, message = INVALID[case]
    flags = _flags(data_path, "mcore", False, *extra)
    result = run_pretrain(flags, nproc=2, timeout=120)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
