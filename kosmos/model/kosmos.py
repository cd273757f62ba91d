"""The KOSMOS-1 model: a Magneto decoder reading text with CLIP image embeddings spliced in.

Layout (docs/design.md, "The model"): pre-LN blocks with Magneto sub-LayerNorms, exact GELU, token embeddings
scaled by sqrt(width) and tied to the LM head, fairseq sinusoidal positions (or xPos), and an
attentive-pooling connector turning each image's CLIP tokens into `num_queries` embeddings that
replace the image-slot embeddings before the scaling. Parameter names follow `transformers`' Kosmos-2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kosmos.model.attention import choose_backend, prepare_attention, segment_mask
from kosmos.model.config import ModelConfig, TextConfig
from kosmos.model.loss import token_cross_entropy
from kosmos.model.vision import VisionEncoder
from kosmos.tokenizer import IGNORE_INDEX, PAD


class KVCache:
    """Keys and values of every decoder layer, plus the segment id of each cached position.

    The buffers hold `capacity` positions and are allocated on first use: a decoding step writes its
    keys in place instead of concatenating, so its cost does not grow with the tokens before it.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._segments: torch.Tensor | None = None
        # Every cached position is in segment 1, the segment of a step given no segment ids: then a
        # one-token step sees every cached key and needs no mask.
        self.one_segment = True

    def extend(self, segments: torch.Tensor, known_ones: bool) -> torch.Tensor:
        """Add the segment ids of the positions a forward appends; returns those of every cached one.

        Unless they are `known_ones`, finding out whether they are all 1 waits for the device: once
        per prompt, as decoding steps pass none.
        """
        start, end = self.length, self.length + segments.shape[1]
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; {end} were asked for")
        if self._segments is None:
            self._segments = segments.new_zeros(segments.shape[0], self.capacity)
        self._segments[:, start:end] = segments
        self.length = end
        self.one_segment = self.one_segment and (known_ones or bool((segments == 1).all()))
        return self._segments[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's keys and values of the positions last added; returns those of all positions."""
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        start = self.length - k.shape[2]
        self.keys[layer][:, :, start : self.length] = k
        self.values[layer][:, :, start : self.length] = v
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (in that order); beam search follows its surviving beams this way."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self._segments = self._segments.index_select(0, rows)


@dataclass
class KosmosOutput:
    logits: torch.Tensor  # [B, T, V]; given labels, [N, V] for the N labelled positions in row order
    loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None  # [B, T] per-token loss, 0 where the label is -100
    cache: KVCache | None = None


def sinusoidal_positions(position_ids: torch.Tensor, width: int, offset: int) -> torch.Tensor:
    """fairseq's table row `position + offset`, sin half then cos half (row `offset - 1` is padding)."""
    half = width // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=position_ids.device)
                     * -(math.log(10000.0) / (half - 1)))
    angles = (position_ids.float() + offset).unsqueeze(-1) * freq
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if width % 2:
        table = F.pad(table, (0, 1))
    return table


