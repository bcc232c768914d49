"""Multi-token prediction against a reference built by hand from the same weights: each depth's loss (shifted
ids, labels and mask; cat(embedding, hidden) order), the gradient of lm loss + factor x mean MTP loss, an
unchanged main loss, and no MTP work at inference."""

import copy

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.multi_token_prediction import clear_mtp_loss_tracker, get_mtp_loss_tracker, roll_left
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB, DEPTHS, FACTOR = 40, 2, 0.3


def make_model():
    model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.3,
        use_cpu_initialization=True, mtp_num_layers=DEPTHS, mtp_loss_scaling_factor=FACTOR,
    )
    return GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=16,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def batch():
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (2, 10), generator=generator)
    labels = torch.randint(0, VOCAB, (2, 10), generator=generator)
    mask = (torch.rand(2, 10, generator=generator) > 0.2).float()
    return ids, torch.arange(10).expand(2, 10), labels, mask


def reference_losses(model, ids, positions, labels, mask):
    """(main per-token loss [b, s], [mtp loss of each depth]) computed step by step from the model's modules."""
    rotary = model.rotary_pos_emb(ids.size(1))
    hidden = model.decoder(model.embedding(ids, positions), None, None, rotary)

    def token_losses(states, targets):
        logits = model.output_layer(states)[0].transpose(0, 1)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none").view(targets.shape)

    main, previous, depth_losses = token_losses(hidden, labels), hidden, []
    for layer in model.mtp.layers:
        ids, positions, labels, mask = roll_left(ids), roll_left(positions), roll_left(labels), roll_left(mask)
        combined = torch.cat((layer.enorm(model.embedding(ids, positions)), layer.hnorm(previous)), dim=-1)
        states = layer.transformer_layer(combined @ layer.eh_proj.weight.t(), None, rotary_pos_emb=rotary)[0]
        previous = layer.final_layernorm(states)
        depth_losses.append((token_losses(previous, labels) * mask).sum() / mask.sum())
    return main, depth_losses


def test_losses_and_gradients_match_the_hand_built_reference():
    model = make_model().train()
    reference = copy.deepcopy(model)
    ids, positions, labels, mask = batch()
    assert roll_left(ids)[:, :-1].equal(ids[:, 1:]) and (roll_left(ids)[:, -1] == 0).all()
    clear_mtp_loss_tracker()
    per_token = model(ids, positions, None, labels=labels, loss_mask=mask)
    main, depth_losses = reference_losses(reference, ids, positions, labels, mask)
    torch.testing.assert_close(per_token, main, rtol=1e-6, atol=1e-6)
    tracked = get_mtp_loss_tracker()
    assert sorted(tracked) == [1, 2]
    for depth, loss in enumerate(depth_losses, start=1):
        torch.testing.assert_close(tracked[depth], loss.detach(), rtol=1e-6, atol=1e-6)
    assert depth_losses[0] != depth_losses[1]
    main_loss = (per_token * mask).sum() / mask.sum()
    main_loss.backward()
    ((main * mask).sum() / mask.sum() + FACTOR / DEPTHS * sum(depth_losses)).backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert model.mtp.layers[1].eh_proj.weight.grad.abs().sum() > 0
    clear_mtp_loss_tracker()


def test_inference_runs_no_prediction_depths():
    model = make_model().eval()
    ids, positions, labels, mask = batch()
    clear_mtp_loss_tracker()
    with torch.no_grad():
        logits = model(ids, positions, None)
        model(ids, positions, None, labels=labels, loss_mask=mask)
    assert logits.shape == (2, 10, VOCAB) and not get_mtp_loss_tracker()
    names = {name for name in model.state_dict() if name.startswith("mtp.")}
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
            "mtp.layers.1.final_layernorm.weight", "mtp.layers.1.transformer_layer.mlp.linear_fc1.weight"} <= names


def test_depth_count_must_be_positive():
    with pytest.raises(ValueError, match="--mtp-num-layers must be at least 1"):
        TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, mtp_num_layers=0)
