"""Models for the examples, written as pipegrid PipelineModules."""

from examples.models.gpt import GPT, GPTConfig, gpt_loss, pad_vocab_size, small_gpt_config, tiny_gpt_config

__all__ = ["GPT", "GPTConfig", "gpt_loss", "pad_vocab_size", "small_gpt_config", "tiny_gpt_config"]
