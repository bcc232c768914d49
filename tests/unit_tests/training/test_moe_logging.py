"""The MoE aux losses the training log prints: unscaled values averaged over MoE layers, micro batches and
data-parallel ranks, under Megatron's names; per-layer TensorBoard scalars with --moe-per-layer-logging."""

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, save_to_aux_losses_tracker
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.moe_logging import moe_aux_loss_report


class _Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, iteration):
        self.scalars[name] = (value, iteration)


def _report_on_two_ranks(rank):
    config = TransformerConfig(
        num_layers=3, hidden_size=8, num_attention_heads=2, num_moe_experts=4, moe_layer_freq=[0, 1, 1],
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
    )
    # Two micro batches on this rank: layer 2 reports 1 + rank each time, layer 3 reports 3 + rank.
    for _ in range(2):
        save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(1.0 + rank), 2, 3)
        save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(3.0 + rank), 3, 3)
        save_to_aux_losses_tracker("z_loss", torch.tensor(0.5), 3, 3)
    writer = _Writer()
    report = moe_aux_loss_report(config, num_microbatches=2, writer=writer, iteration=7, per_layer=True)
    # Layers averaged over ranks: 1.5 and 3.5, then over the 2 MoE layers; z-loss 0.5 in one of 2 MoE layers.
    assert report == {"load_balancing_loss": 2.5, "z_loss": 0.25}
    assert writer.scalars["moe/load_balancing_loss_layer_1"] == (1.5, 7)
    assert writer.scalars["moe/load_balancing_loss_layer_0"] == (0.0, 7)
    assert all(value.sum() == 0 for value in (entry["values"] for entry in get_moe_layer_wise_logging_tracker().values()))


def test_aux_losses_are_averaged_over_layers_micro_batches_and_ranks(run_on_gloo):
    run_on_gloo(2, _report_on_two_ranks)


def _prediction_depth_logged_after_the_decoder(rank):
    from gpt_builders import gpt_builder
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    from tests.unit_tests.training.test_moe_args import MOE, validated

    args = validated(*MOE, "--first-k-dense-replace", "1", "--moe-aux-loss-coeff", "1e-2", "--mtp-num-layers", "1",
                     "--hidden-dropout", "0", "--attention-dropout", "0")
    args.padded_vocab_size = 64
    model = gpt_builder(args).train()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    clear_aux_losses_tracker()
    model(tokens, torch.arange(16).expand(2, 16), None, labels=tokens)
    values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    # Megatron's numbering: decoder layers 1-4 (the first dense), then the prediction depth as layer 5.
    assert values.numel() == 5 and values[0] == 0 and bool((values[1:] > 0).all())
    report = moe_aux_loss_report(model.config, num_microbatches=1)
    assert report["load_balancing_loss"] == pytest.approx(values.sum().item() / 4, rel=1e-6)


def test_prediction_depth_aux_loss_is_a_layer_after_the_decoder(run_on_gloo):
    """The multi-token prediction depth's MoE layer logs its aux loss as layer num_layers + 1, and the logged
    average counts it among the MoE layers (Megatron's tracker)."""
    run_on_gloo(1, _prediction_depth_logged_after_the_decoder)