class XPos(nn.Module):
    """xPos (Sun et al. 2022): rotary angles with a per-dimension exponential decay of |m - n|."""

    def __init__(self, head_dim: int, scale_base: int, centre: int):
        super().__init__()
        self.head_dim = head_dim
        self.scale_base = scale_base
        self.centre = centre  # q.k depends only on m - n: centring keeps the decay factors near 1

    def frequencies(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(decay, inverse frequency) per pair of dimensions, in fp32 whatever the model's dtype: made
        here, not kept as buffers, which `model.to(bfloat16)` (and DeepSpeed's bf16 engine) would round."""
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        return (dims + 0.4 * self.head_dim) / (1.4 * self.head_dim), 1.0 / (10000 ** (dims / self.head_dim))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, is_key: bool) -> torch.Tensor:
        pos = (position_ids.float() - self.centre).unsqueeze(1).unsqueeze(-1)  # [B, 1, T, 1]
        decay, inv_freq = self.frequencies(x.device)
        scale = decay ** (pos / self.scale_base)
        if is_key:
            scale = 1.0 / scale
        angles = pos * inv_freq
        cos = (torch.cos(angles) * scale).repeat_interleave(2, dim=-1)
        sin = (torch.sin(angles) * scale).repeat_interleave(2, dim=-1)
        x_float = x.float()
        rotated = torch.stack((-x_float[..., 1::2], x_float[..., ::2]), dim=-1).flatten(-2)
        return (x_float * cos + rotated * sin).to(x.dtype)


def check_image_slots(image_mask: torch.Tensor | None, num_images: int, slots_per_image: int) -> None:
    """The batch must hold exactly `slots_per_image` image slots for each of its images.

    On the host the count is free and a mismatch raises ValueError. On a GPU, reading the count would
    make the host wait for the device every step, so the check is a device-side assertion instead: a
    mismatch stops the process at the next synchronisation.
    """
    wanted = num_images * slots_per_image
    if image_mask is None:
        if wanted:
            raise ValueError(f"{num_images} images need {wanted} image slots, the batch has no image_mask")
        return
    if image_mask.device.type != "cpu":
        torch._assert_async(image_mask.sum() == wanted, f"{num_images} images need {wanted} image slots")
        return
    slots = int(image_mask.sum())
    if slots != wanted:
        if not num_images:
            raise ValueError("the batch has image slots but no images")
        raise ValueError(f"{num_images} images need {wanted} image slots, the batch has {slots}")


class Attention(nn.Module):
    """Multi-head attention with biases; the decoder's adds Magneto's LayerNorm before out_proj."""

    def __init__(self, width: int, heads: int, dropout: float, inner_norm: bool, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.dropout = dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.inner_attn_ln = nn.LayerNorm(width, eps=eps) if inner_norm else None
        self.out_proj = nn.Linear(width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        documents: Callable[..., torch.Tensor] | None = None,
        xpos: XPos | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        kv_input = x if context is None else context
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(kv_input))
        v = self._split(self.v_proj(kv_input))
        if xpos is not None:
            q = xpos(q, position_ids, is_key=False)
            k = xpos(k, position_ids, is_key=True)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if documents is not None:  # packed rows (kosmos.model.attention)
            out = documents(q, k, v, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None
            )
        out = out.transpose(1, 2).flatten(2)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, not even called where it does nothing: a decoding step passes 13 dropouts."""
    return F.dropout(x, p, training) if training and p > 0 else x


class FeedForward(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_width)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_width, eps=cfg.layer_norm_eps)
        self.fc2 = nn.Linear(cfg.ffn_width, cfg.width)
        self.activation_dropout = cfg.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = _dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)
        return self.fc2(self.ffn_layernorm(hidden))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.attention_dropout, True, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, **attention) -> torch.Tensor:
        attended = self.self_attn(self.self_attn_layer_norm(x), **attention)
        x = x + _dropout(attended, self.dropout, self.training)
        return x + _dropout(self.ffn(self.final_layer_norm(x)), self.dropout, self.training)


class Connector(nn.Module):
    """Attentive pooling: learned queries attend over [dense(image tokens); queries]."""

    def __init__(self, vision_width: int, cfg: TextConfig, num_queries: int):
        super().__init__()
        self.dense = nn.Linear(vision_width, cfg.width)
        # At the scale of the token embeddings (before the sqrt(width) scaling) and of the projected
        # image tokens: unit-variance queries would outweigh the image in the pooled result.
        self.latent_query = nn.Parameter(torch.randn(num_queries, cfg.width) * cfg.width**-0.5)
        self.x_attn = Attention(cfg.width, cfg.heads, cfg.attention_dropout, inner_norm=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.dense(features)
        queries = self.latent_query.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.x_attn(queries, context=torch.cat([tokens, queries], dim=1))


class KosmosModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        text = cfg.text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.width, padding_idx=PAD)
        self.embed_scale = math.sqrt(text.width)
        self.dropout = text.dropout
        self.layers = nn.ModuleList(DecoderLayer(text) for _ in range(text.layers))
        self.layer_norm = nn.LayerNorm(text.width, eps=text.layer_norm_eps)
        # Tied by sharing one Parameter between two modules, so ZeRO-3 gathers it in either forward.
        self.lm_head = nn.Linear(text.width, text.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        self.xpos = (
            XPos(text.width // text.heads, text.xpos_scale_base, text.max_positions // 2)
            if text.positions == "xpos"
            else None
        )
        self.vision = VisionEncoder(cfg.vision)
        self.connector = Connector(cfg.vision.width, text, cfg.connector.num_queries)
        # True: recompute every layer's activations in the backward pass; a number N: the first N
        # layers only, for when memory needs some of them but not all.
        self.gradient_checkpointing: bool | int = False
        self._compiled_forwards: dict[str, Callable] = {}  # by device type, built by `compiled_forward`
        self._init_text_weights()

    def _init_text_weights(self) -> None:
        text = self.cfg.text
        nn.init.normal_(self.embed_tokens.weight, std=text.width**-0.5)
        with torch.no_grad():
            self.embed_tokens.weight[PAD].zero_()
        # Magneto: fc1, fc2, out_proj and v_proj of every decoder layer scaled by sqrt(log(2N)).
        gain = math.sqrt(math.log(2 * text.layers))
        for layer in self.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(attn.out_proj.weight)
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                nn.init.zeros_(linear.bias)
            with torch.no_grad():
                for linear in (attn.v_proj, attn.out_proj, layer.ffn.fc1, layer.ffn.fc2):
                    linear.weight.mul_(gain)

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def attention_backend(self, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> str:
        """The backend `model.attention` gives for packed rows on this device, dtype and pass."""
        dropout = self.training and self.cfg.text.attention_dropout > 0
        return choose_backend(self.cfg.attention, device, dtype, needs_grad, dropout)

    def embed(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor | None, images: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        num_images = 0 if images is None else images.shape[0]
        check_image_slots(image_mask, num_images, self.cfg.connector.num_queries)
        if num_images:
            image_embeds = self.connector(self.vision(images)).to(x.dtype)
            x = x.masked_scatter(image_mask.unsqueeze(-1), image_embeds.reshape(-1, x.shape[-1]))
        return x * self.embed_scale

    def forward(
        self,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> KosmosOutput:
        batch, length = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device).expand(batch, -1)
        x = self.embed(input_ids, image_mask, images)
        if self.xpos is None:
            x = x + sinusoidal_positions(position_ids, x.shape[-1], PAD + 1).to(x.dtype)
        x = _dropout(x, self.dropout, self.training)

        # The attention pattern is worked out once per forward and shared by every layer.
        attention = {"xpos": self.xpos, "position_ids": position_ids, "cache": cache}
        if cache is not None:
            segments = segment_ids if segment_ids is not None else torch.ones_like(input_ids)
            key_segments = cache.extend(segments, known_ones=segment_ids is None)
            if not (length == 1 and cache.one_segment):  # else one query that sees every key
                attention["mask"] = segment_mask(segments, key_segments)
        elif segment_ids is None:
            attention["causal"] = True
        else:
            backend = self.attention_backend(x.device, x.dtype, torch.is_grad_enabled())
            attention["documents"] = prepare_attention(backend, segment_ids)

        checkpointing = self.gradient_checkpointing
        checkpointed = len(self.layers) if checkpointing is True else int(checkpointing)
        for index, layer in enumerate(self.layers):
            if index < checkpointed and self.training:
                x = checkpoint(layer, x, use_reentrant=False, layer=index, **attention)
            else:
                x = layer(x, layer=index, **attention)
        hidden = self.layer_norm(x)
        if labels is None:
            return KosmosOutput(logits=self.lm_head(hidden), cache=cache)
        # Logits of the labelled positions only: image slots, prompts and padding can be half of a
        # batch (a caption pair is mostly image slots). Finding them waits for the device once.
        labelled = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        logits = self.lm_head(hidden.flatten(0, 1).index_select(0, labelled))
        losses = token_cross_entropy(logits, labels.flatten().index_select(0, labelled))
        token_loss = losses.new_zeros(batch * length).index_copy(0, labelled, losses).view(batch, length)
        loss = losses.sum() / max(labelled.numel(), 1)
        return KosmosOutput(logits=logits, loss=loss, token_loss=token_loss, cache=cache)

    def compile_layers(self) -> None:
        """`torch.compile` each decoder layer in place (parameter names do not change).

        For training: every layer has the same code and shapes, so one compiled graph serves all.
        Decoding compiles the whole forward instead, with dynamic shapes (`compiled_forward`).
        """
        for layer in self.layers:
            layer.compile()

    def compiled_forward(self) -> Callable[..., KosmosOutput]:
        """`forward` compiled for decoding steps with a KV cache (`compile_for_decoding`), built on
        first use for the device the model is on."""
        device = next(self.parameters()).device.type
        if device not in self._compiled_forwards:
            self._compiled_forwards[device] = compile_for_decoding(self.forward, device)
        return self._compiled_forwards[device]


def compile_for_decoding(forward: Callable, device: str) -> Callable:
    """`torch.compile` of a forward for one-token decoding steps.

    Shapes are dynamic, so one graph serves every step however long the cache has grown, and any
    batch. A small model's decoding step is hundreds of operations of a few microseconds each; on
    CPU the compiled graph is called from C++ (`cpp_wrapper`), which removes most of their
    per-operation cost.
    """
    options = {"cpp_wrapper": True} if device == "cpu" else None
    return torch.compile(forward, dynamic=True, fullgraph=True, options=options)
