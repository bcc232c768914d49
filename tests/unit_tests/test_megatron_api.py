"""Megatron-LM core_v0.9.0's public API, as a user's scripts call it: names at their module paths, parameter
names and order, return shapes, and behaviour (single process; the gloo cases live beside their modules:
core/test_parallel_state.py for the RankGenerator table and CP/EP groups, core/test_num_microbatches_calculator.py
for the ramp-up, core/tensor_parallel/test_data.py for the tensor-parallel broadcasts)."""

import importlib
import inspect
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO_ROOT

# (module, name, its parameters in Megatron-LM core_v0.9.0's order, or None for a class / value)
SIGNATURES = [
    ("megatron.training", "pretrain", [
        "train_valid_test_dataset_provider", "model_provider", "model_type", "forward_step_func",
        "process_non_loss_data_func", "extra_args_provider", "args_defaults", "get_embedding_ranks",
        "get_position_embedding_ranks"]),
    ("megatron.training", "get_args", []),
    ("megatron.training", "get_timers", []),
    ("megatron.training", "get_tokenizer", []),
    ("megatron.training", "print_rank_0", ["message"]),
    ("megatron.core", "mpu", None),
    ("megatron.core", "ModelParallelConfig", None),
    ("megatron.core.enums", "ModelType", None),
    ("megatron.core.utils", "StragglerDetector", None),
    ("megatron.core.transformer.spec_utils", "import_module", ["module_path"]),
    ("megatron.training.utils", "get_batch_on_this_tp_rank", ["data_iterator"]),
    ("megatron.training.utils", "get_batch_on_this_cp_rank", ["batch"]),
    ("megatron.training.arguments", "core_transformer_config_from_args", ["args", "config_class"]),
    ("megatron.training.yaml_arguments", "core_transformer_config_from_yaml", ["args", "transfomer_key"]),
    ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec",
     ["num_experts", "moe_grouped_gemm", "qk_layernorm"]),
    ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_with_transformer_engine_spec",
     ["num_experts", "moe_grouped_gemm", "qk_layernorm", "fp8"]),
    ("megatron.core.datasets.utils", "get_blend_from_list", ["blend"]),
    ("megatron.core.datasets.utils", "compile_helpers", []),
    ("megatron.core.parallel_state", "initialize_model_parallel", [
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
        "pipeline_model_parallel_split_rank", "use_sharp", "context_parallel_size", "expert_model_parallel_size",
        "nccl_communicator_config_path", "distributed_timeout_minutes", "order", "encoder_tensor_model_parallel_size",
        "encoder_pipeline_model_parallel_size", "get_embedding_ranks", "get_position_embedding_ranks"]),
    ("megatron.core.parallel_state", "RankGenerator", ["tp", "ep", "dp", "pp", "cp", "order", "rank_offset"]),
    ("megatron.core.parallel_state", "get_data_parallel_group", ["with_context_parallel"]),
    ("megatron.core.parallel_state", "get_data_parallel_world_size", ["with_context_parallel"]),
    ("megatron.core.parallel_state", "get_data_parallel_rank", ["with_context_parallel"]),
    ("megatron.core.parallel_state", "get_amax_reduction_group", ["with_context_parallel", "tp_only_amax_red"]),
    ("megatron.core.parallel_state", "get_model_parallel_group", ["with_expert_parallel"]),
    ("megatron.core.parallel_state", "set_tensor_model_parallel_world_size", ["world_size"]),
    ("megatron.core.parallel_state", "set_pipeline_model_parallel_rank", ["rank"]),
    ("megatron.core.parallel_state", "is_pipeline_first_stage", ["ignore_virtual"]),
    ("megatron.core.parallel_state", "is_rank_in_embedding_group", ["ignore_virtual"]),
    ("megatron.core.num_microbatches_calculator", "init_num_microbatches_calculator", [
        "rank", "rampup_batch_size", "global_batch_size", "micro_batch_size", "data_parallel_size",
        "decrease_batch_size_if_needed"]),
    ("megatron.core.num_microbatches_calculator", "reconfigure_num_microbatches_calculator", [
        "rank", "rampup_batch_size", "global_batch_size", "micro_batch_size", "data_parallel_size",
        "decrease_batch_size_if_needed"]),
    ("megatron.core.num_microbatches_calculator", "update_num_microbatches",
     ["consumed_samples", "consistency_check", "verbose"]),
    ("megatron.core.num_microbatches_calculator", "get_current_running_global_batch_size", []),
    ("megatron.core.num_microbatches_calculator", "get_micro_batch_size", []),
    ("megatron.core.num_microbatches_calculator", "destroy_num_microbatches_calculator", []),
    ("megatron.core.pipeline_parallel", "get_forward_backward_func", []),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", [
        "forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length", "micro_batch_size",
        "decoder_seq_length", "forward_only", "collect_non_loss_data", "first_val_step"]),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving", [
        "forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length", "micro_batch_size",
        "decoder_seq_length", "forward_only", "collect_non_loss_data", "first_val_step"]),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving", [
        "forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length", "micro_batch_size",
        "decoder_seq_length", "forward_only", "collect_non_loss_data", "first_val_step"]),
    ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler", None),
    ("megatron.core.optimizer", "OptimizerConfig", None),
    ("megatron.core.optimizer", "get_megatron_optimizer", None),
    ("megatron.core.optimizer", "ChainedOptimizer", ["chained_optimizers"]),
    ("megatron.core.distributed", "DistributedDataParallel", None),
    ("megatron.core.distributed", "DistributedDataParallelConfig", None),
    ("megatron.core.distributed", "finalize_model_grads", ["model", "num_tokens"]),
    ("megatron.core.transformer.module", "Float16Module", ["config", "module"]),
    ("megatron.core.tensor_parallel.data", "broadcast_data", ["keys", "data", "datatype"]),
    ("megatron.core.tensor_parallel.utils", "VocabUtility", None),
    ("megatron.core.tensor_parallel.utils", "split_tensor_along_last_dim",
     ["tensor", "num_partitions", "contiguous_split_chunks"]),
    ("megatron.core.tensor_parallel.random", "checkpoint", ["function", "distribute_saved_activations", "args"]),
    ("megatron.core.tensor_parallel.layers", "linear_with_grad_accumulation_and_async_allreduce", [
        "input", "weight", "bias", "gradient_accumulation_fusion", "async_grad_allreduce", "sequence_parallel",
        "grad_output_buffer", "wgrad_deferral_limit", "allreduce_dgrad"]),
    ("megatron.core.tensor_parallel.layers", "linear_with_frozen_weight", [
        "input", "weight", "bias", "gradient_accumulation_fusion", "async_grad_allreduce", "sequence_parallel",
        "grad_output_buffer", "wgrad_deferral_limit", "allreduce_dgrad"]),
    ("megatron.training.tokenizer.tokenizer", "_vocab_size_with_padding", ["orig_vocab_size", "args", "logging_enabled"]),
]


