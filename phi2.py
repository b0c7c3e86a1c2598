"""Phi-2 (Microsoft, 2.7B parameters, `microsoft/phi-2`), hand-written, with TinyGPT-V's two stabilizers.

TinyGPT-V's language model (Yuan et al., arXiv:2312.16862, section 3; facts in docs/PAPER.md section 4).
Input: token ids (B, T) or embeddings (B, T, 2560), as image tokens arrive. Output: logits (B, T, 51200).

Notable parts, top to bottom:
- `Phi2Config`: the real sizes (`phi2()`) and a `tiny()` preset of the same architecture;
- the parallel block: one LayerNorm feeds attention and MLP side by side, both added to x;
- partial rotary embedding: RoPE turns only the first int(0.4 * head_dim) dims of each head;
- TinyGPT-V's stabilizers, each off by a flag for plain Phi-2: `q_layernorm`/`k_layernorm`, `post_layernorm`;
- `KVCache` and `generate`: greedy or seeded sampling; a left-padded batch decodes like single prompts;
- `from_pretrained`: strict loading of a transformers download; other layouts are layouts.py's.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoints import StrictReader, check_overrides, config_file, open_safetensors, read_json


@dataclass
class Phi2Config:
    vocab_size: int = 51200
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 10240
    partial_rotary_factor: float = 0.4  # RoPE on int(0.4 * 80) = 32 of each head's 80 dims
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    resid_pdrop: float = 0.1  # dropout on both branches of the block, training only
    qk_layernorm: bool = False  # TinyGPT-V stabilizer 1: LayerNorm on each head's q and k
    post_layernorm: bool = False  # TinyGPT-V stabilizer 2: RMSNorm on the attention branch
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 50256  # "<|endoftext|>" is both bos and eos in Phi-2's tokenizer
    eos_token_id: int = 50256

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim int({self.partial_rotary_factor} * {self.head_dim}) = {self.rotary_dim} "
                             "is odd; RoPE turns dims in pairs")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self):
        return int(self.partial_rotary_factor * self.head_dim)

    @classmethod
    def phi2(cls, **kw):
        return cls(**kw)  # the defaults are microsoft/phi-2's config.json

    @classmethod
    def tiny(cls, **kw):
        # head_dim 16 -> int(0.4 * 16) = 6 rotary dims: partial rotary stays non-trivial
        d = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=512, bos_token_id=0, eos_token_id=0)
        return cls(**{**d, **kw})


# -----------------------------------------------------------------------------
# Building blocks


def gelu_new(x):
    """GPT-2's "gelu_new", Phi-2's activation: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))). PyTorch's
    fused kernel computes it (within 3e-7 of the ops written out) in one pass instead of one per op."""
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: no mean subtraction, no bias (TinyGPT-V's post_layernorm).
    The mean of squares is taken in fp32 so bf16/fp16 activations neither overflow nor lose precision."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids, rotary_dim, theta, dtype):
    """cos, sin (B, 1, T, rotary_dim) for positions (B, T), NeoX's "rotate half" layout: dims i and
    i + rotary_dim/2 form a pair turning at frequency theta^(-2i/rotary_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, rd/2), in fp32: positions reach 2048
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, rd)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of each head of x (B, nh, T, hd); the rest pass through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # pair (a, b) -> (-b, a), a 90 degree turn
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class KVCache:
    """Every layer's keys and values so far; Phi2.forward appends to it. Storage has room to spare and
    doubles when full, so a decode step writes in place: torch.cat would copy the whole cache every step,
    at Phi-2's size and 2048 tokens 1.3 GB (32 layers x k, v x 21 MB in fp32) beside 11 GB of weights."""

    def __init__(self):
        self.keys, self.values = [], []  # per layer: (B, nh, capacity, hd), the first `filled` positions valid
        self.filled = []  # per layer: positions written so far

    @property
    def length(self):
        return self.filled[0] if self.filled else 0

    def update(self, layer, k, v):
        """Append k, v (B, nh, T, hd) to `layer`; return all its keys and values (B, nh, past + T, hd)."""
        T = k.shape[2]
        if layer == len(self.keys):  # first call for this layer: room for the prompt and 256 more
            B, nh, _, hd = k.shape
            self.keys.append(k.new_empty(B, nh, T + 256, hd))
            self.values.append(v.new_empty(B, nh, T + 256, hd))
            self.filled.append(0)
        n = self.filled[layer]
        if n + T > self.keys[layer].shape[2]:  # full: double the room, keep what is there
            for store in (self.keys, self.values):
                old = store[layer]
                store[layer] = old.new_empty(*old.shape[:2], 2 * (n + T), old.shape[3])
                store[layer][:, :, :n] = old[:, :, :n]
        self.keys[layer][:, :, n:n + T] = k
        self.values[layer][:, :, n:n + T] = v
        self.filled[layer] = n + T
        return self.keys[layer][:, :, :n + T], self.values[layer][:, :, :n + T]  # views, no copy


