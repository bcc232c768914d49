"""Converted Hugging Face models give transformers' logits, loss and gradients, on both stacks."""

import pytest
import torch

from tests.unit_tests.tools.conftest import VOCAB
from tools.checkpoint.hf_families import family_for
from megatron.legacy.model.checkpoint_names import legacy_to_mcore_names

FAMILIES = {"llama3": "hf_llama_dir", "qwen3": "hf_qwen3_dir", "gpt2": "hf_gpt2_dir"}
STACKS = {"mcore": "--use-mcore-models", "legacy": "--use-legacy-models"}


def _tokens(length=24, batch=2, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(params=list(STACKS))
def stack(request):
    return request.param


@pytest.fixture
def converted(request, family, stack, convert, load_converted, tmp_path):
    """(our model, its args, the transformers model) for one family on one stack."""
    from transformers import AutoModelForCausalLM

    hf_dir = request.getfixturevalue(FAMILIES[family])
    convert(
        "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", family,
        "--load-dir", hf_dir, "--save-dir", tmp_path / "mg", STACKS[stack],
    )
    model, args = load_converted(tmp_path / "mg")
    assert args.use_legacy_models == (stack == "legacy")
    return model, args, AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def test_float32_logits_match_transformers(converted):
    model, _, hf_model = converted
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
        reference = hf_model(tokens).logits
    assert ours.shape == reference.shape
    scale = reference.abs().max()
    assert scale > 1.0  # peaked logits: a wrong layer could not hide in the noise
    assert (ours - reference).abs().max() <= 1e-4 * scale


def test_loss_and_gradients_match_transformers(converted, family):
    model, args, hf_model = converted
    tokens = _tokens(length=17, seed=1)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model.train()  # dropout is 0 in the converted Llama/Qwen args; GPT-2's is switched off here
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.hidden_dropout = model.config.attention_dropout = 0.0
    loss = model(inputs, torch.arange(inputs.size(1)).expand_as(inputs), None, labels=labels).mean()
    loss.backward()
    reference = hf_model(tokens, labels=tokens).loss
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)

    ours = {name: param.grad for name, param in model.named_parameters()}
    if args.use_legacy_models:
        ours = legacy_to_mcore_names(ours)
    expected = family_for(family).to_mcore({name: p.grad for name, p in hf_model.named_parameters()}, args)
    assert sorted(ours) == sorted(expected)
    for name, grad in ours.items():
        scale = expected[name].abs().max()
        assert (grad - expected[name]).abs().max() <= 1e-4 * scale + 1e-7, name


def test_legacy_and_mcore_give_the_same_logits(hf_llama_dir, convert, load_converted, tmp_path):
    logits = []
    for stack_flag in STACKS.values():
        save_dir = tmp_path / stack_flag
        convert(
            "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "llama3",
            "--load-dir", hf_llama_dir, "--save-dir", save_dir, stack_flag,
        )
        model, _ = load_converted(save_dir)
        tokens = _tokens()
        with torch.no_grad():
            logits.append(model(tokens, None, None))
    assert torch.equal(logits[0], logits[1])