@pytest.mark.parametrize("module, name, parameters", SIGNATURES, ids=[f"{m}.{n}" for m, n, _ in SIGNATURES])
def test_name_and_signature(module, name, parameters):
    obj = getattr(importlib.import_module(module), name)
    if parameters is not None:
        # Megatron's parameters come first and in its order; ours may follow (e.g. pretrain's args_list).
        assert list(inspect.signature(obj).parameters)[: len(parameters)] == parameters


def test_mpu_is_parallel_state_and_model_type():
    from megatron.core import mpu, parallel_state
    from megatron.core.enums import ModelType

    assert mpu is parallel_state
    assert [member.name for member in ModelType] == [
        "encoder_or_decoder", "encoder_and_decoder", "retro_encoder", "retro_decoder"
    ]


def test_straggler_detector_is_a_no_op_timing_context():
    from megatron.core.utils import StragglerDetector

    stimer = StragglerDetector()
    with stimer(bdata=True):
        value = 1
    with stimer:
        value += 1
    stimer.configure(world=1, rank=0, enabled=True)
    assert value == 2 and not stimer.enabled and stimer.report(1.0, 1) is False


def test_import_module_and_layer_spec_errors():
    from megatron.core.errors import UserError
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    spec = import_module(["megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"])
    assert spec is gpt_layer_specs.get_gpt_layer_local_spec
    assert isinstance(spec(None, False, True), ModuleSpec)
    with pytest.raises(UserError, match="no attribute"):
        import_module(["megatron.core.models.gpt.gpt_layer_specs", "missing"])
    assert gpt_layer_specs.get_gpt_layer_local_spec(8, True, False).submodules.mlp.submodules.moe is not None
    with pytest.raises(UserError, match="transformer_engine|Transformer Engine"):
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(None, False, False, None)


