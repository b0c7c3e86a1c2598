"""EVA ViT-g/14 as BLIP-2 uses it, with BLIP-2's `ln_vision` on top: TinyGPT-V's frozen image encoder.

TinyGPT-V (Yuan et al., arXiv:2312.16862, section 3) keeps MiniGPT-4's vision half: EVA's ViT-g/14 (Fang
et al., arXiv:2211.07636) as BLIP-2 (Li et al., arXiv:2301.12597) cut it. Facts in docs/PAPER.md section 2.
Input: pixels (B, 3, H, W), CLIP-normalized, H and W multiples of the patch size (224 px -> 16x16).
Output: (B, 1 + N, 1408) after ln_vision, N = (H/14)(W/14): the CLS token and every patch token.

Notable parts, top to bottom:
- `VisionConfig` with the real EVA ViT-g sizes (`eva_vit_g()`) and a `tiny()` preset;
- a plain pre-norm ViT: patch embedding with bias, CLS token, learned absolute positions, exact GELU;
- biases on q and v only (a k bias would cancel in the softmax, see `Attention`);
- any image size that is a multiple of the patch: positions resized bicubically (stage 4's 448 px);
- 39 blocks, not EVA's 40: BLIP-2 takes the penultimate block's features;
- `from_pretrained`: strict loading of a transformers BLIP-2 download; LAVIS's layout is layouts.py's.

Names are LAVIS's, the official checkpoints'; `TRANSFORMERS_NAMES` maps them to `Blip2VisionModel`'s.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import StrictReader, check_overrides, config_file, open_safetensors, read_json


@dataclass
class VisionConfig:
    image_size: int = 224  # the size the position embedding was trained at; others are resized to
    patch_size: int = 14
    hidden_size: int = 1408
    num_hidden_layers: int = 39  # EVA ViT-g has 40 blocks; BLIP-2 drops the last (penultimate features)
    num_attention_heads: int = 16  # head dim 88 (LAVIS: num_heads = 1408 // 88)
    intermediate_size: int = 6144  # LAVIS: int(1408 * mlp_ratio 4.3637)
    layer_norm_eps: float = 1e-6  # the blocks' LayerNorms (EVA)
    ln_vision_eps: float = 1e-5  # LAVIS: torch's default; transformers' post_layernorm uses 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self):
        return self.image_size // self.patch_size  # 16 at 224 px

    @classmethod
    def eva_vit_g(cls, **kw):
        return cls(**kw)  # the defaults are LAVIS's create_eva_vit_g and transformers' Blip2VisionConfig

    @classmethod
    def tiny(cls, **kw):
        # head_dim 12: not a power of two, like ViT-g's 88
        d = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=192)
        return cls(**{**d, **kw})


# -----------------------------------------------------------------------------
# Building blocks


class PatchEmbed(nn.Module):
    """Cut the image into patch x patch squares and project each to a vector: one strided Conv2d."""

    def __init__(self, config):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p)  # with bias, as in EVA

    def forward(self, x):
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, self.nh, self.hd = config.hidden_size, config.num_attention_heads, config.head_dim
        # One projection for q, k, v: weight (3D, D), rows [q; k; v], head h owning rows h*hd:(h+1)*hd of
        # each. EVA (after BEiT) biases q and v but not k: a key bias b would add q.b to every score in
        # query q's row, and adding one number to a whole row leaves a softmax unchanged, so it could
        # never have an effect. transformers stores one `qkv.bias` whose middle third is zeros.
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(D))
        self.v_bias = nn.Parameter(torch.zeros(D))
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        B, T, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # (3D,)
        qkv = self.qkv(x) + bias  # (B, T, 3D); bias outside the Linear so qkv can be swapped (int8)
        q, k, v = qkv.view(B, T, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        # Written out, not F.scaled_dot_product_attention, to read as the formula; no mask in a ViT.
        att = (q @ k.transpose(-2, -1)) * self.hd ** -0.5  # (B, nh, T, T)
        att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax for bf16 runs
        y = (att @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D), heads side by side again
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # (B, T, D); exact erf GELU, not the tanh approximation


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). EVA ViT-g as BLIP-2
    uses it has no layer scale, no relative position bias and no dropout (drop path is 0 when frozen)."""

    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        return x + self.mlp(self.norm2(x))  # (B, T, D)


