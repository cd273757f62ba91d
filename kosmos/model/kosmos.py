"""The KOSMOS-1 model: a Magneto decoder reading text with CLIP image embeddings spliced in.

Layout (DESIGN section 2): pre-LN blocks with Magneto sub-LayerNorms, exact GELU, token embeddings
scaled by sqrt(width) and tied to the LM head, fairseq sinusoidal positions (or xPos), and an
attentive-pooling connector turning each image's CLIP tokens into `num_queries` embeddings that
replace the image-slot embeddings before the scaling. Parameter names follow `transformers`' Kosmos-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kosmos.model.config import ModelConfig, TextConfig
from kosmos.model.vision import VisionEncoder
from kosmos.tokenizer import IGNORE_INDEX, PAD

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


class KVCache:
    """Keys and values of every decoder layer, plus the segment id of each cached position."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.segments: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.segments is None else self.segments.shape[1]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (in that order); beam search follows its surviving beams this way."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.segments = self.segments.index_select(0, rows)


@dataclass
class KosmosOutput:
    logits: torch.Tensor
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
        self.scale_base = scale_base
        self.centre = centre  # q.k depends only on m - n: centring keeps the decay factors near 1
        dims = torch.arange(0, head_dim, 2, dtype=torch.float32)
        self.register_buffer("decay", (dims + 0.4 * head_dim) / (1.4 * head_dim), persistent=False)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (dims / head_dim)), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, is_key: bool) -> torch.Tensor:
        pos = (position_ids.float() - self.centre).unsqueeze(1).unsqueeze(-1)  # [B, 1, T, 1]
        scale = self.decay ** (pos / self.scale_base)
        if is_key:
            scale = 1.0 / scale
        angles = pos * self.inv_freq
        cos = (torch.cos(angles) * scale).repeat_interleave(2, dim=-1)
        sin = (torch.sin(angles) * scale).repeat_interleave(2, dim=-1)
        x_float = x.float()
        rotated = torch.stack((-x_float[..., 1::2], x_float[..., ::2]), dim=-1).flatten(-2)
        return (x_float * cos + rotated * sin).to(x.dtype)


def segment_mask(q_segments: torch.Tensor, k_segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: query attends key iff same segment and key not in the future.

    Queries are the last Tq of the Tk positions (a KV cache holds the earlier ones).
    """
    tq, tk = q_segments.shape[1], k_segments.shape[1]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=q_segments.device).tril(tk - tq)
    same = q_segments.unsqueeze(2) == k_segments.unsqueeze(1)
    return (same & causal).unsqueeze(1)


def flash_cu_seqlens(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of the runs of equal segment ids, rows laid end to end (flash-attn varlen)."""
    flat = segments.flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    change[:: segments.shape[1]] = True
    starts = change.nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu, int((ends - starts).max())


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
        flash_segments: torch.Tensor | None = None,
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
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        dropout = self.dropout if self.training else 0.0
        if flash_segments is not None:
            out = self._flash(q, k, v, flash_segments, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None
            )
        out = out.transpose(1, 2).flatten(2)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)

    @staticmethod
    def _flash(q, k, v, segments, dropout):
        # Packed documents become separate variable-length sequences: no mask is materialised.
        b, h, t, d = q.shape
        cu, max_len = flash_cu_seqlens(segments)
        q, k, v = (y.transpose(1, 2).reshape(b * t, h, d) for y in (q, k, v))
        out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, causal=True)
        return out.reshape(b, t, h, d).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_width)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_width, eps=cfg.layer_norm_eps)
        self.fc2 = nn.Linear(cfg.ffn_width, cfg.width)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(self.activation_dropout(F.gelu(self.fc1(x)))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.attention_dropout, True, cfg.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, **attention) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), **attention))
        return x + self.dropout(self.ffn(self.final_layer_norm(x)))


class Connector(nn.Module):
    """Attentive pooling: learned queries attend over [dense(image tokens); queries]."""

    def __init__(self, vision_width: int, cfg: TextConfig, num_queries: int):
        super().__init__()
        self.dense = nn.Linear(vision_width, cfg.width)
        self.latent_query = nn.Parameter(torch.randn(num_queries, cfg.width))
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
        self.dropout = nn.Dropout(text.dropout)
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
        self.gradient_checkpointing = False
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

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        choice = self.cfg.attention
        if choice == "auto":
            usable = flash_attn_varlen_func is not None and device.type == "cuda"
            return "flash" if usable and dtype in (torch.float16, torch.bfloat16) else "sdpa"
        if choice == "flash" and flash_attn_varlen_func is None:
            raise RuntimeError("attention: flash was asked for but flash-attn is not installed")
        return choice

    def embed(
        self, input_ids: torch.Tensor, image_mask: torch.Tensor | None, images: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if images is not None and images.shape[0] > 0:
            image_embeds = self.connector(self.vision(images)).to(x.dtype)
            slots = int(image_mask.sum()) if image_mask is not None else 0
            if slots != image_embeds.shape[0] * image_embeds.shape[1]:
                raise ValueError(
                    f"{images.shape[0]} images need {image_embeds.shape[0] * image_embeds.shape[1]} "
                    f"image slots, the batch has {slots}"
                )
            x = x.masked_scatter(image_mask.unsqueeze(-1), image_embeds.reshape(-1, x.shape[-1]))
        elif image_mask is not None and image_mask.any():
            raise ValueError("the batch has image slots but no images")
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
        x = self.dropout(x)

        attention = {"xpos": self.xpos, "position_ids": position_ids, "cache": cache}
        if cache is not None:
            segments = segment_ids if segment_ids is not None else torch.ones_like(input_ids)
            cache.segments = segments if cache.segments is None else torch.cat([cache.segments, segments], 1)
            attention["mask"] = segment_mask(segments, cache.segments)
        elif segment_ids is None:
            attention["causal"] = True
        elif self.attention_backend(x.device, x.dtype) == "flash":
            attention["flash_segments"] = segment_ids
        else:
            attention["mask"] = segment_mask(segment_ids, segment_ids)

        for index, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False, layer=index, **attention)
            else:
                x = layer(x, layer=index, **attention)
        logits = self.lm_head(self.layer_norm(x))

        output = KosmosOutput(logits=logits, cache=cache)
        if labels is not None:
            token_loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(batch, length)
            count = (labels != IGNORE_INDEX).sum()
            output.token_loss = token_loss
            output.loss = token_loss.sum() / count.clamp(min=1)
        return output
