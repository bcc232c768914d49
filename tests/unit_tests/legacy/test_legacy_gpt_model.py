"""The legacy GPTModel: Megatron-LM's nested checkpoint layout, and the same numbers as mcore."""

import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.legacy.model import GPTModel as LegacyGPTModel
from megatron.legacy.model.gpt_model import flatten_legacy_state_dict
from megatron.legacy.model.checkpoint_names import legacy_to_mcore_names

KWARGS = dict(vocab_size=40, max_sequence_length=16, position_embedding_type="learned_absolute")


def config():
    return TransformerConfig(
        num_layers=2, hidden_size=24, num_attention_heads=3, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.3, use_cpu_initialization=True, bias_activation_fusion=True,
    )


def test_checkpoint_layout_is_megatron_lm_nesting():
    model = LegacyGPTModel(config(), **KWARGS, share_embeddings_and_output_weights=False)
    nested = model.state_dict_for_save_checkpoint()
    language_model = nested["language_model"]
    assert sorted(language_model) == ["embedding", "encoder", "output_layer"]
    assert sorted(language_model["embedding"]) == ["position_embeddings", "word_embeddings"]
    assert sorted(language_model["embedding"]["word_embeddings"]) == ["weight"]
    assert "layers.1.self_attention.query_key_value.weight" in language_model["encoder"]
    assert "layers.0.mlp.dense_4h_to_h.bias" in language_model["encoder"]
    assert "final_norm.weight" in language_model["encoder"]
    assert flatten_legacy_state_dict(nested).keys() == model.state_dict().keys()


def test_nested_and_flat_checkpoints_both_load():
    source = LegacyGPTModel(config(), **KWARGS)
    for state in (source.state_dict_for_save_checkpoint(), source.state_dict()):
        torch.manual_seed(99)
        target = LegacyGPTModel(config(), **KWARGS)
        target.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_same_weights_give_the_same_logits_as_mcore():
    legacy = LegacyGPTModel(config(), **KWARGS).eval()
    mcore = GPTModel(config(), get_gpt_layer_local_spec(), **KWARGS, share_embeddings_and_output_weights=True).eval()
    mcore.load_state_dict(legacy_to_mcore_names(legacy.state_dict()))
    tokens = torch.randint(0, 40, (2, 16))
    labels = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(legacy(tokens, None, None), mcore(tokens, None, None))
        assert torch.equal(legacy(tokens, None, None, labels=labels), mcore(tokens, None, None, labels=labels))
