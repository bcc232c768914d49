"""Flag parsing: YAML configs with command-line override, unknown flags, and every inconsistent combination."""

import re

import pytest
import torch

from megatron.training.arguments import ArgumentsError, parse_args, validate_args

MODEL = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--max-position-embeddings", "8"]
BASE = ["--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--device", "cpu", *MODEL]


def _validated(*flags, world_size=1, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", "0")
    return validate_args(parse_args(args_list=[*BASE, *flags]))


def test_defaults_and_derived_values():
    args = _validated()
    assert args.global_batch_size == 2 and args.data_parallel_size == 1
    assert args.params_dtype == torch.float32 and args.distributed_backend == "gloo"
    assert args.start_weight_decay == args.end_weight_decay == 0.01
    assert (args.log_interval, args.eval_interval, args.eval_iters, args.clip_grad) == (100, 1000, 100, 1.0)
    assert args.check_for_nan_in_loss_and_grad is True


def test_bf16_accumulates_in_fp32():
    args = _validated("--bf16")
    assert args.params_dtype == torch.bfloat16 and args.accumulate_allreduce_grads_in_fp32


def test_yaml_config_supplies_flags_and_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "micro_batch_size: 4\nglobal_batch_size: 16\nlr: 3.0e-4\nlr_decay_style: cosine\nbf16: true\n"
        "rampup_batch_size: null\nno_check_for_nan_in_loss_and_grad: true\nlr-warmup-iters: 2\n"
        "train_iters: 100\nmin_lr: '1e-5'\n"
    )
    args = parse_args(args_list=["--config", str(config), "--lr", "1e-3", "--micro-batch-size", "2"])
    assert args.lr == 1e-3 and args.micro_batch_size == 2
    assert args.global_batch_size == 16 and args.lr_decay_style == "cosine" and args.bf16
    assert args.check_for_nan_in_loss_and_grad is False and args.lr_warmup_iters == 2
    assert args.min_lr == 1e-5 and args.train_iters == 100


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr_decay_styl: cosine\n", "unknown key 'lr_decay_styl' \\(did you mean 'lr_decay_style'\\?\\)"),
        ("lr_decay_style: cubic\n", "bad value 'cubic' for 'lr_decay_style'"),
        ("- lr\n", "must be a mapping"),
        ("bf16: maybe\n", "expected true or false"),
        ("lr: [1\n", "not valid YAML"),
        ("num_layers: 2.7\n", "bad value 2.7 for 'num_layers': expected an integer"),
        ("num_layers: true\n", "bad value True for 'num_layers': expected an integer, not true/false"),
        ("lr: false\n", "bad value False for 'lr': expected a number, not true/false"),
    ],
)
def test_bad_yaml_config(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args_list=["--config", str(config)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_yaml_config(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(args_list=["--config", str(tmp_path / "absent.yaml")])
    assert "cannot read the file" in capsys.readouterr().err


def test_unknown_flag_suggests_nearest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args_list=["--lr-decay-styel", "cosine", "--micro-batch", "2", "--zzzz"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown flag --lr-decay-styel (did you mean --lr-decay-style?)" in err
    assert "unknown flag --micro-batch (did you mean --micro-batch-size?)" in err
    assert "unknown flag --zzzz;" not in err and "unknown flag --zzzz" in err
    assert err.count("\n") == 1, "one line, not the usage of every flag"


@pytest.mark.parametrize(
    "flags, world_size, message",
    [
        (["--global-batch-size", "6", "--micro-batch-size", "2"], 2, "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4"),
        (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 is not shorter than the decay length 10"),
        (["--lr-warmup-iters", "20", "--lr-decay-iters", "15"], 1, "not shorter than the decay length 15"),
        (["--fp16", "--bf16"], 1, "--fp16 and --bf16 are mutually exclusive"),
        (["--save-interval", "5"], 1, "--save-interval needs --save DIR"),
        (["--train-samples", "100"], 1, "give --train-iters or --train-samples, not both"),
        (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], 1, "give --lr-warmup-fraction or --lr-warmup-iters, not both"),
        (["--lr-decay-samples", "100"], 1, "--lr-decay-samples needs sample-based training"),
        (["--rampup-batch-size", "2", "2", "100"], 1, "--rampup-batch-size needs sample-based training"),
        (["--min-lr", "1e-2"], 1, "--min-lr 0.01 must lie between 0 and --lr 0.001"),
        (["--lr-decay-style", "WSD"], 1, "WSD needs --lr-wsd-decay-iters"),
        (["--start-weight-decay", "0.0"], 1, "--start-weight-decay 0.0 differs from --weight-decay 0.01"),
        (["--weight-decay-incr-style", "linear"], 1, "needs --start-weight-decay and --end-weight-decay"),
        (["--recompute-method", "uniform"], 1, "need --recompute-granularity full"),
        (["--recompute-granularity", "full"], 1, "needs --recompute-method uniform|block and --recompute-num-layers"),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "99"],
            1,
            "--recompute-num-layers 99 must lie between 1 and --num-layers",
        ),
        (["--ckpt-step", "3"], 1, "--ckpt-step needs --load DIR"),
        (["--finetune"], 1, "--finetune needs --load DIR"),
        (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible by --tensor-model-parallel-size 2"),
        (["--distributed-backend", "nccl"], 1, "--distributed-backend nccl needs CUDA"),
        (["--loss-scale", "0"], 1, "--loss-scale must be positive"),
    ],
)
def test_inconsistent_flags_give_one_clear_message(monkeypatch, flags, world_size, message):
    with pytest.raises(ArgumentsError) as error:
        _validated(*flags, world_size=world_size, monkeypatch=monkeypatch)
    assert message in str(error.value)


def test_yaml_numbers_keep_their_flag_types(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("num_layers: 3\nlr: 1\nhidden_size: '32'\n")
    args = parse_args(args_list=["--config", str(config)])
    assert (args.num_layers, args.lr, args.hidden_size) == (3, 1.0, 32) and isinstance(args.lr, float)


def test_train_iters_zero_evaluates_only_with_a_decay_length(monkeypatch):
    with pytest.raises(ArgumentsError) as error:
        _validated("--train-iters", "0", monkeypatch=monkeypatch)
    assert str(error.value) == (
        "--lr-decay-iters (default --train-iters) must be positive; to only evaluate, give --train-iters 0 with "
        "--lr-decay-iters N, or --skip-train"
    )
    assert _validated("--train-iters", "0", "--lr-decay-iters", "10", monkeypatch=monkeypatch).train_iters == 0


def test_training_length_and_lr_are_required(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ArgumentsError, match="--train-iters N or --train-samples N"):
        validate_args(parse_args(args_list=["--micro-batch-size", "1", "--lr", "1e-3"]))
    with pytest.raises(ArgumentsError, match="--micro-batch-size is required"):
        validate_args(parse_args(args_list=["--train-iters", "1", "--lr", "1e-3"]))
    with pytest.raises(ArgumentsError, match="--lr is required"):
        validate_args(parse_args(args_list=["--train-iters", "1", "--micro-batch-size", "1"]))


def test_rampup_with_sample_based_training(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = ["--micro-batch-size", "2", "--global-batch-size", "16", "--train-samples", "1000", "--lr", "1e-3", *MODEL]
    args = validate_args(parse_args(args_list=[*flags, "--rampup-batch-size", "4", "4", "200"]))
    assert args.rampup_batch_size == [4, 4, 200]
    with pytest.raises(ArgumentsError, match="minus START 4 must be a multiple of INCREMENT 5"):
        validate_args(parse_args(args_list=[*flags, "--rampup-batch-size", "4", "5", "200"]))
