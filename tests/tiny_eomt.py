"""A tiny EoMT shared by the training tests (3 ViT blocks of width 32 at 32 px; a few ms per step)."""

import torch

from modeling_eomt import EomtConfig, EomtForUniversalSegmentation

NUM_LAYERS = 3


def tiny_model(num_blocks: int = 2) -> EomtForUniversalSegmentation:
    torch.manual_seed(0)
    config = EomtConfig(
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        image_size=32,
        num_blocks=num_blocks,
        num_queries=4,
        num_labels=3,
        train_num_points=64,
    )
    return EomtForUniversalSegmentation(config)
