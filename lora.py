"""LoRA: low-rank adapters on frozen Linear layers (Hu et al. 2021, arXiv:2106.09685).

TinyGPT-V keeps Phi-2's 2.7B weights frozen and trains, in stages 2-4, a low-rank update on the
attention's fused `query_key_value` and its output `dense` in every layer (docs/PAPER.md section 5:
r=64, alpha=16, dropout 0.05; the official code used peft 0.2.0, this file replaces it).

    x (.., in) ──────────── W (frozen, out x in) ─────────────┐
        │                                                     + ──> y (.., out)
        └─ dropout ─> A (r x in) ─> B (out x r) ─> * alpha/r ─┘

    y = W x + b + (alpha / r) * B A dropout(x)

- Low rank: the update B A has out*r + r*in numbers, not out*in (Phi-2's qkv at r=64: 655k, not
  19.7M), on the paper's observation that fine-tuning updates have low "intrinsic rank".
- B starts at zero and A at random (kaiming-uniform, as nn.Linear): a fresh adapter adds exactly
  nothing, so training starts from the pretrained model, yet the gradient of B (which depends on
  A x) is not zero, so learning can begin.
- alpha / r scales the update, so that changing r does not change how big the update is for the
  same learning rate (Hu et al. section 4.1); TinyGPT-V's 16 / 64 = 0.25.
- For inference the update can be merged into W (W += scaling * B A): no extra cost at all.
"""

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """An nn.Linear plus lora_A (r, in) and lora_B (out, r). It *is* an nn.Linear holding the very
    same weight and bias tensors (frozen), so a checkpoint written before LoRA was added (keys
    `x.weight`, `x.bias`) still loads into it, with `x.lora_A` and `x.lora_B` beside them."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: adopt base's tensors instead of new ones
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r): zero, so W is unchanged
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its weight
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (.., out)
        if self.merged:  # W already holds scaling * B A
            return y
        a = F.linear(self.lora_dropout(x), self.lora_A)  # (.., r)
        return y + F.linear(a, self.lora_B) * self.scaling  # (.., out)

    def delta_weight(self):
        """scaling * B @ A, (out, in), computed in float32 so merging into bf16 weights loses little."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight; calling it twice changes nothing."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


# -----------------------------------------------------------------------------
# Model-level helpers


def add_lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0):
    """Wrap every nn.Linear whose name ends in one of `targets` in a LoRALinear; returns their names,
    sorted. TinyGPT-V's "dense" matches only Phi-2's attention output, not the MLP's fc1/fc2."""
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(t) for t in targets) + r")$")
    chosen = [name for name, m in model.named_modules()
              if pattern.search(name) and type(m) is nn.Linear]  # not LoRALinear: no double wrap
    if not chosen:
        raise ValueError(f"add_lora: no nn.Linear in the model is named like {list(targets)}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    return sorted(chosen)


def mark_trainable(model: nn.Module, is_trainable):
    """requires_grad = is_trainable(name) for every parameter; returns the trainable names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(is_trainable(name)))
        if p.requires_grad:
            names.append(name)
    return names


def merge_lora(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
