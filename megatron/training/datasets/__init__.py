"""The datasets of pretrain_gpt.py: GPT datasets (or mock data) built from the data flags."""

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.training.global_vars import get_args, get_tokenizer
from megatron.training.model_config import core_gpt_dataset_config_from_args
from megatron.training.utils import print_rank_0


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
