"""The BLIP-2 Q-Former, query path only: 32 learned queries read the image through cross-attention.

BLIP-2 (Li et al., ICML 2023, arXiv:2301.12597, section 3.1); TinyGPT-V (Yuan et al., arXiv:2312.16862,
section 3) takes its Q-Former as it is, frozen, as MiniGPT-4 did. Facts in docs/PAPER.md section 3.
Input: image embeddings (B, 257, 1408) from the EVA ViT after ln_vision (vit.py).
Output: one vector per query (B, 32, 768), which tinygptv.py projects into Phi-2.

Notable parts, top to bottom:
- `QFormerConfig`: BLIP-2's sizes (`blip2()`, BERT-base plus cross-attention) and a `tiny()` preset;
- post-LN BERT layers: self-attention among the queries, cross-attention to the image every second
  layer (0, 2, 4, ...), then the queries' own feed-forward `intermediate_query`/`output_query`;
- no text branch: BLIP-2 shares the self-attention with a BERT text encoder (word and position embeddings,
  text FFN `intermediate`/`output`, LM head `cls`); MiniGPT-4 and TinyGPT-V delete it, as only the queries
  reach the language model. Its tensors, found in LAVIS checkpoints, are skipped with a one-line report;
- no dropout: TinyGPT-V keeps the Q-Former frozen in eval mode, where BERT's dropout is the identity;
- `from_pretrained`: strict loading of a transformers BLIP-2 download; LAVIS's layout is layouts.py's.

Our names against transformers' (`transformers_key` is this table as code; `crossattention` alike):
    query_tokens, layernorm     query_tokens, qformer.layernorm
    layers.N.attention.query    qformer.encoder.layer.N.attention.attention.query  (key, value alike)
    layers.N.<the rest>         qformer.encoder.layer.N.<the rest>
"""

import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import StrictReader, check_overrides, config_file, open_safetensors, read_json


@dataclass
class QFormerConfig:
    hidden_size: int = 768  # BERT-base, whose weights BLIP-2 starts the Q-Former from
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # head dim 64
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1408  # the image tokens' width: EVA ViT-g
    num_query_tokens: int = 32  # BLIP-2 section 3.1: 32 queries of dimension 768
    cross_attention_frequency: int = 2  # cross-attention on layers 0, 2, 4, ...: "every other block"
    layer_norm_eps: float = 1e-12  # BERT's

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency is {self.cross_attention_frequency}; it must be >= 1")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def blip2(cls, **kw):
        return cls(**kw)  # the defaults are BLIP-2's (Salesforce/blip2-* qformer_config)

    @classmethod
    def tiny(cls, **kw):
        # head dim 12, not a power of two; 3 layers: cross, none, cross; image width 40 unlike the 48 inside
        d = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                 encoder_hidden_size=40, num_query_tokens=8)
        return cls(**{**d, **kw})


# -----------------------------------------------------------------------------
# Building blocks (BERT's, Devlin et al. 2019, as BLIP-2 uses them)


class QFormerOutput(nn.Module):
    """dense, then the post-LN residual: LayerNorm(x + dense(h)). BERT's SelfOutput and Output alike.
    Post-LN, not GPT's pre-LN, because the weights start from BERT-base's, which were trained post-LN."""

    def __init__(self, in_features, config):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # BERT's capital L

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)  # (B, nq, C)


class QFormerAttention(nn.Module):
    """Attention from the queries x (B, nq, C) to a context (B, S, kv_dim), then output and post-LN residual.
    Self-attention: the context is x. Cross-attention: the image, kv_dim = encoder_hidden_size (1408)."""

    def __init__(self, config, kv_dim):
        super().__init__()
        C, self.nh, self.hd = config.hidden_size, config.num_attention_heads, config.head_dim
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(kv_dim, C)
        self.value = nn.Linear(kv_dim, C)
        self.output = QFormerOutput(C, config)

    def forward(self, x, context, mask=None):
        B, T, C = x.shape
        S = context.shape[1]
        q = self.query(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, nq, hd)
        k = self.key(context).view(B, S, self.nh, self.hd).transpose(1, 2)  # (B, nh, S, hd)
        v = self.value(context).view(B, S, self.nh, self.hd).transpose(1, 2)  # (B, nh, S, hd)
        att = (q @ k.transpose(-2, -1)) * self.hd ** -0.5  # (B, nh, nq, S)
        if mask is not None:  # (B, 1, 1, S), True = a real image token
            att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
        att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax for bf16 runs
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, nq, C)
        return self.output(y, x)  # (B, nq, C)


