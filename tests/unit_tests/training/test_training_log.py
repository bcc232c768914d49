"""The training log line is Megatron-LM's, character for character, so existing log parsers keep working."""

from types import SimpleNamespace

import pytest

from megatron.training import training_log
from megatron.training.flops import num_floating_point_operations
from megatron.training.training_log import TrainingLogger


def _args(**overrides):
    args = SimpleNamespace(
        device="cpu", world_size=2, seq_length=128, train_iters=100, consumed_train_samples=320, log_interval=10,
        tensorboard_log_interval=1, log_params_norm=False, log_memory_to_tensorboard=False, device_peak_tflops=None,
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=16,
        ffn_hidden_size=256, swiglu=False, padded_vocab_size=1024,
    )
    args.__dict__.update(overrides)
    return args


@pytest.fixture
def clock(monkeypatch):
    """time.time() as seen by the logger: advanced by hand."""
    now = [1000.0]
    monkeypatch.setattr(training_log.time, "time", lambda: now[0])
    return now


def _log_ten(logger, losses, skipped=(), nan=()):
    for iteration in range(1, 11):
        value = float("nan") if iteration in nan else losses[iteration - 1]
        logger.log_iteration(
            iteration=iteration, loss_dict={"lm loss": value}, learning_rate=3.0e-4, loss_scale=1.0,
            skipped_iter=int(iteration in skipped), grad_norm=1.2344, num_zeros_in_grad=None, batch_size=32, model=None,
        )


def test_line_matches_megatron_format(clock, capsys, monkeypatch):
    monkeypatch.setattr(training_log, "parallel_rank_reports_memory", lambda: False)
    args = _args()
    logger = TrainingLogger(args)
    clock[0] += 1.234  # ten iterations of 123.4 ms
    losses = [7.0 + 0.1 * i for i in range(10)]
    _log_ten(logger, losses, skipped={4}, nan=set())
    line = capsys.readouterr().out.strip("\n")
    tokens = 32 * 128 / 0.1234
    expected_loss = (sum(losses) - losses[3]) / 9
    assert line == (
        f" iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): 123.4 | "
        f"throughput per GPU (TFLOP/s/GPU): 0.0179 | throughput (tokens/s): {tokens:.1f} | "
        f"learning rate: 3.000000E-04 | global batch size:    32 | lm loss: {expected_loss:.6E} | loss scale: 1.0 | "
        f"grad norm: 1.234 | number of skipped iterations:   1 | number of nan iterations:   0 |"
    )


@pytest.mark.parametrize(
    "tflops, shown", [(123.45, "123.5"), (12.34, "12.3"), (9.876, "9.88"), (0.1234, "0.123"), (0.0001234, "0.000123"), (0.0, "0.0")]
)
def test_tflops_keep_three_significant_digits_below_ten(tflops, shown):
    """Megatron's one decimal showed 0.0 for every CPU run."""
    assert training_log.format_tflops(tflops) == shown


def test_mfu_with_a_known_peak_and_nan_counting(clock, capsys, monkeypatch):
    monkeypatch.setattr(training_log, "parallel_rank_reports_memory", lambda: False)
    args = _args(device_peak_tflops=1e-6)
    logger = TrainingLogger(args)
    clock[0] += 1.0
    _log_ten(logger, [5.0] * 10, nan={2, 7})
    line = capsys.readouterr().out
    tflops = num_floating_point_operations(args, 32) / (0.1 * 1e12 * 2)
    assert f" MFU: {100 * tflops / 1e-6:.2f}% | learning rate:" in line
    assert " lm loss: 5.000000E+00 |" in line and "number of nan iterations:   2 |" in line
