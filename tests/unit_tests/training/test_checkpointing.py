"""Checkpoint layout, atomic saves, and one clear message for every bad checkpoint (single process)."""

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.training import checkpointing
from megatron.training.arguments import parse_args, validate_args
from megatron.training.checkpointing import (
    CheckpointError,
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from megatron.training.global_vars import set_args
from megatron.training.optimizer_param_scheduler import OptimizerParamScheduler

MODEL_FLAGS = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--max-position-embeddings", "8"]


def test_checkpoint_names_follow_megatron_layout():
    assert get_checkpoint_name("/ck", 2000) == "/ck/iter_0002000/mp_rank_00/model_optim_rng.pt"
    assert get_checkpoint_name("/ck", 7, pipeline_parallel=True, tensor_rank=1, pipeline_rank=3) == (
        "/ck/iter_0000007/mp_rank_01_003/model_optim_rng.pt"
    )
    assert get_checkpoint_name("/ck", 0, release=True) == "/ck/release/mp_rank_00/model_optim_rng.pt"
    assert get_checkpoint_tracker_filename("/ck") == "/ck/latest_checkpointed_iteration.txt"


@pytest.mark.parametrize("text, expected", [("2000\n", (2000, False)), ("release", (0, True))])
def test_read_metadata(tmp_path, text, expected):
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text(text)
    assert read_metadata(str(tracker)) == expected


def test_read_metadata_rejects_garbage(tmp_path):
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("twelve")
    with pytest.raises(CheckpointError, match="holds 'twelve'"):
        read_metadata(str(tracker))


class Net(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)


def _setup(tmp_path, *flags, width=8):
    args = validate_args(
        parse_args(
            args_list=[
                "--micro-batch-size", "1", "--train-iters", "10", "--lr", "0.1", "--device", "cpu",
                "--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck"),
                *MODEL_FLAGS, *flags,
            ]
        )
    )
    set_args(args)
    torch.manual_seed(0)
    net = Net(width)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=0.1), [net])
    scheduler = OptimizerParamScheduler(optimizer, 0.0, 0.1, 0.0, 0, 10, "linear", 0.01, 0.01, 10, "constant")
    return args, net, optimizer, scheduler