class QFormerIntermediate(nn.Module):
    """The FFN's first half: dense (C -> 4C) and exact-erf GELU (BERT's "gelu")."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # (B, nq, 4C)


class QFormerLayer(nn.Module):
    """One BERT layer of the query path: self-attention, [cross-attention], feed-forward, each post-LN."""

    def __init__(self, config, index):
        super().__init__()
        self.attention = QFormerAttention(config, config.hidden_size)
        # "every other transformer block" (BLIP-2 section 3.1): BERT-base has no cross-attention, so these
        # weights are new; half the layers halves them (~20M at 1408 -> 768) and the cost of reading the
        # 257 image tokens, while the queries still consult the image six times in twelve layers.
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_hidden_size)
        self.intermediate_query = QFormerIntermediate(config)  # the queries' own FFN; the text's is not kept
        self.output_query = QFormerOutput(config.intermediate_size, config)

    def forward(self, x, image_embeds, mask=None):
        x = self.attention(x, x)  # (B, nq, C): the queries talk to each other
        if self.has_cross_attention:
            x = self.crossattention(x, image_embeds, mask)  # (B, nq, C): and read the image
        return self.output_query(self.intermediate_query(x), x)  # (B, nq, C)


# -----------------------------------------------------------------------------
# The model


class QFormer(nn.Module):
    """The Q-Former with its `query_tokens`: image embeddings (B, S, 1408) -> (B, 32, 768). Mirrors
    transformers' `Blip2QFormerModel` on the query tokens, and LAVIS's `Qformer.bert` on `query_embeds` only."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        # BERT's embeddings LayerNorm; with no text the "embeddings" are the queries alone
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # only for training from scratch (the demo); std 0.02: BERT's initializer_range, BLIP-2's for queries
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, QFormer):
            nn.init.normal_(m.query_tokens, std=0.02)

    def forward(self, image_embeds, image_attention_mask=None):
        """image_embeds (B, S, encoder_hidden_size) -> (B, num_query_tokens, hidden_size).
        image_attention_mask (B, S), optional: 1 for image tokens to attend to, 0 for padding."""
        B = image_embeds.shape[0]
        x = self.layernorm(self.query_tokens.expand(B, -1, -1))  # (B, nq, C): the same queries per image
        mask = None
        if image_attention_mask is not None:
            mask = image_attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, image_embeds, mask)  # (B, nq, C)
        return x

    # -------------------------------------------------------------------------
    # Loading a transformers BLIP-2 download

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", **overrides):
        """Load the Q-Former and query tokens from a saved transformers `Blip2ForConditionalGeneration` or
        `Blip2Model` (config.json, model.safetensors or shards): config `qformer_config` and `num_query_tokens`,
        tensors `qformer.*` and `query_tokens`; `overrides` (QFormerConfig fields) apply on top. dtype:
        float32 (when None), bfloat16 or float16; each tensor is read, converted and placed on `device`."""
        file = config_file(path)
        check_overrides(overrides, QFormerConfig)
        config = QFormerConfig(**{**(config_from_json(file) if file else {}), **overrides})
        tensors = {k: v for k, v in open_safetensors(path).items() if k.startswith(("qformer.", "embeddings.", "query_tokens"))}
        return cls.load(config, StrictReader(tensors, path, dtype or torch.float32, device), transformers_key,
                        TEXT_BRANCH, path)

    @classmethod
    def load(cls, config, reader, key, text_branch, path):
        """A model of `config` from `reader` (a checkpoints.StrictReader), tensor `name` read as `key(name)`;
        tensors matching `text_branch` are skipped with a one-line count, any other leftover is refused."""
        text = [k for k in reader.tensors if text_branch.match(k)]
        for k in text:
            del reader.tensors[k]
        with torch.device("meta"):  # shapes only, no memory: the real tensors are assigned below
            model = cls(config)
        state = {name: reader.take(key(name), p.shape) for name, p in model.state_dict().items()}
        reader.finish()
        model.load_state_dict(state, strict=True, assign=True)
        if text:
            print(f"qformer: skipped {len(text)} text-branch tensors of {path} (text embeddings, text FFN "
                  f"intermediate/output, LM head); the query path does not use them")
        return model


# The text branch in a transformers download: each layer's text FFN, and BERT word / position embeddings
# (`embeddings.*`, written only for use_qformer_text_input, Blip2ForImageTextRetrieval).
TEXT_BRANCH = re.compile(r"embeddings\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def transformers_key(name):
    """Our parameter name -> its key in a transformers BLIP-2 checkpoint, e.g.
    layers.2.crossattention.key.weight -> qformer.encoder.layer.2.crossattention.attention.key.weight."""
    if name == "query_tokens":
        return name
    if name.startswith("layernorm."):
        return "qformer." + name
    name = re.sub(r"attention\.(query|key|value)\.", r"attention.attention.\1.", name)  # also crossattention
    return "qformer.encoder.layer." + name[len("layers."):]


def config_from_json(file):
    """QFormerConfig fields from a transformers Blip2Config config.json: its qformer_config plus
    num_query_tokens (and encoder_hidden_size from vision_config, as Blip2Config sets it)."""
    d = read_json(file)
    if "qformer_config" not in d and d.get("model_type") != "blip-2":
        raise ValueError(f"{file}: not a BLIP-2 config (no qformer_config)")
    names = {f.name for f in fields(QFormerConfig)}
    q = d.get("qformer_config") or {}
    if q.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{file}: qformer_config hidden_act {q['hidden_act']!r} is not BERT's exact gelu")
    out = {k: v for k, v in q.items() if k in names}
    if "encoder_hidden_size" not in out and "hidden_size" in (d.get("vision_config") or {}):
        out["encoder_hidden_size"] = d["vision_config"]["hidden_size"]  # what Blip2Config sets it to
    if "num_query_tokens" in d:
        out["num_query_tokens"] = d["num_query_tokens"]
    return out
