"""Checkpoint write failures (unwritable --save, out of disk space), the per-directory manifest verified at
load, --auto-resume falling back to the newest healthy checkpoint, and --keep-last-checkpoints."""

import errno
import json
import os
import struct
import zipfile

import pytest
import safetensors.torch
import torch

from megatron.core.enums import ModelType
from megatron.training import checkpointing
from megatron.training.checkpoint_manifest import MANIFEST_BASENAME, file_crc32
from megatron.training.checkpointing import (
    CheckpointError,
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from megatron.training.global_vars import set_args
from megatron.training.training import pretrain
from tests.unit_tests.training.test_checkpointing import MODEL_FLAGS, _setup


def _leftovers(save_dir):
    return sorted(str(path.relative_to(save_dir)) for path in save_dir.rglob("*") if path.name.endswith(".tmp"))


def _flip_a_weight_byte(path):
    """Change one byte inside the first tensor's data, as bit-rot would: the file still loads."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if "/data/" in info.filename)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
@pytest.mark.parametrize("fails_at", ["write", "close"])
def test_out_of_space_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, code, fails_at):
    args, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(2, [net], optimizer, scheduler)
    real_save = torch.save

    def full_disk(obj, path):
        if fails_at == "close":  # every byte written, the error surfaces when the file is closed
            real_save(obj, path)
        else:
            with open(path, "wb") as partial:
                partial.write(b"PK\x03\x04 part of a file")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(4, [net], optimizer, scheduler)
    monkeypatch.undo()
    directory = os.path.dirname(get_checkpoint_name(args.save, 4))
    assert str(error.value).startswith(f"no space left on {directory} (needs ~1 MB for this rank's checkpoint files")
    assert "\n" not in str(error.value)
    assert _leftovers(tmp_path / "ck") == [] and not os.path.exists(get_checkpoint_name(args.save, 4, return_base_dir=True))
    assert read_metadata(get_checkpoint_tracker_filename(args.save)) == (2, False)
    set_args(args)
    assert load_checkpoint([net], optimizer, scheduler)[0] == 2


def test_a_failed_later_file_removes_the_files_written_before_it(tmp_path, monkeypatch):
    args, net, optimizer, scheduler = _setup(tmp_path, "--save-safetensors")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="no space left on .*writing model.safetensors failed"):
        save_checkpoint(1, [net], optimizer, scheduler)
    assert list((tmp_path / "ck").iterdir()) == [], "neither model_optim_rng.pt nor a tracker is left behind"


def test_unwritable_save_directory_fails_before_the_model_is_built(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")

    def never_called(*args, **kwargs):
        raise AssertionError("pretrain went past the --save check")

    flags = ["--micro-batch-size", "1", "--train-iters", "2", "--lr", "0.1", "--device", "cpu", "--mock-data", "--seq-length", "8",
             "--save", str(tmp_path / "file" / "ck"), *MODEL_FLAGS]
    with pytest.raises(SystemExit) as exit_status:
        pretrain(never_called, never_called, ModelType.encoder_or_decoder, never_called, args_list=flags)
    assert exit_status.value.code == 1
    assert capsys.readouterr().err == (
        f"error: --save {tmp_path / 'file' / 'ck'} is not a writable directory (Not a directory); create it with "
        "write permission or choose another --save\n"
    )


def test_manifest_lists_every_file_and_bit_rot_is_reported(tmp_path):
    args, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(2, [net], optimizer, scheduler)
    saved_weight = net.linear.weight.detach().clone()
    name = get_checkpoint_name(args.save, 2)
    manifest = json.loads(open(os.path.join(os.path.dirname(name), MANIFEST_BASENAME)).read())
    assert manifest["files"] == {"model_optim_rng.pt": {"size": os.path.getsize(name), "crc32": file_crc32(name)}}

    _flip_a_weight_byte(name)
    with pytest.raises(CheckpointError, match=r"is damaged: model_optim_rng.pt has CRC-32 \w+ but was saved with "
                       r"\w+: its bytes changed after the save \(bit-rot or an edit\)"):
        load_checkpoint([net], optimizer, scheduler)
    args.verify_checkpoint = False  # --no-verify-checkpoint: the damaged weights load silently
    assert load_checkpoint([net], optimizer, scheduler)[0] == 2
    assert not torch.equal(net.linear.weight, saved_weight)


def test_auto_resume_falls_back_to_the_newest_healthy_checkpoint(tmp_path, capsys):
    args, net, optimizer, scheduler = _setup(tmp_path, "--auto-resume")
    for iteration in (2, 4, 6):
        save_checkpoint(iteration, [net], optimizer, scheduler)
    _flip_a_weight_byte(get_checkpoint_name(args.save, 6))
    with open(get_checkpoint_name(args.save, 4), "r+b") as handle:
        handle.truncate(100)
    capsys.readouterr()
    assert load_checkpoint([net], optimizer, scheduler)[0] == 2
    log = capsys.readouterr().out
    assert "WARNING: --auto-resume: iteration 6 is damaged (" in log and "iteration 4 is damaged (" in log
    assert "resuming from the newest healthy checkpoint, iteration 2" in log

    _flip_a_weight_byte(get_checkpoint_name(args.save, 2))
    with pytest.raises(CheckpointError, match="--auto-resume found no healthy checkpoint in "):
        load_checkpoint([net], optimizer, scheduler)
    args.auto_resume = False
    with pytest.raises(CheckpointError, match="iter_0000006/mp_rank_00 is damaged"):
        load_checkpoint([net], optimizer, scheduler)


def test_keep_last_checkpoints_deletes_only_after_a_newer_save_completes(tmp_path, monkeypatch):
    args, net, optimizer, scheduler = _setup(tmp_path, "--keep-last-checkpoints", "2")
    for iteration in (1, 2, 3, 4):
        save_checkpoint(iteration, [net], optimizer, scheduler)
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]

    def crash(obj, path):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(checkpointing.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(5, [net], optimizer, scheduler)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]
    args.keep_last_checkpoints = 1
    save_checkpoint(5, [net], optimizer, scheduler)
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000005", "latest_checkpointed_iteration.txt"]
    assert load_checkpoint([net], optimizer, scheduler)[0] == 5
