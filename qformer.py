"""The BLIP-2 Q-Former, query path only: 32 learned queries read the image through cross-attention.

Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", ICML 2023, section 3.1. TinyGPT-V (Yuan et al., arXiv:2312.16862, section 3)
takes BLIP-2's Q-Former as it is, frozen, as MiniGPT-4 did. Facts in docs/PAPER.md section 3.
Input: image embeddings (B, 257, 1408) from the EVA ViT after ln_vision (vit.py).
Output: one vector per query (B, 32, 768), which tinygptv.py projects into Phi-2.

Notable parts, top to bottom:
- `QFormerConfig` with BLIP-2's sizes (`blip2()`, BERT-base plus cross-attention) and a `tiny()`
  preset of the same architecture;
- post-LN BERT layers: self-attention among the queries, cross-attention to the image on every
  second layer (0, 2, 4, ...), then the queries' own feed-forward `intermediate_query`/`output_query`;
- no text branch: BLIP-2's Q-Former shares its self-attention with a BERT text encoder (word and
  position embeddings, a text FFN `intermediate`/`output`, an LM head `cls`); MiniGPT-4 and TinyGPT-V
  delete it, because only the queries go on to the language model. Its tensors, found in LAVIS
  checkpoints, are skipped with a one-line report;
- no dropout: TinyGPT-V keeps the Q-Former frozen in eval mode, where BERT's dropout is the identity;
- `from_pretrained` / `save_pretrained`: strict loading of transformers BLIP-2 directories, LAVIS
  (MiniGPT-4, TinyGPT-V) safetensors files and our own directories, tensor by tensor.

Our names and the two checkpoint layouts (N is the layer; `crossattention` is named as `attention`):

    ours                      transformers BLIP-2                LAVIS
    query_tokens              query_tokens                       query_tokens
    layernorm                 qformer.layernorm                  Qformer.bert.embeddings.LayerNorm
    layers.N.                 qformer.encoder.layer.N.           Qformer.bert.encoder.layer.N.
      attention.query           attention.attention.query          attention.self.query     (key, value alike)
      attention.output.{dense,LayerNorm}, intermediate_query.dense, output_query.{dense,LayerNorm}: same in all

That is: the prefixes differ, and the q/k/v projections sit one module deeper, in `attention`
(transformers) or `self` (LAVIS). `checkpoint_name` below is this table as code.
"""

import os
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from checkpoints import StrictReader, check_overrides, open_safetensors, read_json, write_atomically, write_json


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
        # head dim 48 / 4 = 12, not a power of two; 3 layers, so the pattern with / without /
        # with cross-attention shows; image width 40 differs from the Q-Former's on purpose
        d = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                 encoder_hidden_size=40, num_query_tokens=8)
        return cls(**{**d, **kw})


# -----------------------------------------------------------------------------
# Building blocks (BERT's, Devlin et al. 2019, as BLIP-2 uses them)


class QFormerOutput(nn.Module):
    """dense, then the post-LN residual: LayerNorm(x + dense(h)). BERT's SelfOutput and Output alike.

    Post-LN (the norm after the residual sum, as in the original Transformer) rather than the pre-LN
    of GPT-style models, because the Q-Former's weights start from BERT-base, which is post-LN: the
    layer has to compute what those weights were trained for."""

    def __init__(self, in_features, config):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # BERT's capital L

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)  # (B, nq, C)


class QFormerAttention(nn.Module):
    """Multi-head attention from the queries x (B, nq, C) to a context (B, S, kv_dim), plus its
    output projection and post-LN residual. Self-attention: the context is x itself.
    Cross-attention: the context is the image, kv_dim = encoder_hidden_size (1408 -> 768)."""

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
    """One BERT layer of the query path: self-attention, [cross-attention], feed-forward, each
    followed by its residual and LayerNorm."""

    def __init__(self, config, index):
        super().__init__()
        self.attention = QFormerAttention(config, config.hidden_size)
        # BLIP-2 inserts cross-attention "every other transformer block" (section 3.1). BERT-base has
        # no cross-attention, so these weights are new; half the layers holds them to half the new
        # parameters (~20M at 1408 -> 768) and half the cost of reading the 257 image tokens, while
        # the queries still consult the image six times in twelve layers.
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_hidden_size)
        # "_query": the queries' own FFN. BLIP-2's text tokens have a separate one (`intermediate`,
        # `output`), which TinyGPT-V does not keep.
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerOutput(config.intermediate_size, config)

    def forward(self, x, image_embeds, mask=None):
        x = self.attention(x, x)  # (B, nq, C): the queries talk to each other
        if self.has_cross_attention:
            x = self.crossattention(x, image_embeds, mask)  # (B, nq, C): and read the image
        return self.output_query(self.intermediate_query(x), x)  # (B, nq, C)


# -----------------------------------------------------------------------------
# The model


