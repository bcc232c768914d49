"""pretrain_gpt.py with --ckpt-format torch_dist: exact resume, resharding on load (TP2 x PP2 -> TP1 -> EP2, a
pipeline change, the other stack), --async-save killed mid-way, and damaged shard files."""

import os
import re
import signal

import pytest

from tests.functional_tests.training_runs import (
    gpt2_dataset,
    lm_losses,
    require_data_pipeline,
    run_pretrain,
    run_until,
    training_flags,
)

require_data_pipeline()

EXACT = ["--use-cpu-initialization", "--attention-dropout", 0, "--hidden-dropout", 0, "--ckpt-format", "torch_dist"]
MOE = [
    "--num-experts", 4, "--moe-router-topk", 2, "--moe-ffn-hidden-size", 32, "--moe-token-dispatcher-type", "alltoall",
    "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", 1e-2,
    # 50257 padded to a multiple of 64 x TP: the same vocabulary rows at TP1 and TP2
    "--make-vocab-size-divisible-by", 64,
]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _train(data_path, nproc, *extra, stack="mcore"):
    result = run_pretrain(training_flags(data_path, stack, *EXACT, *extra), nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return lm_losses(result.stdout)


def test_moe_checkpoint_reshards_tp2_pp2_to_tp1_to_ep2(data_path, tmp_path):
    parallel, single = tmp_path / "tp2pp2", tmp_path / "tp1"
    layout = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--sequence-parallel"]
    saved = _train(data_path, 4, *MOE, *layout, "--train-iters", 5, "--exit-interval", 3, "--save", parallel, "--save-interval", 2)
    assert sorted(os.listdir(parallel / "iter_0000002"))[:2] == [".metadata", "__0_0.distcp"]
    # One process reads the four ranks' blocks: the first step's loss is the loaded weights' (their logits).
    resumed = _train(
        data_path, 1, *MOE, "--train-iters", 5, "--load", parallel, "--ckpt-step", 2, "--save", single,
        "--save-interval", 4,
    )
    assert resumed[3] == pytest.approx(saved[3], rel=1e-5)
    # Two expert-parallel ranks (each with 2 of the 4 experts) continue from the single process's checkpoint.
    experts = _train(data_path, 2, *MOE, "--expert-model-parallel-size", 2, "--train-iters", 5, "--load", single, "--ckpt-step", 4)
    assert list(experts) == [5]
    assert experts[5] == pytest.approx(resumed[5], rel=1e-5)


def test_resume_is_exact_and_loads_at_another_pipeline_layout_and_stack(data_path, tmp_path):
    save = tmp_path / "pp2"
    four_layers = ["--num-layers", 4]  # given after the tiny model's --num-layers 2: the last one counts
    pipeline = ["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1, "--use-distributed-optimizer"]
    straight = _train(data_path, 2, *four_layers, *pipeline, "--train-iters", 4, "--save", save, "--save-interval", 2)
    resume = [*four_layers, "--train-iters", 4, "--load", save, "--ckpt-step", 2]
    assert _train(data_path, 2, *pipeline, *resume) == {3: straight[3], 4: straight[4]}
    # Pipeline stages (virtual ones too) change nothing in the arithmetic: bit for bit again on one process, also
    # without the distributed optimizer.
    assert _train(data_path, 1, *resume) == {3: straight[3], 4: straight[4]}
    # The legacy stack reads the same keys (its own names are mapped to mcore's).
    legacy = _train(data_path, 1, *resume, stack="legacy")
    assert legacy == pytest.approx({3: straight[3], 4: straight[4]}, rel=1e-5)


def test_async_save_killed_midway_never_leaves_a_latest_that_does_not_load(data_path, tmp_path):
    save = tmp_path / "async"
    flags = training_flags(data_path, "mcore", *EXACT, "--train-iters", 200, "--save", save, "--save-interval", 1, "--async-save")
    returncode, stdout = run_until(flags, r"writing checkpoint of iteration\s+4 in the background", signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= latest <= 4
    assert (save / f"iter_{latest:07d}" / "metadata.json").is_file()
    result = run_pretrain(
        training_flags(data_path, "mcore", *EXACT, "--train-iters", 200, "--exit-interval", latest + 1, "--load", save)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(lm_losses(result.stdout)) == [latest + 1]


def test_damaged_shard_files_fail_in_one_line_and_auto_resume_falls_back(data_path, tmp_path):
    """...to the newest healthy iteration, found also with --auto-detect-ckpt-format."""
    save = tmp_path / "damaged"
    _train(data_path, 1, "--train-iters", 4, "--save", save, "--save-interval", 2)
    shard = save / "iter_0000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resume = training_flags(data_path, "mcore", *EXACT, "--train-iters", 4, "--load", save)
    result = run_pretrain(resume)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(rf"checkpoint file {re.escape(str(shard))} is truncated", errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    shard.unlink()
    result = run_pretrain(resume)
    assert result.returncode != 0 and f"checkpoint file {shard} is missing" in result.stderr, result.stderr[-2000:]
    result = run_pretrain([*resume, "--auto-resume", "--ckpt-format", "torch"])
    assert result.returncode != 0 and "is a torch_dist checkpoint but this run loads --ckpt-format torch" in result.stderr
    result = run_pretrain([*resume, "--auto-resume", "--ckpt-format", "torch", "--auto-detect-ckpt-format"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(lm_losses(result.stdout)) == [3, 4]
