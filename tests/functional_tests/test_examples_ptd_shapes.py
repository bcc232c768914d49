"""The *_ptd.sh example scripts describe the published models: each script runs as a user runs it, with a
stand-in torchrun that records its command line; the flags validate at the script's own multi-GPU layout, and
the model they describe, built on the meta device at TP=PP=EP=1, has the published parameter count (rounded
as published)."""

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from gpt_builders import gpt_builder
from megatron.training.arguments import parse_args, validate_args
from megatron.training.model_config import core_transformer_config_from_args
from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding
from tests.conftest import REPO_ROOT

# script -> (tokenizer entries, embedding rows of the published checkpoint, published parameters in billions;
# DeepSeek: then those of its multi-token prediction depth).
PUBLISHED = {
    "llama2/pretrain_llama2_7b": (32000, 32000, "6.74"),
    "llama3/pretrain_llama3_8b": (128256, 128256, "8.03"),
    "llama3/pretrain_llama3_70b": (128256, 128256, "70.6"),
    "qwen3/pretrain_qwen3_0point6b": (151669, 151936, "0.6"),
    "qwen3/pretrain_qwen3_32b": (151669, 151936, "32.8"),
    "mixtral/pretrain_mixtral_8x7b": (32000, 32000, "46.7"),
    "qwen3_moe/pretrain_qwen3_30b_a3b": (151669, 151936, "30.5"),
    # DeepSeek-V3: 671B in the paper's count, which leaves out the multi-token prediction module (its "14B" is
    # the Hugging Face checkpoint's 685B less 671B; the depth holds 11.6B of its own here, 13.5B with copies of
    # the embedding and output head, which it shares).
    "deepseek3/pretrain_deepseek3_671b": (129280, 129280, "671", "11.6"),
    # The ~1B proxy (../shared/docs/MOE_MLA_CP.md): 1.09B plus 0.06B in its prediction depth.
    "deepseek3/pretrain_deepseek3_1b": (129280, 129280, "1.09", "0.06"),
}
LEGACY = ("llama2/pretrain_llama2_7b", "llama3/pretrain_llama3_8b", "llama3/pretrain_llama3_70b",
          "qwen3/pretrain_qwen3_0point6b", "qwen3/pretrain_qwen3_32b")


def _script_command_line(script: Path, tmp_path: Path, **env) -> list:
    """The torchrun arguments the script would launch, recorded by a torchrun stand-in on PATH."""
    bin_dir, recorded = tmp_path / "bin", tmp_path / "torchrun_args"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "torchrun"
    stand_in.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$RECORDED_ARGS"\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORDED_ARGS=str(recorded),
                       LOG_DIR=str(tmp_path / "logs"), **env)
    subprocess.run(["bash", str(script)], env=environment, check=True, capture_output=True, timeout=60)
    return recorded.read_bytes().decode().split("\0")[:-1]


def _flag_value(command_line: list, flag: str) -> int:
    return int(command_line[command_line.index(flag) + 1])


def _validated(command_line: list, world_size: int, monkeypatch):
    """The script's training flags validated for `world_size` processes on CUDA devices (nccl)."""
    flags = command_line[command_line.index("pretrain_gpt.py") + 1:]
    with monkeypatch.context() as patch:
        patch.setenv("WORLD_SIZE", str(world_size))
        patch.setattr(torch.cuda, "is_available", lambda: True)
        return validate_args(parse_args(args_list=flags))


def _billions(count: int, published: str) -> str:
    """`count` rounded to the digits of the published figure."""
    decimals = len(published.split(".")[1]) if "." in published else 0
    return f"{count / 1e9:.{decimals}f}"


# Every script on the mcore stack; the legacy stack has no MoE or multi-latent attention scripts.
SCRIPTS = [(name, "mcore") for name in PUBLISHED] + [(name, "legacy") for name in PUBLISHED if name in LEGACY]


@pytest.mark.parametrize("name, stack", SCRIPTS)
def test_ptd_script_builds_the_published_model(name, stack, tmp_path, monkeypatch):
    tokenizer_entries, rows, total, *prediction = PUBLISHED[name]
    script = REPO_ROOT / "examples" / stack / f"{name}_ptd.sh"

    launch = _script_command_line(script, tmp_path)
    world_size = _flag_value(launch, "--nproc-per-node") * _flag_value(launch, "--nnodes")
    layout = _validated(launch, world_size, monkeypatch)
    assert layout.use_legacy_models == (stack == "legacy")
    assert _vocab_size_with_padding(tokenizer_entries, layout, logging_enabled=False) == rows

    unsplit = dict(TP="1", PP="1", EP="1")
    args = _validated(_script_command_line(script, tmp_path, **unsplit), 1, monkeypatch)
    args.padded_vocab_size = rows
    config = core_transformer_config_from_args(args)
    config.perform_initialization = False
    with torch.device("meta"):
        model = gpt_builder(args, config=config)
    count = sum(parameter.numel() for parameter in model.parameters())
    prediction_depths = getattr(model, "mtp", None)
    prediction_count = 0 if prediction_depths is None else sum(p.numel() for p in prediction_depths.parameters())
    assert _billions(count - prediction_count, total) == total
    assert [_billions(prediction_count, figure) for figure in prediction] == prediction
