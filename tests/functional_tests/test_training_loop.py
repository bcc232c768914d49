"""pretrain_gpt.py end to end on the bundled WikiText-2 sample: loss falls on both stacks, Megatron-LM's
log line format, mixed precision on CPU, recomputation, YAML configs, and one clear message per error."""

import re
import textwrap

import pytest

from tests.functional_tests.training_runs import (
    gpt2_dataset,
    iteration_records,
    lm_losses,
    require_data_pipeline,
    run_pretrain,
    training_flags,
)

require_data_pipeline()

MEGATRON_LOG_LINE = re.compile(
    r"^ iteration +\d+/ +\d+ \| consumed samples: +\d+ \| elapsed time per iteration \(ms\): \d+\.\d \| "
    r"throughput per GPU \(TFLOP/s/GPU\): \d+\.\d+ \| throughput \(tokens/s\): \d+\.\d \| "
    r"learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +\d+ \| lm loss: \d\.\d{6}E[+-]\d\d \| "
    r"loss scale: \d+\.\d \| grad norm: \d+\.\d{3} \| number of skipped iterations: +\d+ \| "
    r"number of nan iterations: +\d+ \|$"
)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("stack, nproc", [("mcore", 2), ("legacy", 1)])
def test_loss_falls_on_real_text(data_path, tmp_path, stack, nproc):
    flags = training_flags(data_path, stack, "--train-iters", 30, "--eval-interval", 15, "--eval-iters", 2)
    result = run_pretrain([*flags, "--tensorboard-dir", tmp_path / "tb"], nproc=nproc)
    assert result.returncode == 0, result.stderr
    losses = lm_losses(result.stdout)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[i] for i in (1, 2, 3)) / 3, sum(losses[i] for i in (28, 29, 30)) / 3
    assert last < first - 1.5, losses
    lines = [line for line in result.stdout.splitlines() if line.startswith(" iteration ")]
    assert all(MEGATRON_LOG_LINE.match(line) for line in lines), lines[0]
    assert " iteration       30/      30 | consumed samples:          240 |" in result.stdout
    assert re.search(r" validation loss at iteration 15 \| lm loss value: \S+ \| lm loss PPL: \S+ \| ", result.stdout)
    assert "validation loss at iteration 30 on test set" in result.stdout
    assert "number of parameters on (tensor, pipeline) model parallel rank (0, 0)" in result.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_bf16_trains_on_cpu_close_to_fp32(data_path):
    fp32 = run_pretrain(training_flags(data_path, "mcore", "--train-iters", 6))
    bf16 = run_pretrain(training_flags(data_path, "mcore", "--train-iters", 6, "--bf16"))
    assert fp32.returncode == 0 and bf16.returncode == 0, bf16.stderr
    fp32_losses, bf16_losses = lm_losses(fp32.stdout), lm_losses(bf16.stdout)
    assert fp32_losses != bf16_losses, "bf16 must really compute in bf16"
    for iteration, loss in fp32_losses.items():
        assert bf16_losses[iteration] == pytest.approx(loss, rel=2e-2)


def test_fp16_skips_overflowing_steps_and_backs_off_the_loss_scale(data_path):
    flags = training_flags(
        data_path, "mcore", "--train-iters", 12, "--fp16", "--initial-loss-scale", 2**24, "--loss-scale-window", 4,
        "--hysteresis", 1,
    )
    result = run_pretrain(flags)
    assert result.returncode == 0, result.stderr
    records = iteration_records(result.stdout)
    scales = [float(re.search(r"loss scale: (\S+) \|", records[i]).group(1)) for i in sorted(records)]
    skipped = [int(re.search(r"number of skipped iterations: +(\d+)", records[i]).group(1)) for i in sorted(records)]
    # 2^24 overflows fp16 gradients: halved on every skipped step until the gradients fit.
    assert skipped[0] == 1 and scales[0] == 2.0**23
    assert all(scales[i + 1] == scales[i] / 2 for i in range(len(scales) - 1) if skipped[i + 1])
    assert 0 in skipped, "training proceeds once the scale fits"
    for iteration, was_skipped in zip(sorted(records), skipped):
        assert ("lm loss" in records[iteration]) is not bool(was_skipped), "a skipped step reports no loss"


