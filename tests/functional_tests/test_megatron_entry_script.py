"""A training script written the way Megatron-LM core_v0.9.0's pretrain_gpt.py is (its imports, its model
provider, get_batch, loss function, forward step and dataset provider, pretrain(..., ModelType, ...)) trains
here, in one process and under torchrun x2, and logs the same losses as our pretrain_gpt.py."""

import re
import textwrap

import pytest

from tests.functional_tests.training_runs import (
    gpt2_dataset,
    iteration_records,
    require_data_pipeline,
    run_pretrain,
    training_flags,
)

require_data_pipeline()

# Written for this test after Megatron-LM core_v0.9.0's pretrain_gpt.py. Not used here: its fp8_param_gather
# branch (Transformer Engine) and the dataset config fields renormalize_blend_weights / s3_cache_path.
MEGATRON_STYLE_SCRIPT = textwrap.dedent(
    '''
    import os
    from functools import partial

    import torch

    import megatron.legacy.model
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.spec_utils import import_module
    from megatron.core.utils import StragglerDetector
    from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args
    from megatron.training.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training.yaml_arguments import core_transformer_config_from_yaml

    stimer = StragglerDetector()


    def model_provider(pre_process=True, post_process=True):
        args = get_args()
        print_rank_0("building GPT model ...")
        if args.yaml_cfg is not None:
            config = core_transformer_config_from_yaml(args, "language_model")
        else:
            config = core_transformer_config_from_args(args)
        if args.spec is not None:
            spec = import_module(args.spec)
        elif args.transformer_impl == "transformer_engine":
            spec = get_gpt_layer_with_transformer_engine_spec(args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, args.fp8)
        else:
            spec = get_gpt_layer_local_spec(args.num_experts, args.moe_grouped_gemm, args.qk_layernorm)
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
            parallel_output=True,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base,
        )


    def get_batch(data_iterator):
        if (not mpu.is_pipeline_first_stage()) and (not mpu.is_pipeline_last_stage()):
            return None, None, None, None, None
        batch = get_batch_on_this_tp_rank(data_iterator)
        batch = get_batch_on_this_cp_rank(batch)
        return batch.values()


    def loss_func(loss_mask, output_tensor):
        args = get_args()
        losses = output_tensor.float()
        loss_mask = loss_mask.view(-1).float()
        total_tokens = loss_mask.sum()
        loss = torch.cat([torch.sum(losses.view(-1) * loss_mask).view(1), total_tokens.view(1)])
        if args.context_parallel_size > 1:
            torch.distributed.all_reduce(loss, group=mpu.get_context_parallel_group())
        if args.check_for_nan_in_loss_and_grad:
            assert not loss[0].isnan(), f"Rank {torch.distributed.get_rank()}: NaN loss on {os.uname()[1]}"
        reporting_loss = loss.clone().detach()
        torch.distributed.all_reduce(reporting_loss, group=mpu.get_data_parallel_group())
        local_num_tokens = loss[1].clone().detach().to(torch.int)
        return loss[0] * args.context_parallel_size, local_num_tokens, {"lm loss": (reporting_loss[0], reporting_loss[1])}


    def forward_step(data_iterator, model):
        timers = get_timers()
        timers("batch-generator", log_level=2).start()
        with stimer(bdata=True):
            tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
        timers("batch-generator").stop()
        with stimer:
            output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
        return output_tensor, partial(loss_func, loss_mask)


    def is_dataset_built_on_rank():
        return (mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()) and mpu.get_tensor_model_parallel_rank() == 0


    def core_gpt_dataset_config_from_args(args):
        return GPTDatasetConfig(
            random_seed=args.seed,
            sequence_length=args.seq_length,
            blend=get_blend_from_list(args.data_path),
            blend_per_split=[
                get_blend_from_list(args.train_data_path),
                get_blend_from_list(args.valid_data_path),
                get_blend_from_list(args.test_data_path),
            ],
            split=args.split,
            num_dataset_builder_threads=args.num_dataset_builder_threads,
            path_to_cache=args.data_cache_path,
            mmap_bin_files=args.mmap_bin_files,
            tokenizer=get_tokenizer(),
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
            create_attention_mask=args.create_attention_mask_in_dataloader,
        )


    def train_valid_test_datasets_provider(train_val_test_num_samples):
        args = get_args()
        config = core_gpt_dataset_config_from_args(args)
        dataset_type = MockGPTDataset if args.mock_data else GPTDataset
        print_rank_0("> building train, validation, and test datasets for GPT ...")
        train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
            dataset_type, train_val_test_num_samples, is_dataset_built_on_rank, config
        ).build()
        print_rank_0("> finished creating GPT datasets ...")
        return train_ds, valid_ds, test_ds


    if __name__ == "__main__":
        train_valid_test_datasets_provider.is_distributed = True
        pretrain(
            train_valid_test_datasets_provider,
            model_provider,
            ModelType.encoder_or_decoder,
            forward_step,
            args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        )
    '''
)


@pytest.fixture(scope="module")
def data_and_script(tmp_path_factory):
    directory = tmp_path_factory.mktemp("megatron_entry")
    script = directory / "pretrain_gpt_megatron_style.py"
    script.write_text(MEGATRON_STYLE_SCRIPT)
    return gpt2_dataset(directory), script


@pytest.mark.parametrize(
    "nproc, layout",
    [(1, []), (2, []), (2, ["--context-parallel-size", 2, "--attention-dropout", 0])],
    ids=["one-rank", "data-parallel", "context-parallel"],
)
def test_megatron_style_script_logs_our_losses(data_and_script, nproc, layout):
    """Under context parallelism Megatron's loss_func sums the loss and tokens over the CP group itself."""
    data_path, script = data_and_script
    flags = training_flags(data_path, "mcore", "--train-iters", 10, *layout)
    ours = run_pretrain(flags, nproc=nproc)
    theirs = run_pretrain(flags, nproc=nproc, script=script)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    ours_records, their_records = iteration_records(ours.stdout), iteration_records(theirs.stdout)
    assert sorted(their_records) == list(range(1, 11))
    # Megatron's loss_func sums its report over data-parallel ranks per micro batch, ours per step: the same
    # mean up to the last printed digit. Everything else (learning rate, grad norm: the same training) is equal.
    assert {i: LM_LOSS.sub("", line) for i, line in their_records.items()} == {
        i: LM_LOSS.sub("", line) for i, line in ours_records.items()
    }
    for iteration, line in their_records.items():
        assert _lm_loss(line) == pytest.approx(_lm_loss(ours_records[iteration]), rel=1e-6)


LM_LOSS = re.compile(r" lm loss: ([\d.E+-]+) \|")


def _lm_loss(line: str) -> float:
    return float(LM_LOSS.search(line).group(1))
