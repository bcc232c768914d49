"""convert.py and generate.py refuse crafted checkpoint files (Megatron and HF pytorch_model.bin) in one line,
without running their code."""

import os
import shutil

import torch

from megatron.training.checkpointing import get_checkpoint_name
from tests.unit_tests.core.test_safe_load import _plant_malicious_file, _RunsCode
from tools.checkpoint.convert import main as convert_main
from tools.generate import main as generate_main


def _malicious_release(directory, marker):
    _plant_malicious_file(get_checkpoint_name(str(directory), 0, release=True), marker)
    (directory / "latest_checkpointed_iteration.txt").write_text("release")


def test_tools_refuse_crafted_megatron_checkpoints_in_one_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    _malicious_release(tmp_path / "mg", marker)
    assert convert_main(["--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", str(tmp_path / "mg"),
                         "--save-dir", str(tmp_path / "out")]) == 1
    assert generate_main(["--load", str(tmp_path / "mg"), "--prompt-ids", "1,2", "--device", "cpu"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("it holds a posix.system object" in line for line in errors), errors
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_a_crafted_hf_pytorch_model_bin(hf_llama_dir, tmp_path, capsys):
    hf_dir, marker = tmp_path / "hf", tmp_path / "marker"
    os.makedirs(hf_dir)
    shutil.copy(hf_llama_dir / "config.json", hf_dir / "config.json")
    torch.save({"lm_head.weight": torch.ones(2), "x": _RunsCode(marker)}, hf_dir / "pytorch_model.bin")
    assert convert_main(["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "llama3",
                         "--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"refusing to load {hf_dir / 'pytorch_model.bin'}: it holds a posix.system" in error
    assert not marker.exists() and not (tmp_path / "out").exists()