class _ToyModel(torch.nn.Module):
    """y = x * w per token; the 'loss' per token is y (so gradients are easy to state)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.ones(1))

    def set_input_tensor(self, tensor):
        pass

    def forward(self, tokens):
        return tokens * self.weight


def _ddp(calculate_per_token_loss):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                               calculate_per_token_loss=calculate_per_token_loss)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), _ToyModel(config))
    config.finalize_model_grads_func = finalize_model_grads
    return model


# Two micro batches: 3 tokens summing to 3, and 1 token equal to 5 (loss mask all ones).
_MICRO_BATCHES = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5.0])]


def _forward_step(loss_contract):
    def forward_step(data_iterator, model):
        output = model(next(data_iterator))

        def loss_func(output_tensor, non_loss_data=False):
            if non_loss_data:
                return output_tensor.detach()
            total, count = output_tensor.sum(), torch.tensor(output_tensor.numel(), dtype=torch.int)
            if loss_contract == 2:  # core_v0.9.0's older contract: (loss, {'lm loss': averaged loss})
                mean = total / count
                return mean, {"lm loss": mean.detach()}
            return total, count, {"lm loss": (total.detach(), count.float())}

        return output, loss_func

    return forward_step


@pytest.mark.parametrize(
    "loss_contract, per_token, expected_grad",
    [
        (2, False, (1.0 + 5.0) / 2),  # mean of the micro batches' token means
        (3, False, (1.0 + 5.0) / 2),  # each micro batch's sum over its tokens, averaged over micro batches
        (3, True, (3.0 + 5.0) / 4),  # --calculate-per-token-loss: one mean over all 4 tokens of the step
    ],
)
def test_loss_function_contracts_and_per_token_loss(loss_contract, per_token, expected_grad):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _ddp(per_token)
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step(loss_contract),
        data_iterator=iter(_MICRO_BATCHES),
        model=[model],
        num_microbatches=2,
        seq_length=None,
        micro_batch_size=None,
        decoder_seq_length=None,
        forward_only=False,
    )
    assert len(reports) == 2 and set(reports[0]) == {"lm loss"}
    assert model.module.weight.main_grad.item() == pytest.approx(expected_grad)


def test_collect_non_loss_data_returns_what_loss_func_gives():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected = get_forward_backward_func()(
        forward_step_func=_forward_step(3), data_iterator=iter(_MICRO_BATCHES), model=[_ddp(False)],
        num_microbatches=2, seq_length=None, micro_batch_size=None, forward_only=True, collect_non_loss_data=True,
    )
    assert [tensor.tolist() for tensor in collected] == [[1.0, 1.0, 1.0], [5.0]]


def test_training_loop_averages_megatron_tuple_reports():
    from megatron.core import parallel_state
    from megatron.training.training import _reduce_losses

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        reports = [{"lm loss": (torch.tensor(3.0), torch.tensor(3.0))}, {"lm loss": (torch.tensor(5.0), torch.tensor(1.0))}]
        assert _reduce_losses(reports) == {"lm loss": 2.0}
        assert _reduce_losses([{"lm loss": torch.tensor(1.0)}, {"lm loss": torch.tensor(5.0)}]) == {"lm loss": 3.0}
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_transformer_layer_returns_hidden_states_and_context():
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, hidden_dropout=0.0,
                               attention_dropout=0.0, init_method=torch.nn.init.zeros_)
    layer = build_module(get_gpt_layer_local_spec(), config=config, layer_number=1)
    hidden = torch.randn(5, 2, 8)
    output, context = layer(hidden, None)
    assert output.shape == hidden.shape and context is None
    embedding = LanguageModelEmbedding(config, vocab_size=16, max_sequence_length=5)
    assert (embedding.vocab_size, embedding.max_sequence_length, embedding.num_tokentypes) == (16, 5, 0)
    assert embedding.tokentype_embeddings is None and embedding.add_position_embedding
    assert embedding.word_embeddings.weight.shape == (16, 8) and embedding.position_embeddings.weight.shape == (5, 8)
    assert embedding(torch.zeros(2, 5, dtype=torch.long), torch.arange(5).unsqueeze(0)).shape == (5, 2, 8)


def test_checkpoint_takes_distribute_saved_activations():
    from megatron.core.tensor_parallel.random import checkpoint

    weight = torch.tensor([2.0], requires_grad=True)
    checkpoint(lambda x: (x * weight).sum(), False, torch.tensor([3.0])).backward()
    assert weight.grad.item() == 3.0


def test_float16_module_casts_inputs_and_outputs():
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, bf16=True, params_dtype=torch.bfloat16)
    wrapped = Float16Module(config, torch.nn.Linear(4, 4))
    assert wrapped.module.weight.dtype == torch.bfloat16
    assert wrapped(torch.ones(2, 4)).dtype == torch.float32


def test_chained_optimizer_steps_each_and_combines_norms():
    from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer

    chunks = [_ddp(False), _ddp(False)]
    config = OptimizerConfig(optimizer="sgd", lr=0.5, weight_decay=0.0, clip_grad=0.0)
    optimizers = [get_megatron_optimizer(config, [chunk]) for chunk in chunks]
    for chunk, grad in zip(chunks, (3.0, 4.0)):
        chunk.module.weight.main_grad.fill_(grad)
    chained = ChainedOptimizer(optimizers)
    assert len(chained.param_groups) == sum(len(optimizer.param_groups) for optimizer in optimizers)
    update_successful, grad_norm, _ = chained.step()
    assert update_successful and grad_norm == pytest.approx(5.0)
    assert [chunk.module.weight.item() for chunk in chunks] == pytest.approx([1.0 - 1.5, 1.0 - 2.0])
    assert len(chained.state_dict()) == 2


def test_vocab_size_with_padding_and_blend_weights():
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding

    args = SimpleNamespace(make_vocab_size_divisible_by=128, tensor_model_parallel_size=2, rank=0)
    assert _vocab_size_with_padding(50257, args, logging_enabled=False) == 50432
    assert get_blend_from_list([0.3, "A", 0.7, "B"]) == get_blend_from_list(["0.3", "A", "0.7", "B"]) == (["A", "B"], [0.3, 0.7])
    assert get_blend_from_list(["A", "B"]) == (["A", "B"], None)


def test_preprocess_encoder_encodes_a_json_line(gpt2_files):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.pop(0)
    vocab_file, merge_file = gpt2_files
    args = SimpleNamespace(
        tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_file), merge_file=str(merge_file), json_keys=["text"],
        split_sentences=False, keep_newlines=False, append_eod=True, rank=0, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1, vocab_extra_ids=0,
    )
    encoder = preprocess_data.Encoder(args)
    encoder.initializer()
    line = json.dumps({"text": "Hello world"})
    ids, lengths, size = encoder.encode(line)
    assert ids == {"text": [15496, 995, 50256]} and lengths == {"text": [3]} and size == len(line)
    with pytest.raises(ValueError, match="malformed JSON"):
        encoder.encode("{not json")


def test_yaml_cfg_sections_set_flags_and_build_the_transformer_config(tmp_path):
    from megatron.training.arguments import parse_args
    from megatron.training.yaml_arguments import core_transformer_config_from_yaml

    config_file = tmp_path / "gpt.yaml"
    config_file.write_text(
        "language_model:\n  num_layers: 3\n  hidden_size: 64\n  num_attention_heads: 4\n  activation_func: swiglu\n"
        "  layernorm_epsilon: 1.e-6\n  layernorm_zero_centered_gamma: true\n"
        "model_parallel:\n  tensor_model_parallel_size: 1\n  params_dtype: null\n"
    )
    args = parse_args(args_list=["--yaml-cfg", str(config_file), "--num-layers", "2"])
    assert args.num_layers == 2 and args.hidden_size == 64  # the command line wins over the file
    assert args.language_model.num_layers == 3
    config = core_transformer_config_from_yaml(args, "language_model")
    assert (config.num_layers, config.hidden_size, config.gated_linear_unit, config.layernorm_epsilon) == (3, 64, True, 1e-6)
