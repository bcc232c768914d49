"""The *_tiny_cpu.sh example scripts run end to end as a user runs them (2 processes under torchrun, gloo),
for every model and both stacks, with a short iteration count; they save a checkpoint that resumes. Their
TP=2 and PP=2 layouts train like their default (data-parallel) layout."""

import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT, shared_path
from tests.functional_tests.training_runs import free_port, iteration_records, lm_losses, require_data_pipeline

require_data_pipeline()

MODELS = ("llama2", "llama3", "qwen3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A slice of WikiText-2 (../shared) as the scripts' input, and a folder for the datasets they build."""
    directory = tmp_path_factory.mktemp("example_data")
    lines = shared_path("data/wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (directory / "wiki.txt").write_text("".join(lines[:600]), encoding="utf-8")
    return directory


def _run_script(model, stack, data_dir, work_dir, train_iters, **layout):
    script = REPO_ROOT / "examples" / stack / model / f"pretrain_{model}_tiny_cpu.sh"
    tokenizer = "llama2" if model == "llama2" else "gpt2"
    env = dict(
        os.environ,
        SHARED_DIR=str(shared_path("")),
        INPUT=str(data_dir / "wiki.txt"),
        DATA_PATH=str(data_dir / f"wiki_{tokenizer}_text_document"),
        WORK_DIR=str(work_dir),
        LOG_DIR=str(work_dir / "logs"),
        TRAIN_ITERS=str(train_iters),
        LOG_INTERVAL="1",
        SAVE_INTERVAL="3",
        EVAL_INTERVAL="3",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        **layout,
    )
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("stack", ["mcore", "legacy"])
@pytest.mark.parametrize("model", MODELS)
def test_tiny_cpu_example_trains_saves_and_resumes(data_dir, tmp_path, model, stack):
    first = _run_script(model, stack, data_dir, tmp_path, train_iters=4)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(iteration_records(first.stdout)) == [1, 2, 3, 4]
    assert "validation loss at iteration 3" in first.stdout
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text() == "4"
    log = (tmp_path / "logs" / f"pretrain_{model}_tiny_cpu_{stack}.log").read_text()
    assert iteration_records(log) == iteration_records(first.stdout)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    tracker.write_text("3")  # step back to the checkpoint of iteration 3 and run the last iteration again
    resumed = _run_script(model, stack, data_dir, tmp_path, train_iters=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "successfully loaded checkpoint" in resumed.stdout
    assert iteration_records(resumed.stdout) == {4: iteration_records(first.stdout)[4]}


@pytest.mark.parametrize("stack", ["mcore", "legacy"])
def test_tiny_cpu_example_parallel_layouts_train_like_data_parallel(data_dir, tmp_path, stack):
    # llama2's 32000-piece vocabulary needs no padding at TP=2, so every layout builds the same model.
    data_parallel = _run_script("llama2", stack, data_dir, tmp_path / "dp", train_iters=3)
    assert data_parallel.returncode == 0, data_parallel.stdout[-3000:] + data_parallel.stderr[-3000:]
    expected = lm_losses(data_parallel.stdout)
    assert sorted(expected) == [1, 2, 3]
    for name, layout in (("tp", {"TP": "2"}), ("pp", {"PP": "2"})):
        run = _run_script("llama2", stack, data_dir, tmp_path / name, train_iters=3, **layout)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert lm_losses(run.stdout) == pytest.approx(expected, rel=1e-5), name


@pytest.mark.parametrize("model", ["mixtral", "qwen3_moe", "deepseek3"])
def test_tiny_moe_example_trains_with_expert_parallelism(data_dir, tmp_path, model):
    """The MoE examples run at EP=2 over their 2 processes, log the aux loss (DeepSeek-V3: and its multi-token
    prediction loss) and save Megatron's EP layout."""
    run = _run_script(model, "mcore", data_dir, tmp_path, train_iters=3)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = iteration_records(run.stdout)
    assert sorted(records) == [1, 2, 3] and all("load_balancing_loss: " in line for line in records.values())
    assert all(("mtp_1 loss: " in line) == (model == "deepseek3") for line in records.values())
    iteration = tmp_path / "ckpt" / "iter_0000003"
    assert sorted(path.name for path in iteration.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
