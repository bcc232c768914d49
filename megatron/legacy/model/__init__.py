from megatron.legacy.model.gpt_model import GPTModel

__all__ = ["GPTModel"]
