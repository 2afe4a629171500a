"""Model cards: the backbone family and size, the pretrained backbone a run started from, Hub metadata."""

from huggingface_hub import ModelCard

from modeling_eomt import EomtConfig
from modeling_eomt.model_card import build_model_card


def test_dinov3_card_names_the_family_and_the_base_backbone():
    config = EomtConfig.from_preset("coco_panoptic_eomt_large_640_dinov3")
    base = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    card = ModelCard(build_model_card(config, "panoptic", "coco_panoptic", {"pq": 56.8}, base_backbone=base))
    assert card.data.base_model == base and "dinov3" in card.data.tags
    assert "a DINOv3 ViT-L (24 blocks, width 1024)" in card.text and f"backbone `{base}`" in card.text


def test_dinov2_card_without_a_base_backbone():
    card = ModelCard(build_model_card(EomtConfig.from_preset("ade20k_semantic_eomt_large_512"), "semantic"))
    assert card.data.base_model is None and "dinov2" in card.data.tags
    assert "a DINOv2 ViT-L" in card.text and "pretrained backbone" not in card.text