class Phi2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, self.nh, self.hd = config.hidden_size, config.num_attention_heads, config.head_dim
        # Fused, as TinyGPT-V puts LoRA on it: rows [q_proj; k_proj; v_proj] of transformers' weights
        # (q 0:C, k C:2C, v 2C:3C), head h owning rows h*hd:(h+1)*hd of each; the bias alike.
        self.query_key_value = nn.Linear(C, 3 * C)
        self.dense = nn.Linear(C, C)
        if config.qk_layernorm:  # one LayerNorm(head_dim) each for q and k, shared by all heads
            self.q_layernorm = nn.LayerNorm(self.hd, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.hd, eps=config.layer_norm_eps)
        self.qk_layernorm = config.qk_layernorm

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.query_key_value(x).split(C, dim=-1)  # 3 x (B, T, C)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        if self.qk_layernorm:  # before RoPE, as in TinyGPT-V and transformers >= 4.48
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hd), S = past + T
        # Written out, not F.scaled_dot_product_attention, to read as the formula. Masked scores get the
        # dtype's min, not -inf: a padding query seeing no key gets a uniform softmax instead of NaN.
        att = (q @ k.transpose(-2, -1)) * self.hd ** -0.5  # (B, nh, T, S)
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
        att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax for bf16 runs
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dense(y)


class Phi2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(gelu_new(self.fc1(x)))  # (B, T, C)


