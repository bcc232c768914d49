"""Checkpoint files are unpickled without running code: a crafted file is refused in one line by training
--load and --use-checkpoint-args (the tools: tests/unit_tests/tools/test_safe_loading.py), while the
checkpoints this project and Megatron-LM write still load."""

import argparse
import os
import random
import zipfile

import numpy as np
import pytest
import torch

from megatron.core.enums import ModelType
from megatron.training import checkpointing
from megatron.training.checkpoint_manifest import MANIFEST_BASENAME, manifest_text
from megatron.training.checkpointing import get_checkpoint_name, load_checkpoint, save_checkpoint
from megatron.core.safe_load import UnsafeCheckpointError, load_checkpoint_file
from tests.unit_tests.training.test_checkpointing import _setup


class _RunsCode:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_malicious_file(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"args": argparse.Namespace(num_layers=2), "model": {"w": torch.ones(2)}, "x": _RunsCode(marker)}, path)


def _megatron_lm_checkpoint(path, numpy_module_name="numpy._core"):
    """A checkpoint as Megatron-LM writes it (saved args with its ModelType enum, a list of RNG states with
    numpy's state), optionally with the numpy 1.x module name numpy.core in the pickle."""
    state = {
        "args": argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder),
        "checkpoint_version": 3.0,
        "iteration": 7,
        "model": {"decoder.final_layernorm.weight": torch.arange(4.0)},
        "rng_state": [
            {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_state": None,
                "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
            }
        ],
    }
    torch.save(state, path)
    if numpy_module_name != "numpy._core":
        _rename_pickled_module(path, b"numpy._core.multiarray", numpy_module_name.encode() + b".multiarray")
    return state


def _rename_pickled_module(path, old, new):
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    assert any(old in data for info, data in entries if info.filename.endswith("data.pkl"))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            target.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)


def test_crafted_pickle_is_refused_before_running_code(tmp_path):
    path, marker = str(tmp_path / "model_optim_rng.pt"), tmp_path / "marker"
    _plant_malicious_file(path, marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_file(path)
    assert str(error.value).startswith(f"refusing to load {path}: it holds a posix.system object")
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("numpy_module_name", ["numpy._core", "numpy.core"])
def test_megatron_lm_checkpoints_with_namespace_and_numpy_rng_load(tmp_path, numpy_module_name):
    path = str(tmp_path / "model_optim_rng.pt")
    written = _megatron_lm_checkpoint(path, numpy_module_name)
    loaded = load_checkpoint_file(path)
    assert vars(loaded["args"]) == vars(written["args"])
    saved_np, loaded_np = written["rng_state"][0]["np_rng_state"], loaded["rng_state"][0]["np_rng_state"]
    assert loaded_np[0] == saved_np[0] and np.array_equal(loaded_np[1], saved_np[1]) and loaded_np[2:] == saved_np[2:]
    assert loaded["rng_state"][0]["random_rng_state"] == written["rng_state"][0]["random_rng_state"]
    np.random.set_state(loaded_np)  # a usable numpy state
    assert torch.equal(loaded["model"]["decoder.final_layernorm.weight"], torch.arange(4.0))


def test_training_load_refuses_a_crafted_checkpoint(tmp_path):
    args, net, optimizer, scheduler = _setup(tmp_path)
    save_checkpoint(1, [net], optimizer, scheduler)
    assert load_checkpoint([net], optimizer, scheduler)[0] == 1, "this project's own checkpoints load"
    name, marker = get_checkpoint_name(args.save, 1), tmp_path / "marker"
    _plant_malicious_file(name, marker)
    directory = os.path.dirname(name)  # an attacker rewrites the manifest too
    (tmp_path / "ck" / "iter_0000001" / "mp_rank_00" / MANIFEST_BASENAME).write_text(
        manifest_text(directory, ["model_optim_rng.pt"])
    )
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {name}: it holds a posix.system"):
        load_checkpoint([net], optimizer, scheduler)
    args.use_checkpoint_args = True
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        checkpointing.load_args_from_checkpoint(args)
    assert not marker.exists()
