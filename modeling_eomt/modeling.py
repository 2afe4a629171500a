"""EoMT: a plain ViT whose last blocks also process learned queries, followed by a light mask/class head.

Reading order: embeddings → ViT blocks (queries join before block L − num_blocks) → head (`head.py`) → output.
In training, each of the last `num_blocks` blocks restricts every query's attention to the patches of its current
mask prediction; the restriction is annealed away per block (`attn_mask_probs`), so inference is a plain ViT forward
followed by one head call. One file serves both backbone families; the config chooses: DINOv2 (`EomtConfig`,
learned absolute position embeddings) or DINOv3 (`EomtDinov3Config`, rotary embeddings on the patch tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.output_capturing import capture_outputs

from . import banded_upscale
from .configuration import EomtBaseConfig, EomtConfig, EomtDinov3Config
from .head import EomtMaskHead, EomtScaleBlock, MaskPrediction, patch_grid_logits, split_tokens
from .input_checks import check_inputs
from .loading import check_loaded, legacy_swiglu_names, readable_weight_errors
from .loss import EomtLoss
from .positions import EomtRotaryEmbedding, resize_position_grid, rotate_patch_tokens
from .recompute import recompute_all_but_matmuls

logger = logging.get_logger(__name__)


@dataclass
class EomtForUniversalSegmentationOutput(ModelOutput):
    r"""
    Output of [`EomtForUniversalSegmentation`]; feed it to the processor's `post_process_*_segmentation`.

    Args:
        loss (`torch.Tensor`, *optional*):
            Total loss over every supervised prediction, returned when `mask_labels` and `class_labels` are given.
        class_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, num_labels + 1)`):
            Class logits of each query; the last class is "no object".
        masks_queries_logits (`torch.Tensor` of shape `(batch_size, num_queries, height, width)`):
            Mask logits of each query at `2**num_upscale_blocks` times the patch grid.
        last_hidden_state (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Normalised output tokens, ordered `[queries | CLS | registers | patches]`.
        hidden_states (`tuple(torch.Tensor)`, *optional*):
            Embedding output and the output of every block (the last one normalised), when `output_hidden_states` is
            set; an index or a list of indices selects some of them.
        attentions (`tuple(torch.Tensor)`, *optional*):
            Attention probabilities of every block `(batch_size, num_heads, seq, seq)`, when `output_attentions=True`
            and the attention implementation returns them (eager).
        patch_offsets (`list[torch.Tensor]`, *optional*):
            Passed through from the processor's sliding windows, for semantic post-processing.
        intermediate_class_queries_logits (`tuple(torch.Tensor)`, *optional*):
            Class logits predicted before each of the last `num_blocks` blocks, when
            `output_intermediate_predictions=True`.
        intermediate_masks_queries_logits (`tuple(torch.Tensor)`, *optional*):
            Mask logits predicted before each of the last `num_blocks` blocks, when
            `output_intermediate_predictions=True`.
        loss_dict (`dict[str, torch.Tensor]`, *optional*):
            The weighted loss terms, summed over predictions, when a loss is computed.
    """

    loss: torch.Tensor | None = None
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    patch_offsets: list[torch.Tensor] | None = None
    intermediate_class_queries_logits: tuple[torch.Tensor, ...] | None = None
    intermediate_masks_queries_logits: tuple[torch.Tensor, ...] | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


class EomtPatchEmbeddings(nn.Module):
    """DINOv2 checkpoints keep the patch projection one level down (`patch_embeddings.projection`)."""

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values)


class EomtEmbeddings(nn.Module):
    """`[CLS | registers | patches]`; DINOv2 adds learned position embeddings to the patches (none for the prefix)."""

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
        if config.uses_rope:
            self.patch_embeddings = nn.Conv2d(
                config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
            )
        else:
            self.patch_embeddings = EomtPatchEmbeddings(config)
            self.position_embeddings = nn.Embedding(config.grid_size[0] * config.grid_size[1], config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.native_grid = config.grid_size
        self.num_prefix_tokens = 1 + config.num_register_tokens

    def position_embeddings_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings `(1, h·w, D)` for a patch grid: the stored table resampled bicubically (exactly the
        table at the native grid, so no branch on the size is needed and exports stay dynamic)."""
        return resize_position_grid(self.position_embeddings.weight, self.native_grid, grid)[None]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patches = self.patch_embeddings(pixel_values.to(self.cls_token.dtype))
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)
        if hasattr(self, "position_embeddings"):
            patches = patches + self.position_embeddings_for(grid)
        prefix = torch.cat([self.cls_token, self.register_tokens], dim=1).expand(patches.shape[0], -1, -1)
        return self.dropout(torch.cat([prefix.to(patches.dtype), patches], dim=1)), grid


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, *, scaling: float, dropout: float = 0.0,
                            **_) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention with explicit probabilities (kept for `output_attentions`), softmax in float32; `attention_mask` is
    additive. Returns the context laid out `(B, T, heads, head_dim)`, as transformers' other implementations do."""
    logits = query @ key.transpose(-2, -1) * scaling
    if attention_mask is not None:
        logits += attention_mask  # a fresh tensor: adding in place saves a full-size copy
    probs = logits.softmax(-1, dtype=torch.float32).to(query.dtype)
    context = F.dropout(probs, dropout, module.training) @ value
    return context.transpose(1, 2).contiguous(), probs


class EomtAttention(nn.Module):
    """Multi-head self-attention through transformers' attention interface (eager, SDPA, flex, ...)."""

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        dim, (query_bias, key_bias, value_bias, out_bias) = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(dim, dim, bias=query_bias)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim, bias=value_bias)
        # The two checkpoint families name the output projection differently.
        self.output_name = "o_proj" if config.uses_rope else "out_proj"
        self.add_module(self.output_name, nn.Linear(dim, dim, bias=out_bias))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """`rotary`: DINOv3's `(cos, sin)` for the patch tokens (None for DINOv2's absolute positions)."""
        batch_size, seq_len, _ = hidden_states.shape
        query, key, value = (
            proj(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rotary is not None:
            query, key = (rotate_patch_tokens(states, *rotary) for states in (query, key))
        if attention_mask is not None and self.config._attn_implementation == "flex_attention":
            # torch's CPU flex kernel crashes on a dense score mask; a BlockMask of masked attention is future work.
            raise ValueError(
                "Masked attention (training, or a model with `attn_mask_probs` > 0) runs with eager or SDPA "
                "attention; use `model.set_attn_implementation('sdpa')`, or anneal the model for flex attention."
            )
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, weights = attention(
            self, query, key, value, attention_mask, scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0, **kwargs,
        )  # fmt: skip
        return getattr(self, self.output_name)(context.reshape(batch_size, seq_len, -1)), weights


class EomtLayerScale(nn.Module):
    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class EomtMLP(nn.Module):
    """DINOv2's MLP, `fc2(act(fc1 x))`."""

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_hidden_size)
        self.fc2 = nn.Linear(config.mlp_hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.mlp_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class EomtProjectionMLP(nn.Module):
    """`down_proj(act(up_proj x))` (DINOv3), gated `down_proj(act(gate_proj x) · up_proj x)` (DINOv3 gated,
    DINOv2-giant's SwiGLU)."""

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        dim, hidden, bias = config.hidden_size, config.mlp_hidden_size, config.mlp_bias_enabled
        self.gate_proj = nn.Linear(dim, hidden, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.activation = ACT2FN[config.mlp_activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.activation(self.up_proj(hidden_states)))
        return self.down_proj(self.activation(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class EomtLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block with LayerScale: `x + ls1(attn(norm1 x))`, then `x + ls2(mlp(norm2 x))`."""

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        # Two residual branches, each pre-normed and scaled: attention (…1), then the MLP (…2).
        self.norm1, self.norm2 = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) for _ in range(2))
        self.layer_scale1, self.layer_scale2 = EomtLayerScale(config), EomtLayerScale(config)
        self.attention = EomtAttention(config)
        self.mlp = EomtMLP(config) if not (config.uses_rope or config.gated_mlp) else EomtProjectionMLP(config)
        self.drop_path_rate = config.drop_path_rate  # stochastic depth: drops a residual branch per sample
        self.selective_recompute = False  # see `EomtForUniversalSegmentation.set_selective_recompute`

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:  # fmt: skip
        attn_output, _ = self.attention(self.norm1(hidden_states), attention_mask, rotary, **kwargs)
        hidden_states = self.add_branch(hidden_states, attn_output, self.layer_scale1)
        mlp_input = self.norm2(hidden_states)
        if self.selective_recompute and self.training and not self.gradient_checkpointing:
            mlp_output = recompute_all_but_matmuls(self.mlp, mlp_input)
        else:
            mlp_output = self.mlp(mlp_input)
        return self.add_branch(hidden_states, mlp_output, self.layer_scale2)

    def add_branch(
        self, hidden_states: torch.Tensor, branch: torch.Tensor, layer_scale: EomtLayerScale
    ) -> torch.Tensor:
        """`x + drop_path(γ · branch)`, in one pass over memory (addcmul) when no path can be dropped."""
        if self.training and self.drop_path_rate > 0:
            keep_prob = 1.0 - self.drop_path_rate
            keep = branch.new_empty(branch.shape[0], *(1,) * (branch.ndim - 1)).bernoulli_(keep_prob)
            return hidden_states + layer_scale(branch) * keep / keep_prob
        return torch.addcmul(hidden_states, branch, layer_scale.lambda1)


class EomtPreTrainedModel(PreTrainedModel):
    config_class = EomtConfig
    config: EomtBaseConfig
    base_model_prefix = "eomt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EomtLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": EomtLayer, "attentions": EomtAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module is getattr(self, "query", None):
            # Unit-scale queries, as in the original release (`nn.Embedding`'s default): at `initializer_range` they
            # vanish beside a pretrained backbone's large patch tokens and all collapse to the same token.
            init.normal_(module.weight, std=1.0)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std)
        elif isinstance(module, EomtLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, EomtEmbeddings):
            init.trunc_normal_(module.cls_token, std=std)
            init.zeros_(module.register_tokens)
        elif isinstance(module, EomtRotaryEmbedding):
            init.copy_(module.inv_freq, module.default_inv_freq())
        elif isinstance(module, EomtLoss):
            init.copy_(module.empty_weight, module.default_empty_weight())
        elif isinstance(module, EomtForUniversalSegmentation):
            init.ones_(module.attn_mask_probs)


class EomtForUniversalSegmentation(EomtPreTrainedModel):
    """EoMT with its class and mask head, for panoptic, instance and semantic segmentation (DINOv2 or DINOv3, by the
    config).

    Which query blocks mask their attention is a Python tuple (`masking_blocks`, block i masks when
    `attn_mask_probs[i] > 0`), re-read from the buffer at construction, by `set_attn_mask_probs`, by `train()` and
    `eval()` (which `from_pretrained` and the Trainer's every step call) and after `load_state_dict`; never inside
    `forward`, so a forward makes no device read and compiled graphs see a constant. After writing the buffer in
    place some other way, call `model.train(model.training)` to re-read it.
    """

    def __init__(self, config: EomtBaseConfig):
        super().__init__(config)
        self.embeddings = EomtEmbeddings(config)
        if config.uses_rope:
            self.rope_embeddings = EomtRotaryEmbedding(config)
        self.layers = nn.ModuleList(EomtLayer(config) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.query = nn.Embedding(config.num_queries, config.hidden_size)
        self.upscale_block = EomtScaleBlock(config)
        self.mask_head = EomtMaskHead(config)
        self.class_predictor = nn.Linear(config.hidden_size, config.num_labels + 1)
        self.criterion = EomtLoss(config)
        # Probability, per query block, that a query's attention is restricted to its mask (annealed 1 → 0).
        self.register_buffer("attn_mask_probs", torch.ones(config.num_blocks))
        self.masking_blocks: tuple[bool, ...] = (True,) * config.num_blocks
        self.register_load_state_dict_post_hook(lambda module, _: module._read_masking_blocks())
        self.upscale_implementation: Literal["banded", "reference"] = "banded"
        self.upscale_band_rows: int | None = None
        self.post_init()

    @property
    def first_query_layer(self) -> int:
        return self.config.num_hidden_layers - self.config.num_blocks

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @capture_outputs
    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        patch_offsets: list[torch.Tensor] | None = None,
        output_intermediate_predictions: bool = False,
        **kwargs,
    ) -> EomtForUniversalSegmentationOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images of any size of at least one patch.
            mask_labels (`list[torch.Tensor]`, *optional*):
                Per image, binary target masks `(num_targets, height, width)` at the input resolution.
            class_labels (`list[torch.LongTensor]`, *optional*):
                Per image, the class id of each target mask `(num_targets,)`.
            patch_offsets (`list[torch.Tensor]`, *optional*):
                Sliding-window offsets from the processor, returned unchanged for post-processing.
            output_intermediate_predictions (`bool`, defaults to `False`):
                Also return the predictions made before each query block.
        """
        check_inputs(pixel_values, mask_labels, class_labels, self.config)
        compute_loss = mask_labels is not None
        hidden_states, grid = self.embeddings(pixel_values)
        rotary = self.rope_embeddings(grid, hidden_states.dtype) if self.config.uses_rope else None
        targets = self.criterion.targets(mask_labels, class_labels, pixel_values.device) if compute_loss else None
        # Each prediction is used up (loss, attention mask, intermediate outputs) before the next one is made: the
        # banded head shares one pixel-embedding map among them.
        loss_terms, intermediate, prediction = [], [], None

        for index, layer in enumerate(self.layers):
            attention_mask = None
            if index == self.first_query_layer:
                queries = self.query.weight[None].expand(hidden_states.shape[0], -1, -1).to(hidden_states.dtype)
                hidden_states = torch.cat([queries, hidden_states], dim=1)
            block = index - self.first_query_layer
            if block >= 0:
                masking = self.masking_blocks[block]
                # Predictions before query blocks enter the loss: all of them in training, the masking ones in eval.
                enters_loss = compute_loss and (masking or self.training)
                if masking or enters_loss or output_intermediate_predictions:
                    prediction = self.predict(self.layernorm(hidden_states), grid, prediction)
                    if enters_loss:
                        loss_terms.append(self.criterion(prediction, targets))
                    if output_intermediate_predictions:
                        intermediate.append((prediction.class_logits, prediction.mask_logits()))
                    if masking:
                        attention_mask = self.query_attention_mask(prediction, grid, self.attn_mask_probs[block])
            hidden_states = layer(hidden_states, attention_mask, rotary, **kwargs)

        sequence_output = self.layernorm(hidden_states)
        loss = loss_dict = None
        if compute_loss or torch.is_grad_enabled() or not self.uses_banded_upscale():
            final = self.predict(sequence_output, grid, prediction)
            class_queries_logits, masks_queries_logits = final.class_logits, final.mask_logits()
            if compute_loss:
                loss_terms.append(self.criterion(final, targets))
                loss_dict = {name: sum(terms[name] for terms in loss_terms) for name in loss_terms[0]}
                loss = sum(loss_dict.values())
        else:  # inference: the logits are made band by band, without a full-size pixel map
            mask_embeddings, class_queries_logits, feature_map = self.head(sequence_output, grid)
            masks_queries_logits = banded_upscale.mask_logits_in_bands(
                self.upscale_block, feature_map, mask_embeddings, self.upscale_band_rows
            )

        intermediate_outputs = {}
        if intermediate:
            class_logits, mask_logits = map(tuple, zip(*intermediate))
            intermediate_outputs = {
                "intermediate_class_queries_logits": class_logits, "intermediate_masks_queries_logits": mask_logits
            }  # fmt: skip
        return EomtForUniversalSegmentationOutput(
            loss=loss, loss_dict=loss_dict, class_queries_logits=class_queries_logits,
            masks_queries_logits=masks_queries_logits, last_hidden_state=sequence_output, patch_offsets=patch_offsets,
            **intermediate_outputs,
        )  # fmt: skip

    def head(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask embeddings `(B, Q, D)` and class logits of the query tokens, and the patch tokens as a channels-last
        map `(B, h, w, D)` for the upscale."""
        query_tokens, feature_map = split_tokens(
            tokens, grid, self.config.num_queries, self.embeddings.num_prefix_tokens
        )
        return self.mask_head(query_tokens), self.class_predictor(query_tokens), feature_map

    def predict(
        self, tokens: torch.Tensor, grid: tuple[int, int], previous: MaskPrediction | None = None
    ) -> MaskPrediction:
        """The head on normalised tokens: class logits, mask embeddings and pixel embeddings (`MaskPrediction`).

        The one place that picks the upscale path: the banded fast path (`banded_upscale.py`, whose predictions
        share `previous`'s pixel map) when `uses_banded_upscale()`, else the plain modules, recomputed in backward
        under activation checkpointing.
        """
        mask_embeddings, class_logits, feature_map = self.head(tokens, grid)
        if self.uses_banded_upscale():
            return banded_upscale.prediction_in_bands(
                self.upscale_block, feature_map, mask_embeddings, class_logits, previous, self.upscale_band_rows
            )
        if self.is_activation_checkpointing and self.training and torch.is_grad_enabled():
            pixel_embeddings = checkpoint(self.upscale_block, feature_map, use_reentrant=False)
        else:
            pixel_embeddings = self.upscale_block(feature_map)
        return MaskPrediction(mask_embeddings, pixel_embeddings, class_logits)

    def uses_banded_upscale(self) -> bool:
        """The banded upscale runs eagerly, unless the reference was chosen (`set_upscale_implementation`) or
        activation checkpointing recomputes the upscale in training. Compiled graphs and exports use the reference:
        the band loops depend on the input size, and compilers fuse the plain ops themselves."""
        checkpointing = self.is_activation_checkpointing and self.training
        return self.upscale_implementation == "banded" and not checkpointing and not torch.compiler.is_compiling()

    @torch.no_grad()
    def query_attention_mask(
        self, prediction: MaskPrediction, grid: tuple[int, int], prob: torch.Tensor
    ) -> torch.Tensor:
        """Additive `(B, 1, T, T)` mask (0 = attend): each query sees only the patches its mask covers.

        Queries, CLS and registers stay visible to everyone; each query keeps its restriction with probability
        `prob`, so annealing `prob` to 0 turns masked attention into plain attention.
        """
        batch_size, num_queries, _ = prediction.mask_embeddings.shape
        device, dtype = prediction.mask_embeddings.device, prediction.mask_embeddings.dtype
        sees_patch = patch_grid_logits(prediction, grid) > 0
        released = torch.rand(batch_size, num_queries, 1, device=device) > prob
        seq_len = num_queries + self.embeddings.num_prefix_tokens + grid[0] * grid[1]
        attention_mask = torch.zeros(batch_size, 1, seq_len, seq_len, dtype=dtype, device=device)
        patch_start = num_queries + self.embeddings.num_prefix_tokens
        blocked = ~(sees_patch | released)
        attention_mask[:, 0, :num_queries, patch_start:].masked_fill_(blocked, torch.finfo(dtype).min)
        return attention_mask

    def _read_masking_blocks(self) -> None:
        if not self.attn_mask_probs.is_meta:
            self.masking_blocks = tuple(prob > 0 for prob in self.attn_mask_probs.tolist())

    def train(self, mode: bool = True) -> EomtForUniversalSegmentation:
        super().train(mode)
        self._read_masking_blocks()
        return self

    @torch.no_grad()
    def set_attn_mask_probs(self, probs: torch.Tensor | list[float]) -> None:
        """Set the masked-attention probability of each query block (annealing writes it before every step)."""
        self.attn_mask_probs.copy_(torch.as_tensor(probs, dtype=self.attn_mask_probs.dtype))
        self._read_masking_blocks()

    def set_upscale_implementation(self, implementation: str, band_rows: int | None = None) -> None:
        """`"banded"` (the default: the last upscale layer a band of rows at a time, `band_rows` output rows per band,
        by default about 8 MB on CPU) or `"reference"` (the plain modules; needed for double backward)."""
        if implementation not in ("banded", "reference"):
            raise ValueError(f"Unknown upscale implementation {implementation!r}; use 'banded' or 'reference'.")
        if band_rows is not None and band_rows < 1:
            raise ValueError(f"`band_rows` must be a positive number of rows, got {band_rows}.")
        self.upscale_implementation, self.upscale_band_rows = implementation, band_rows

    def set_selective_recompute(self, enabled: bool = True) -> None:
        """In training, keep only the MLPs' matmul outputs for backward and recompute the activation (less memory for
        a few percent more compute; `recompute.py`). Off by default; `eomt-train` turns it on. Full activation
        checkpointing (`gradient_checkpointing_enable()`) replaces it where both are on."""
        for layer in self.layers:
            layer.selective_recompute = enabled

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' `from_pretrained`, which also reads SwiGLU weights saved before transformers 5
        (`weights_in`/`weights_out`) and refuses incomplete or non-finite weights (`loading.py`) unless
        `allow_missing_weights=True`."""
        wants_info = kwargs.pop("output_loading_info", False)
        with legacy_swiglu_names(cls.__name__), readable_weight_errors(pretrained_model_name_or_path):
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        check_loaded(model, info, pretrained_model_name_or_path, allow_missing_weights)
        model._weight_conversions = None  # saves use today's names
        return (model, info) if wants_info else model

    @classmethod
    def from_backbone(cls, name_or_path: str, **config_fields) -> EomtForUniversalSegmentation:
        """EoMT whose ViT holds a pretrained DINOv2/DINOv3 backbone's weights; queries and heads start fresh.

        `name_or_path`: a Hub id or local folder in transformers' format, or a timm-format DINOv2 state dict file;
        `config_fields` override the EoMT config (`image_size`, `patch_size`, `num_queries`, `id2label`, ...).
        """
        from .backbones import from_backbone  # the backbone readers pull in transformers' DINO models

        return from_backbone(cls, name_or_path, **config_fields)


class EomtDinov3ForUniversalSegmentation(EomtForUniversalSegmentation):
    """EoMT with a DINOv3 backbone: the same model, configured by [`EomtDinov3Config`] (model type "eomt_dinov3")."""

    config_class = EomtDinov3Config
    base_model_prefix = "eomt_dinov3"


# The model class of each model type, for code that loads either family.
MODEL_CLASSES: dict[str, type[EomtForUniversalSegmentation]] = {
    "eomt": EomtForUniversalSegmentation,
    "eomt_dinov3": EomtDinov3ForUniversalSegmentation,
}