class Phi2Block(nn.Module):
    """Parallel block (GPT-J style): x + attn(ln(x)) + mlp(ln(x)), one LayerNorm for both branches.
    With post_layernorm (TinyGPT-V): x + RMSNorm(attn(ln(x))) + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Phi2Attention(config)
        self.mlp = Phi2MLP(config)
        if config.post_layernorm:
            self.post_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0):
        h = self.input_layernorm(x)  # (B, T, C)
        a = self.self_attn(h, cos, sin, mask, kv_cache, layer)  # (B, T, C)
        if hasattr(self, "post_layernorm"):
            a = self.post_layernorm(a)
        return x + self.resid_dropout(a) + self.resid_dropout(self.mlp(h))


# -----------------------------------------------------------------------------
# The model


class Phi2(nn.Module):
    """Phi-2 as a causal LM, mirroring transformers' `PhiForCausalLM`: embeddings, blocks, final_layernorm,
    lm_head. Names are the checkpoint's minus its "model." prefix, so from_pretrained's key map is short."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi2Block(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)  # untied, with bias
        self.grad_checkpointing = False  # train.py turns it on for the paper's stage 4
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # Phi-2's initializer_range; for training from scratch
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, kv_cache=None):
        """Logits (B, T, vocab) for input_ids (B, T) or inputs_embeds (B, T, C).
        attention_mask (B, past + T): 1 for real tokens, 0 for padding, cached positions included.
        Positions default to the count of real tokens before each, so left-padded rows start at 0 like
        unpadded ones. kv_cache, if given, gets this call's keys and values."""
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds, attention_mask, position_ids, kv_cache))

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, kv_cache=None):
        """forward without lm_head: hidden states (B, T, C) for callers that need logits at a few positions,
        as generate (the last: for a 256-token prompt the rest would cost 67 GFLOP, 255 x 2560 x 51200 x 2)
        and training (the answers, tinygptv.answer_logits)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"({B}, {past + T}): batch by cached plus new positions")
        keep = attention_mask.bool()  # (B, S)
        if position_ids is None:
            position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        # query t sits at absolute position past + t: it sees keys 0 .. past + t that are not padding
        causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, S)
        mask = causal[None, None] & keep[:, None, None, :]  # (B, 1, T, S)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; backward runs it again for the rest (the official stage 4
                # config's use_grad_checkpoint: 1024 tokens x 3 do not fit 24 GB otherwise, docs/PAPER.md)
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache, i)  # (B, T, C)
        return self.final_layernorm(x)  # (B, T, C)

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=20,
                 temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, stop_sequences=None, seed=None,
                 decoder=None):
        """Continue each prompt; return per row only the new token ids, stop sequence removed.
        Prompts are left-padded (attention_mask 0 on the left), so every row's next token comes from the
        last column and no row depends on another. temperature 0 is greedy argmax.
        stop_sequences: token-id lists that end a row; None means [config.eos_token_id], [] never stops early.
        repetition_penalty (CTRL, Keskar et al. 2019): logits of tokens already seen (in input_ids, not
        padding, or generated) are divided by it if positive, multiplied if negative.
        seed: each row samples from its own torch.Generator seeded with it, so a prompt gives the same
        tokens alone or in any batch; None uses torch's global generator.
        decoder(model, token, cache, attention_mask, capacity) -> logits (B, vocab) runs each step after
        the prompt; None is the plain step below (fastpaths.py replays it as a CUDA graph)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = input_ids if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=x.device)
        stops = [[self.config.eos_token_id]] if stop_sequences is None else [list(s) for s in stop_sequences if s]
        generators = [None] * B if seed is None else [torch.Generator(x.device).manual_seed(seed) for _ in range(B)]
        seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool, device=x.device)  # for the penalty
        if input_ids is not None:
            rows, cols = attention_mask.nonzero(as_tuple=True)  # real prompt tokens, not padding
            seen[rows, input_ids[rows, cols]] = True
        out, done = [[] for _ in range(B)], [False] * B
        was_training = self.training
        self.eval()  # dropout would make batched and single runs differ
        try:
            cache = KVCache()
            last = self.hidden_states(input_ids, inputs_embeds, attention_mask, kv_cache=cache)[:, -1]  # (B, C)
            logits = self.lm_head(last)  # (B, vocab): the prompt's last position only
            for step in range(max_new_tokens):
                token = self._next_token(logits.float(), seen, temperature, top_k, top_p, repetition_penalty,
                                         generators)  # (B,)
                seen[torch.arange(B), token] = True
                for b, t in enumerate(token.tolist()):
                    if done[b]:
                        continue
                    out[b].append(t)
                    for s in stops:
                        if out[b][-len(s):] == s:
                            del out[b][-len(s):]
                            done[b] = True
                            break
                if all(done) or step == max_new_tokens - 1:
                    break
                if decoder is not None:
                    logits = decoder(self, token, cache, attention_mask, T + max_new_tokens)  # (B, vocab)
                    continue
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)  # (B, S + 1)
                last = self.hidden_states(token[:, None], attention_mask=attention_mask, kv_cache=cache)[:, -1]  # (B, C)
                logits = self.lm_head(last)  # (B, vocab)
        finally:
            self.train(was_training)
        return out

    @staticmethod
    def _next_token(logits, seen, temperature, top_k, top_p, repetition_penalty, generators):
        """Pick one token per row from logits (B, vocab)."""
        if repetition_penalty != 1.0:
            penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:  # nucleus: the likeliest tokens up to mass top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)  # (B, vocab)
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])

    # -------------------------------------------------------------------------
    # Checkpoints: transformers names <-> ours (docs/PAPER.md section 8 lists the keys)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", convert=None, report=True, reader=None, **overrides):
        """Load Phi-2 as transformers saves it: a directory (config.json, model.safetensors or its index
        and shards) or one .safetensors file, configured by a config.json beside it, else by Phi2Config's
        defaults; `overrides` (Phi2Config fields) apply on top.
        Strict: a missing, unexpected or mis-shaped tensor is a ValueError naming it, except stabilizer
        norms an override turns on that the checkpoint lacks: they start at weight 1, bias 0, and one line
        says so (pass report=False when a stage checkpoint loaded next brings them trained).
        dtype: float32 (when None), bfloat16 or float16; each tensor is read, converted and placed on `device`
        into a model built on the meta device, so no second full copy is held. convert(name, module) gets
        each module once its tensors are read and returns its replacement (layouts.quantizer: Phi-2 never
        exists at full precision). reader: a StrictReader giving another layout's tensors under our names
        (layouts.py's); by default the files at `path`."""
        dtype = dtype or torch.float32
        file = config_file(path)
        file_config = config_from_json(file) if file else {}
        check_overrides(overrides, Phi2Config)
        config = Phi2Config(**{**file_config, **overrides})
        reader = reader or StrictReader(open_safetensors(path), path, dtype, device)
        with torch.device("meta"):  # shapes only, no memory: the real tensors are assigned below
            model = cls(config)
        fresh = {"qk_layernorm": ("q_layernorm", "k_layernorm"), "post_layernorm": ("post_layernorm",)}
        fresh = {m for flag, mods in fresh.items() if overrides.get(flag) and not file_config.get(flag) for m in mods}
        initialized = []

        def read(name, p):  # our tensor `name` from the checkpoint
            key = name if name.startswith("lm_head.") else "model." + name  # transformers' PhiModel is .model
            if "query_key_value" in name:  # transformers keeps q, k and v apart: stack them
                parts = [key.replace("query_key_value", proj) for proj in ("q_proj", "k_proj", "v_proj")]
                return torch.cat([reader.take(k, (p.shape[0] // 3, *p.shape[1:])) for k in parts])  # (3C, ...)
            if key not in reader and name.split(".")[-2] in fresh:  # a stabilizer new to this checkpoint
                initialized.append(name)
                return (torch.ones if name.endswith("weight") else torch.zeros)(p.shape, dtype=dtype, device=device)
            return reader.take(key, p.shape)

        reader.load(model, read, convert)
        if initialized and report:
            print(f"phi2: {len(initialized)} stabilizer norm tensors ({', '.join(sorted(fresh))}) are not in "
                  f"{path}; they start at weight 1, bias 0")
        return model


# -----------------------------------------------------------------------------
# The config of a transformers download


def config_from_json(file):
    """Phi2Config fields from a transformers PhiConfig config.json (4.x or 5.x) plus "post_layernorm"."""
    d = read_json(file)
    if d.get("model_type") not in ("phi", "phi-msft"):
        raise ValueError(f"{file}: not a Phi-2 config (model_type {d.get('model_type')!r}, expected 'phi'): "
                         "is this the right directory?")
    for nested in ("rope_parameters", "rope_scaling"):  # transformers 5's; some 4.x configs
        rope = d.get(nested) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{file}: {nested} {rope} is not plain RoPE; only rope_type 'default' is supported")
        for k in ("partial_rotary_factor", "rope_theta"):
            if k in rope:
                d.setdefault(k, rope[k])
    if d.get("hidden_act", "gelu_new") != "gelu_new":
        raise ValueError(f"{file}: hidden_act {d['hidden_act']!r} is not Phi-2's gelu_new")
    if d.get("num_key_value_heads") not in (None, d.get("num_attention_heads")):
        raise ValueError(f"{file}: grouped-query attention (num_key_value_heads) is not Phi-2's")
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    names = {f.name for f in fields(Phi2Config)}
    return {k: v for k, v in d.items() if k in names and v is not None}
