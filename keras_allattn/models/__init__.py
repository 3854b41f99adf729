"""`AllAttentionLM` and its text generation (`generation`)."""

from keras_allattn.models.all_attention_lm import AllAttentionLM

__all__ = ["AllAttentionLM"]
