"""timm's DINOv2 ViT weight names (`vit_*_patch14[_reg4]_dinov2`, the original release's backbone) → ours: one table
for the backbone reader (`backbones.py`) and the converter of the release's checkpoints (`convert/`).

`{n}` is a block index and `{p}` weight or bias. Several targets split the tensor into equal chunks along dim 0:
timm's fused qkv rows are q|k|v, and its SwiGLU packs the gate and up rows, gate first, in fc1.
"""

from __future__ import annotations

import re

TIMM_DINOV2_NAMES: list[tuple[str, tuple[str, ...]]] = [
    ("cls_token", ("embeddings.cls_token",)),
    ("reg_token", ("embeddings.register_tokens",)),
    ("pos_embed", ("embeddings.position_embeddings.weight",)),
    ("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",)),
    ("blocks.{n}.norm1.{p}", ("layers.{n}.norm1.{p}",)),
    ("blocks.{n}.norm2.{p}", ("layers.{n}.norm2.{p}",)),
    (
        "blocks.{n}.attn.qkv.{p}",
        ("layers.{n}.attention.q_proj.{p}", "layers.{n}.attention.k_proj.{p}", "layers.{n}.attention.v_proj.{p}"),
    ),
    ("blocks.{n}.attn.proj.{p}", ("layers.{n}.attention.out_proj.{p}",)),
    ("blocks.{n}.ls1.gamma", ("layers.{n}.layer_scale1.lambda1",)),
    ("blocks.{n}.ls2.gamma", ("layers.{n}.layer_scale2.lambda1",)),
    ("norm.{p}", ("layernorm.{p}",)),
]
# The MLP's names, by whether it is SwiGLU (`use_swiglu_ffn`).
TIMM_DINOV2_MLP_NAMES: dict[bool, list[tuple[str, tuple[str, ...]]]] = {
    False: [
        ("blocks.{n}.mlp.fc1.{p}", ("layers.{n}.mlp.fc1.{p}",)),
        ("blocks.{n}.mlp.fc2.{p}", ("layers.{n}.mlp.fc2.{p}",)),
    ],
    True: [
        ("blocks.{n}.mlp.fc1.{p}", ("layers.{n}.mlp.gate_proj.{p}", "layers.{n}.mlp.up_proj.{p}")),
        ("blocks.{n}.mlp.fc2.{p}", ("layers.{n}.mlp.down_proj.{p}",)),
    ],
}


def name_pattern(template: str) -> re.Pattern:
    """The regular expression of a name template, with groups `n` and `p`."""
    escaped = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(escaped + "$")
