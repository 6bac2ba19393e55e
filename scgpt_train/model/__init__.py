"""scGPT model: encoders, SDPA attention (plain and generative), heads."""

from scgpt_train.model.attention import generative_attention_mask, generative_sdpa, naive_attention
from scgpt_train.model.config import ScGPTConfig
from scgpt_train.model.heads import ecs_loss, grad_reverse
from scgpt_train.model.scgpt import ScGPT

__all__ = [
    "ScGPT",
    "ScGPTConfig",
    "ecs_loss",
    "grad_reverse",
    "generative_sdpa",
    "generative_attention_mask",
    "naive_attention",
]