@pytest.mark.parametrize(
    "stack, recompute",
    [
        ("mcore", ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
        ("mcore", ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]),
        ("mcore", ["--recompute-granularity", "selective"]),
        ("legacy", ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
        ("legacy", ["--recompute-granularity", "selective"]),
    ],
)
def test_recompute_gives_the_same_losses(data_path, stack, recompute):
    plain = run_pretrain(training_flags(data_path, stack, "--train-iters", 4))
    recomputed = run_pretrain(training_flags(data_path, stack, "--train-iters", 4, *recompute))
    assert plain.returncode == 0 and recomputed.returncode == 0, recomputed.stderr
    assert iteration_records(recomputed.stdout) == iteration_records(plain.stdout)


def test_yaml_config_with_command_line_override(data_path, tmp_path):
    flags = training_flags(data_path, "mcore", "--train-iters", 3)
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            train_iters: 100
            global_batch_size: 4
            lr_decay_style: constant
            lr: 1.0e-3
            """
        )
    )
    trimmed = list(flags)
    for option in ("--global-batch-size", "--lr-decay-style", "--lr", "--min-lr", "--lr-warmup-iters"):
        index = trimmed.index(option)
        del trimmed[index : index + 2]
    result = run_pretrain([*trimmed, "--config", config])
    assert result.returncode == 0, result.stderr
    records = iteration_records(result.stdout)
    assert sorted(records) == [1, 2, 3], "--train-iters on the command line wins over the file"
    assert all("global batch size:     4 |" in line and "learning rate: 1.000000E-03 |" in line for line in records.values())


@pytest.mark.parametrize(
    "extra, returncode, message",
    [
        (["--lr-decay-styel", "cosine"], 2, "unknown flag --lr-decay-styel (did you mean --lr-decay-style?)"),
        (["--fp16", "--bf16"], 1, "error: --fp16 and --bf16 are mutually exclusive"),
        (["--global-batch-size", "7"], 1, "--global-batch-size 7 is not divisible by --micro-batch-size 2"),
        (["--save-interval", "2"], 1, "--save-interval needs --save DIR"),
        (["--lr-warmup-iters", "50"], 1, "--lr-warmup-iters 50 is not shorter than the decay length 5"),
    ],
)
def test_bad_flags_give_one_message(data_path, extra, returncode, message):
    result = run_pretrain([*training_flags(data_path, "mcore", "--train-iters", 5), *extra])
    assert result.returncode == returncode
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_the_iteration(data_path):
    result = run_pretrain(training_flags(data_path, "mcore", "--train-iters", 20, "--lr", "1e6", "--clip-grad", "0", "--lr-warmup-iters", "0"))
    assert result.returncode == 1
    match = re.search(r"error: (lm loss|the gradient norm) is (nan|inf) at iteration (\d+)", result.stderr)
    assert match, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_checkpoint_gives_one_message(data_path, tmp_path):
    save_dir = tmp_path / "ck"
    flags = training_flags(data_path, "mcore", "--train-iters", 4, "--save", save_dir, "--save-interval", 2)
    assert run_pretrain(flags).returncode == 0
    damaged = save_dir / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    resume = [*training_flags(data_path, "mcore", "--train-iters", 6), "--load", save_dir]
    result = run_pretrain(resume)  # the manifest written at save time catches the truncation
    assert result.returncode == 1
    assert f"checkpoint {damaged.parent} is damaged: model_optim_rng.pt is 1000 bytes but was saved with" in result.stderr
    assert "older complete checkpoint exists at iteration 2" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_pretrain([*resume, "--no-verify-checkpoint"])  # unverified, reading the file fails in one line
    assert result.returncode == 1
    assert f"checkpoint file {damaged} is truncated or corrupt" in result.stderr
    assert "older complete checkpoint exists at iteration 2" in result.stderr
    assert "Traceback" not in result.stderr

    wider = training_flags(data_path, "mcore", "--train-iters", 6, "--ckpt-step", 2, "--load", save_dir)
    wider[wider.index("--hidden-size") + 1] = "64"
    result = run_pretrain(wider)
    assert result.returncode == 1
    assert "--hidden-size 32 (checkpoint) vs 64 (this run)" in result.stderr