# -----------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    """Mirrors LAVIS's `create_eva_vit_g` then BLIP-2's `ln_vision`, and transformers' `Blip2VisionModel`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid_size ** 2, D))  # CLS first, then the grid
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        # BLIP-2's LayerNorm between the frozen ViT and the Q-Former, trained with the Q-Former, not EVA's
        self.ln_vision = nn.LayerNorm(D, eps=config.ln_vision_eps)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m):
        # only for training from scratch (the demo); trunc_normal(0.02) as in EVA; a no-op on meta tensors
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid_h, grid_w):
        """pos_embed (1, 1 + grid_h * grid_w, D): the parameter at the trained grid; else the CLS position
        kept and the patch positions, as a (D, g, g) image, resized bicubically (align_corners=False), as
        transformers' `interpolate_pos_encoding=True` does and LAVIS's `interpolate_pos_embed` (at load)."""
        g = self.config.grid_size
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        D = self.config.hidden_size
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, D), (1, g*g, D)
        patch_pos = patch_pos.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)  # (1, h*w, D), row-major
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)  # (1, 1 + h*w, D)

    def embed(self, pixel_values):
        """pixel_values (B, 3, H, W) -> the blocks' input (B, 1 + (H/p)(W/p), D): patches, CLS, positions."""
        p = self.config.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected (B, 3, H, W)")
        B, _, H, W = pixel_values.shape
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}: resize it "
                             f"(e.g. to {self.config.image_size}x{self.config.image_size})")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding(H // p, W // p)  # (B, 1 + N, D)

    def forward(self, pixel_values):
        """pixel_values (B, 3, H, W) -> features (B, 1 + (H/p)(W/p), D) after ln_vision."""
        x = self.embed(pixel_values)  # (B, 1 + N, D)
        for block in self.blocks:
            x = block(x)  # (B, 1 + N, D)
        return self.ln_vision(x)  # (B, 1 + N, D)

    # -------------------------------------------------------------------------
    # Loading a transformers BLIP-2 download: its "vision_config" and "vision_model.*" tensors only

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", **overrides):
        """Load the ViT and ln_vision from a saved transformers `Blip2Model`, `Blip2ForConditionalGeneration`
        or `Blip2VisionModel`, sized by its config.json (ln_vision_eps: the vision layer_norm_eps, 1e-6);
        `overrides` (VisionConfig fields) apply on top. dtype: float32 (when None), bfloat16 or float16;
        each tensor is read, converted and placed on `device` in turn."""
        check_overrides(overrides, VisionConfig)
        file = config_file(path)
        d = read_json(file) if file else {}
        if "vision_config" not in d and d.get("model_type") != "blip_2_vision_model":
            raise ValueError(f"{file or path}: not a BLIP-2 config (no vision_config)")
        prefix = "vision_model." if "vision_config" in d else ""
        config = VisionConfig(**{**config_from_blip2(d.get("vision_config", d), file), **overrides})
        tensors = {k: v for k, v in open_safetensors(path).items() if k.startswith(prefix)}
        return cls.load(config, StrictReader(tensors, path, dtype or torch.float32, device), prefix)

    @classmethod
    def load(cls, config, reader, prefix=""):
        """A model of `config` filled from `reader` (a checkpoints.StrictReader) under transformers' names
        after `prefix`, refusing leftovers; qkv.bias's k third is dropped: it has no effect (see Attention)."""
        with torch.device("meta"):  # shapes only, no memory: the real tensors are assigned below
            model = cls(config)
        state = {}
        for name, p in model.state_dict().items():
            if name.endswith(".attn.q_bias"):  # one qkv.bias (3D,) = [q_bias; k; v_bias]
                attn = name.removesuffix(".q_bias")
                q_bias, _, v_bias = reader.take(prefix + transformers_key(attn + ".qkv.bias"), (3 * p.shape[0],)).chunk(3)
                state[name], state[attn + ".v_bias"] = q_bias.clone(), v_bias.clone()
            elif not name.endswith(".attn.v_bias"):  # v_bias came with q_bias
                state[name] = reader.take(prefix + transformers_key(name), p.shape)
        reader.finish()
        model.load_state_dict(state, strict=True, assign=True)
        return model


# -----------------------------------------------------------------------------
# Names and config of a transformers BLIP-2 download


# ours -> transformers' Blip2VisionModel, module by module (inside a block: after "blocks.N.")
TRANSFORMERS_NAMES = {
    "cls_token": "embeddings.class_embedding",  # (1, 1, D)
    "pos_embed": "embeddings.position_embedding",  # (1, 1 + N, D)
    "patch_embed.proj": "embeddings.patch_embedding",
    "blocks": "encoder.layers",
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",  # its bias (3D,) holds our q_bias and v_bias
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ln_vision": "post_layernorm",  # same LayerNorm, other name, eps 1e-6 there
}


def transformers_key(name):
    """Our name -> transformers' (without the "vision_model." of a full BLIP-2 checkpoint)."""
    if name in TRANSFORMERS_NAMES:
        return TRANSFORMERS_NAMES[name]
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"{TRANSFORMERS_NAMES['blocks']}.{i}.{TRANSFORMERS_NAMES[module]}.{param}"
    module, param = name.rsplit(".", 1)
    return f"{TRANSFORMERS_NAMES[module]}.{param}"


def config_from_blip2(vc, file):
    """VisionConfig fields from transformers' Blip2VisionConfig (a dict: config.json's vision_config).
    Its defaults are EVA ViT-g's, as are ours, so a field it leaves out means the same to both."""
    if vc.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{file}: vision hidden_act {vc['hidden_act']!r} is not EVA's exact GELU ('gelu')")
    if not vc.get("qkv_bias", True):
        raise ValueError(f"{file}: vision qkv_bias is false; EVA ViT-g has q and v biases")
    d = {}
    for k in ("image_size", "patch_size"):
        v = vc.get(k, getattr(VisionConfig, k))
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ValueError(f"{file}: vision {k} {v} is not square")
            v = v[0]
        d[k] = v
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        d[k] = vc.get(k, getattr(VisionConfig, k))
    d["layer_norm_eps"] = d["ln_vision_eps"] = vc.get("layer_norm_eps", 1e-6)  # post_layernorm shares it
    return d
