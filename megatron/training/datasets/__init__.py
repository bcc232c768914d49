"""The datasets of pretrain_gpt.py: GPT datasets (or mock data) built from the data flags."""

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.training.datasets.utils import get_blend_and_blend_per_split
from megatron.training.global_vars import get_args, get_tokenizer
from megatron.training.utils import print_rank_0


def core_gpt_dataset_config_from_args(args, tokenizer) -> GPTDatasetConfig:
    """The one place where the data flags become a GPTDatasetConfig."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split if blend is not None or blend_per_split is None else None,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        shared_storage=not args.no_shared_storage,
        vocab_size=getattr(args, "padded_vocab_size", None),
    )


def _describe(name, dataset) -> str:
    if dataset is None:
        return f"    {name}: none"
    members = getattr(dataset, "datasets", [dataset])
    weights = getattr(dataset, "weights", [1.0])
    parts = ", ".join(
        f"{member.dataset_path or 'mock'} (weight {weight:.4g}, {len(member)} samples)"
        for member, weight in zip(members, weights)
    )
    return f"    {name}: {len(dataset)} samples from {parts}"


def train_valid_test_datasets_provider(train_valid_test_num_samples):
    """[train, valid, test] datasets holding at least the given sample counts (None for an empty split)."""
    args = get_args()
    config = core_gpt_dataset_config_from_args(args, get_tokenizer())
    dataset_class = MockGPTDataset if config.mock else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_class, list(train_valid_test_num_samples), lambda: True, config
    ).build()
    for name, dataset in zip(("train", "validation", "test"), datasets):
        print_rank_0(_describe(name, dataset))
    print_rank_0("> finished creating GPT datasets ...")
    return datasets
