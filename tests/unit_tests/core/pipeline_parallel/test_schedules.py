"""The no-pipelining schedule: gradient accumulation over micro batches equals one large micro batch, in the
reported loss and in the optimizer update; forward-only runs leave gradients untouched."""

import copy

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

VOCAB = 17


class TinyLM(torch.nn.Module):
    """Per-token cross-entropy, as a GPT model returns it when given labels."""

    def __init__(self):
        super().__init__()
        self.config = ModelParallelConfig()
        self.embedding = torch.nn.Embedding(VOCAB, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.output = torch.nn.Linear(8, VOCAB)

    def forward(self, tokens, labels):
        logits = self.output(self.norm(self.embedding(tokens)))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    per_token = model(tokens[:, :-1], tokens[:, 1:])

    def loss_func(output):
        total = output.sum()
        num_tokens = torch.tensor(output.numel(), dtype=torch.int)
        return total, num_tokens, {"lm loss": torch.stack([total.detach(), num_tokens.float()])}

    return per_token, loss_func


def _train_step(micro_batch_size, data, seed=0):
    torch.manual_seed(seed)
    net = TinyLM()
    model = DistributedDataParallel(net.config, DistributedDataParallelConfig(), net)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=0.1, clip_grad=1.0), [model])
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.1, 0.01 * group["wd_mult"]
    net.config.grad_scale_func = optimizer.scale_loss
    net.config.no_sync_func = model.no_sync
    net.config.finalize_model_grads_func = finalize_model_grads
    model.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(data.split(micro_batch_size)),
        model=[model],
        num_microbatches=len(data) // micro_batch_size,
        seq_length=data.shape[1] - 1,
        micro_batch_size=micro_batch_size,
    )
    total = torch.stack([report["lm loss"] for report in reports]).sum(dim=0)
    _, grad_norm, _ = optimizer.step()
    return (total[0] / total[1]).item(), grad_norm, copy.deepcopy(net.state_dict())


def test_four_micro_batches_of_two_equal_one_of_eight():
    data = torch.randint(0, VOCAB, (8, 11), generator=torch.Generator().manual_seed(7))
    loss_accumulated, norm_accumulated, weights_accumulated = _train_step(2, data)
    loss_single, norm_single, weights_single = _train_step(8, data)
    assert abs(loss_accumulated - loss_single) <= 1e-6 * loss_single
    assert abs(norm_accumulated - norm_single) <= 1e-5 * norm_single
    for name, value in weights_single.items():
        torch.testing.assert_close(weights_accumulated[name], value, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    untouched = TinyLM().state_dict()
    assert any(not torch.equal(untouched[name], value) for name, value in weights_single.items())


def test_forward_only_reports_losses_without_gradients():
    torch.manual_seed(0)
    net = TinyLM()
    model = DistributedDataParallel(net.config, DistributedDataParallelConfig(), net)
    data = torch.randint(0, VOCAB, (4, 6))
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(data.split(2)), model=[model], num_microbatches=2, forward_only=True
        )
    assert len(reports) == 2 and all(report["lm loss"][1] == 10 for report in reports)
    assert all(torch.count_nonzero(param.main_grad) == 0 for param in net.parameters())
