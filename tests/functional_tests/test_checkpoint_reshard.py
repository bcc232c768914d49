"""A checkpoint saved by pretrain_gpt.py at a parallel layout (TP2 x PP2 for mcore, TP2 for legacy) and re-sharded
by tools/checkpoint/convert.py to TP1 x PP1 gives the same logits (each run by the model's own parallel layers at its
layout), training continues from it with the same losses, and re-sharding back to the saved layout returns the
saved tensors bit for bit."""

import pytest
import torch

from tests.functional_tests.training_runs import (
    gpt2_dataset,
    lm_losses,
    require_data_pipeline,
    run_pretrain,
    training_flags,
)
from tests.unit_tests.tools.test_convert import mg_to_mg
from tests.unit_tests.tools.test_parallel_logits import parallel_logits
from megatron.legacy.model.gpt_model import flatten_legacy_state_dict
from tools.checkpoint.checkpoint_files import read_megatron_checkpoint
from tools.checkpoint.convert import main as convert_main

require_data_pipeline()

GPT2_VOCAB = 50257


def _convert(*flags):
    assert convert_main([str(flag) for flag in flags]) == 0


def _train(data_path, stack, layout, *extra):
    tensor_size, pipeline_size = layout
    flags = training_flags(
        data_path, stack, "--tensor-model-parallel-size", tensor_size, "--pipeline-model-parallel-size",
        pipeline_size, "--use-cpu-initialization", "--distributed-backend", "gloo", "--distributed-timeout-minutes", 1,
        # 50257 padded to a multiple of 64 x TP is 50304 at TP1 and TP2: the same model at both layouts.
        "--make-vocab-size-divisible-by", 64, "--hidden-dropout", 0, "--attention-dropout", 0, *extra,
    )
    result = run_pretrain(flags, nproc=tensor_size * pipeline_size)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return lm_losses(result.stdout)


def _rank_directories(layout):
    tensor_size, pipeline_size = layout
    return [
        f"mp_rank_{tensor_rank:02d}" + (f"_{pipeline_rank:03d}" if pipeline_size > 1 else "")
        for tensor_rank in range(tensor_size)
        for pipeline_rank in range(pipeline_size)
    ]


@pytest.mark.parametrize("stack,layout", [("mcore", (2, 2)), ("legacy", (2, 1))])
def test_parallel_checkpoint_resharded_to_one_rank(tmp_path, stack, layout):
    data_path = gpt2_dataset(tmp_path)
    saved, single, back = tmp_path / "parallel", tmp_path / "single", tmp_path / "parallel_again"
    _train(data_path, stack, layout, "--train-iters", 3, "--save", saved, "--save-interval", 3)
    mg_to_mg(_convert, saved, single)  # keeps the stack it was saved with
    args, _ = read_megatron_checkpoint(str(single))
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (1, 1, 50304)
    assert args.use_legacy_models == (stack == "legacy")

    tokens = torch.randint(0, GPT2_VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    (tmp_path / "parallel_logits").mkdir()
    (tmp_path / "single_logits").mkdir()
    sharded_logits = parallel_logits(saved, *layout, tokens, tmp_path / "parallel_logits")
    single_logits = parallel_logits(single, 1, 1, tokens, tmp_path / "single_logits")
    torch.testing.assert_close(single_logits, sharded_logits, rtol=1e-5, atol=1e-5)

    continued = ["--train-iters", 3, "--finetune", "--no-load-optim", "--no-load-rng"]
    sharded_losses = _train(data_path, stack, layout, *continued, "--load", saved)
    single_losses = _train(data_path, stack, (1, 1), *continued, "--load", single)
    assert sorted(single_losses) == sorted(sharded_losses) == [1, 2, 3]
    assert single_losses == pytest.approx(sharded_losses, rel=1e-5)

    mg_to_mg(_convert, single, back, "--target-tensor-parallel-size", layout[0],
             "--target-pipeline-parallel-size", layout[1])
    for directory in _rank_directories(layout):
        original = _rank_tensors(saved / "iter_0000003" / directory)
        returned = _rank_tensors(back / "release" / directory)
        assert sorted(original) == sorted(returned)
        assert all(torch.equal(original[name], returned[name]) for name in original)


def _rank_tensors(directory):
    model = torch.load(directory / "model_optim_rng.pt", weights_only=False)["model"]
    return {name: tensor for name, tensor in flatten_legacy_state_dict(model).items() if torch.is_tensor(tensor)}