def _step(net, optimizer):
    net.linear(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_then_load_restores_everything(tmp_path):
    args, net, optimizer, scheduler = _setup(tmp_path, "--save-safetensors")
    _step(net, optimizer)
    scheduler.step(3)
    args.consumed_train_samples = 3
    save_checkpoint(3, [net], optimizer, scheduler)
    name = get_checkpoint_name(args.save, 3)
    assert open(get_checkpoint_tracker_filename(args.save)).read() == "3"
    assert sorted(os.listdir(os.path.dirname(name))) == [
        "checkpoint_manifest.json", "model.safetensors", "model_optim_rng.pt"
    ]
    for key, value in load_file(os.path.join(os.path.dirname(name), "model.safetensors")).items():
        assert torch.equal(value, net.state_dict()[key])
    expected_after = torch.rand(3)

    args2, net2, optimizer2, scheduler2 = _setup(tmp_path)
    torch.manual_seed(123)
    assert load_checkpoint([net2], optimizer2, scheduler2) == (3, 0)
    assert args2.consumed_train_samples == 3 and scheduler2.num_steps == 3
    for key, value in net.state_dict().items():
        assert torch.equal(net2.state_dict()[key], value)
    assert torch.equal(torch.rand(3), expected_after), "the torch RNG continues from the saved state"
    _step(net, optimizer)
    _step(net2, optimizer2)
    assert torch.equal(net.linear.weight, net2.linear.weight), "Adam state restored"


def test_missing_checkpoint(tmp_path, capsys):
    _, net, optimizer, scheduler = _setup(tmp_path)
    assert load_checkpoint([net], optimizer, scheduler) == (0, 0)
    assert "no checkpoint found" in capsys.readouterr().out
    _, net, optimizer, scheduler = _setup(tmp_path, "--exit-on-missing-checkpoint")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt is missing"):
        load_checkpoint([net], optimizer, scheduler)


def _two_saves(tmp_path):
    args, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(2, [net], optimizer, scheduler)
    save_checkpoint(4, [net], optimizer, scheduler)
    return args, net, optimizer, scheduler


def test_truncated_checkpoint_names_the_file_and_the_older_one(tmp_path):
    args, net, optimizer, scheduler = _two_saves(tmp_path)
    name = get_checkpoint_name(args.save, 4)
    with open(name, "r+b") as checkpoint_file:
        checkpoint_file.truncate(os.path.getsize(name) // 2)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint([net], optimizer, scheduler)
    message = str(error.value)
    assert f"checkpoint {os.path.dirname(name)} is damaged: model_optim_rng.pt is " in message
    assert "older complete checkpoint exists at iteration 2: load it with --ckpt-step 2" in message
    args.verify_checkpoint = False
    with pytest.raises(CheckpointError) as error:
        load_checkpoint([net], optimizer, scheduler)
    message = str(error.value)
    assert f"checkpoint file {name} is truncated or corrupt" in message
    assert "older complete checkpoint exists at iteration 2: load it with --ckpt-step 2" in message


def test_missing_rank_file_names_the_older_one(tmp_path):
    args, net, optimizer, scheduler = _two_saves(tmp_path)
    os.remove(get_checkpoint_name(args.save, 4))
    with pytest.raises(CheckpointError, match="does not exist .*iteration 2: load it with --ckpt-step 2"):
        load_checkpoint([net], optimizer, scheduler)
    args.ckpt_step = 2
    assert load_checkpoint([net], optimizer, scheduler)[0] == 2


def test_mismatched_model_flags(tmp_path):
    _, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(1, [net], optimizer, scheduler)
    _, net, optimizer, scheduler = _setup(tmp_path, "--hidden-size", "16", width=16)
    with pytest.raises(CheckpointError, match=r"--hidden-size 8 \(checkpoint\) vs 16 \(this run\)"):
        load_checkpoint([net], optimizer, scheduler)


def test_mismatched_weights_without_saved_args(tmp_path):
    args, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(1, [net], optimizer, scheduler)
    name = get_checkpoint_name(args.save, 1)
    state = torch.load(name, weights_only=False)
    del state["args"]
    torch.save(state, name)
    os.remove(os.path.join(os.path.dirname(name), "checkpoint_manifest.json"))  # edited by hand: no manifest
    _, wide, optimizer, scheduler = _setup(tmp_path, width=16)
    with pytest.raises(CheckpointError, match="does not fit the model: .*size mismatch for linear.weight"):
        load_checkpoint([wide], optimizer, scheduler)


def test_checkpoint_without_optimizer_state(tmp_path):
    _, net, optimizer, scheduler = _setup(tmp_path, "--no-save-optim")
    save_checkpoint(1, [net], optimizer, scheduler)
    with pytest.raises(CheckpointError, match="holds no optimizer state .*--no-load-optim"):
        load_checkpoint([net], optimizer, scheduler)
    _, net, optimizer, scheduler = _setup(tmp_path, "--no-load-optim")
    assert load_checkpoint([net], optimizer, scheduler)[0] == 1


def test_finetune_loads_weights_only(tmp_path):
    args, net, optimizer, scheduler = _setup(tmp_path)
    args.consumed_train_samples = 40
    save_checkpoint(5, [net], optimizer, scheduler)
    args, net2, optimizer, scheduler = _setup(tmp_path, "--finetune")
    assert load_checkpoint([net2], optimizer, scheduler) == (0, 0)
    assert args.consumed_train_samples == 0


def test_crash_during_save_never_becomes_latest(tmp_path, monkeypatch):
    args, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(2, [net], optimizer, scheduler)

    def crash(obj, path):
        with open(path, "wb") as partial:
            partial.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpointing.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(4, [net], optimizer, scheduler)
    monkeypatch.undo()
    assert read_metadata(get_checkpoint_tracker_filename(args.save)) == (2, False)
    assert not os.path.exists(get_checkpoint_name(args.save, 4))
    set_args(args)
    assert load_checkpoint([net], optimizer, scheduler)[0] == 2


def test_use_checkpoint_args_fills_flags_left_at_their_defaults(tmp_path):
    _, net, optimizer, scheduler = _setup(tmp_path, "--swiglu", "--ffn-hidden-size", "16", "--normalization", "RMSNorm")
    save_checkpoint(1, [net], optimizer, scheduler)
    args = parse_args(args_list=["--load", str(tmp_path / "ck"), "--use-checkpoint-args", "--num-layers", "3"])
    checkpointing.load_args_from_checkpoint(args)
    assert (args.hidden_size, args.num_attention_heads, args.swiglu, args.normalization) == (8, 2, True, "RMSNorm")
    assert args.num_layers == 3, "a flag given on the command line wins"


@pytest.mark.parametrize(
    "flags, difference",
    [
        (["--apply-residual-connection-post-layernorm"], "--apply-residual-connection-post-layernorm False (checkpoint) vs True"),
        (["--rotary-base", "500000"], "--rotary-base 10000 (checkpoint) vs 500000.0 (this run)"),
        (["--use-rope-scaling"], "--use-rope-scaling False (checkpoint) vs True (this run)"),
        (["--rotary-percent", "0.5"], "--rotary-percent 1.0 (checkpoint) vs 0.5 (this run)"),
        (["--norm-epsilon", "1e-6"], "--norm-epsilon 1e-05 (checkpoint) vs 1e-06 (this run)"),
        (["--normalization", "RMSNorm"], "--normalization LayerNorm (checkpoint) vs RMSNorm (this run)"),
        (["--qk-layernorm"], "--qk-layernorm False (checkpoint) vs True (this run)"),
    ],
)
def test_flags_that_change_the_maths_refuse_to_resume(tmp_path, flags, difference):
    _, net, optimizer, scheduler = _setup(tmp_path, "--position-embedding-type", "rope")
    save_checkpoint(1, [net], optimizer, scheduler)
    _, net, optimizer, scheduler = _setup(tmp_path, "--position-embedding-type", "rope", *flags)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint([net], optimizer, scheduler)
    assert difference in str(error.value) and "force it with --override-checkpoint-args" in str(error.value)
    _, net, optimizer, scheduler = _setup(tmp_path, "--position-embedding-type", "rope", *flags, "--override-checkpoint-args")
    assert load_checkpoint([net], optimizer, scheduler)[0] == 1


def test_a_checkpoint_is_read_by_the_stack_that_wrote_it(tmp_path):
    _, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(1, [net], optimizer, scheduler)
    args, net, optimizer, scheduler = _setup(tmp_path, "--use-legacy-models")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint([net], optimizer, scheduler)
    assert str(error.value) == (
        f"{get_checkpoint_name(args.save, 1)} was saved by the mcore stack but this run uses the legacy "
        "(--use-legacy-models) stack; run with the checkpoint's stack, or convert it: python "
        f"tools/checkpoint/convert.py --load-model-type mg --save-model-type mg --load-dir {args.save} "
        "--save-dir NEW_DIR --use-legacy-models"
    )


def _scheduled(tmp_path, *flags):
    """_setup with the schedule built from the flags, as pretrain builds it."""
    from megatron.training.training import get_optimizer_param_scheduler

    args, net, optimizer, _ = _setup(tmp_path, "--lr-decay-style", "cosine", *flags)
    return args, net, optimizer, get_optimizer_param_scheduler(optimizer)


def test_a_longer_train_iters_continues_the_same_schedule(tmp_path):
    _, net, optimizer, scheduler = _scheduled(tmp_path, "--lr-decay-iters", "10")
    scheduler.step(5)
    save_checkpoint(5, [net], optimizer, scheduler)
    args, net, optimizer, scheduler = _scheduled(tmp_path, "--lr-decay-iters", "10", "--train-iters", "20")
    assert load_checkpoint([net], optimizer, scheduler)[0] == 5
    assert scheduler.num_steps == 5 and args.train_iters == 20

    _, net, optimizer, scheduler = _scheduled(tmp_path, "--train-iters", "20")  # decay length follows --train-iters
    with pytest.raises(CheckpointError, match=r"cannot resume from .*: the checkpoint's decay steps \(10\) differs "
                       r"from the flags' \(20\); pass --override-opt_param-scheduler"):
        load_checkpoint([net], optimizer, scheduler)