class QFormer(nn.Module):
    """The Q-Former with its `query_tokens`: image embeddings (B, S, 1408) -> (B, 32, 768).
    Mirrors transformers' `Blip2QFormerModel` called on BLIP-2's query tokens, and LAVIS'
    `Qformer.bert` called with `query_embeds` only."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        # BERT's embeddings LayerNorm. With no text, the "embeddings" are the queries alone, so the
        # Q-Former's input is LayerNorm(query_tokens).
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # only for training from scratch (the demo); real runs load BLIP-2. BERT's initializer_range,
        # which BLIP-2 also draws its query tokens with.
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
    # Checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", **overrides):
        """Load the Q-Former and its query tokens from
        (a) a transformers BLIP-2 directory (`Blip2ForConditionalGeneration` or `Blip2Model`
            `save_pretrained`: config.json and model.safetensors or shards): the config is its
            `qformer_config` plus `num_query_tokens`; the tensors `qformer.*` and `query_tokens`;
        (b) a LAVIS-named .safetensors file (`Qformer.bert.*`, `query_tokens`; tinygptv.py's
            `convert` writes one from a LAVIS / MiniGPT-4 .pth): the config is a config.json beside
            it if there is one, else BLIP-2's (`QFormerConfig.blip2()`), the only Q-Former LAVIS ships;
        (c) a directory written by `save_pretrained` (our names, our config.json).
        `overrides` (QFormerConfig fields) apply on top of the config found.

        Tensors of other parts (vision_model.*, language_model.*, visual_encoder.*, ln_vision.*,
        llama_proj.*, ...) are ignored: vit.py and the rest read them. Within the Q-Former it is
        strict: a missing, unexpected or mis-shaped tensor is a ValueError naming it. Only the text
        branch (see the module docstring) is skipped, and one line says how many tensors that was.
        dtype: float32 (when None), bfloat16 or float16. The model is built on the meta device and
        each tensor is read, converted and placed on `device` in turn.
        """
        dtype = dtype or torch.float32
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
        config_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)),
                                   "config.json")
        file_config = {}
        if os.path.isfile(config_file):
            file_config = config_from_json(config_file)
        elif os.path.isdir(path):
            raise FileNotFoundError(f"{config_file} not found: a checkpoint directory needs its config.json")
        check_overrides(overrides, QFormerConfig)
        config = QFormerConfig(**{**file_config, **overrides})

        tensors = open_safetensors(path)  # checkpoint key -> (open file, its path)
        layout = ("lavis" if any(k.startswith("Qformer.") for k in tensors) else
                  "transformers" if any(k.startswith("qformer.") for k in tensors) else "ours")
        if layout != "ours":  # keep the Q-Former's keys; the other parts' are not ours to check
            prefix = "Qformer." if layout == "lavis" else ("qformer.", "embeddings.")
            tensors = {k: v for k, v in tensors.items() if k.startswith(prefix) or k == "query_tokens"}
        text = sorted(k for k in tensors if layout in TEXT_BRANCH and TEXT_BRANCH[layout].match(k))
        reader = StrictReader({k: v for k, v in tensors.items() if k not in text}, path, dtype, device)

        with torch.device("meta"):  # shapes only, no memory: the real tensors are assigned below
            model = cls(config)
        state = {name: reader.take(checkpoint_name(name, layout), p.shape) for name, p in model.state_dict().items()}
        reader.finish()
        model.load_state_dict(state, strict=True, assign=True)
        if text:
            print(f"qformer: skipped {len(text)} text-branch tensors of {path} (text embeddings, text FFN "
                  f"intermediate/output, LM head); the query path does not use them")
        return model

    def save_pretrained(self, directory):
        """Write config.json (QFormerConfig's fields, so QFormerConfig(**json) rebuilds it) and
        model.safetensors with our names, each atomically. QFormer.from_pretrained reads it back."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        os.makedirs(directory, exist_ok=True)
        write_atomically(os.path.join(directory, "model.safetensors"),
                         lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_atomically(os.path.join(directory, "config.json"),
                         lambda tmp: write_json(asdict(self.config), tmp))


# Where each layout keeps the Q-Former's norm and layers, and the q/k/v projections' extra level
LAYOUTS = {
    "transformers": ("qformer.layernorm", "qformer.encoder.layer.", "attention"),
    "lavis": ("Qformer.bert.embeddings.LayerNorm", "Qformer.bert.encoder.layer.", "self"),
}

# The text branch's tensors: BERT word / position embeddings, the text FFN, the LM head. transformers
# writes them only for use_qformer_text_input (Blip2ForImageTextRetrieval, its `embeddings.*` at the top).
TEXT_BRANCH = {
    "transformers": re.compile(r"embeddings\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\."),
    "lavis": re.compile(r"Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
                        r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"),
}


def checkpoint_name(name, layout):
    """Our parameter name -> its key in a "transformers" or "lavis" checkpoint ("ours": unchanged).
    E.g. layers.2.crossattention.key.weight -> qformer.encoder.layer.2.crossattention.attention.key.weight
    (transformers), Qformer.bert.encoder.layer.2.crossattention.self.key.weight (LAVIS)."""
    if layout == "ours" or name == "query_tokens":
        return name
    norm, layer, qkv = LAYOUTS[layout]
    if name.startswith("layernorm."):
        return norm + name[len("layernorm"):]
    name = re.sub(r"attention\.(query|key|value)\.", rf"attention.{qkv}.\1.", name)  # also crossattention
    return layer + name[len("layers."):]


def config_from_json(file):
    """QFormerConfig fields from a transformers Blip2Config config.json (its qformer_config plus
    num_query_tokens) or from one save_pretrained wrote (our fields, flat)."""
    d = read_json(file)
    names = {f.name for f in fields(QFormerConfig)}
    if "qformer_config" in d or d.get("model_type") == "blip-2":
        q = d.get("qformer_config") or {}
        if q.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{file}: qformer_config hidden_act {q['hidden_act']!r} is not BERT's exact gelu")
        out = {k: v for k, v in q.items() if k in names}
        if "encoder_hidden_size" not in out and "hidden_size" in (d.get("vision_config") or {}):
            out["encoder_hidden_size"] = d["vision_config"]["hidden_size"]  # what Blip2Config sets it to
        if "num_query_tokens" in d:
            out["num_query_tokens"] = d["num_query_tokens"]
        return out
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{file}: not a Q-Former config: neither BLIP-2's (no qformer_config) nor a "
                         f"QFormerConfig (unknown fields: {', '.join(sorted(unknown))})")
    return d
