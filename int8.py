"""int8 inference, by hand: the language model's Linear layers with int8 weights.

The paper promises inference in 8 GB of GPU memory, or on a CPU (docs/PAPER.md section 9); the
official code gets there with bitsandbytes, which runs on a GPU only. This file stores each weight
as per-output-channel symmetric int8 with its own scales and multiplies with torch's kernels.

- `Int8Linear`: one Linear layer in int8 (weights, scales, bias), its error bound in the docstring;
- `quantize_int8`: merge LoRA, then swap the language model's (and optionally the vision side's)
  Linear layers for Int8Linear;
- `weight_bytes`: what a module's weights occupy, for the memory figures in bench.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import merge_lora



class Int8Linear(nn.Module):
    """A Linear layer stored in int8, for inference.

    Weights: per output channel symmetric, w_q = round(w / s_w) in [-127, 127], s_w = max|w_row| / 127.
    Activations (dynamic, per token): x_q = round(x / s_x), s_x = max|x_token| / 127.
    Then y = (x_q @ w_q^T) * s_x * s_w^T + b, with the product accumulated exactly in int32
    (`torch._int_mm`). Rounding each value moves it by at most half a step, so a relative error of
    about 1/254 of the row's (token's) largest magnitude per value; over a K-long dot product the
    errors are independent and grow like sqrt(K), not K. Outlier features (a few huge activations)
    inflate s_x for their whole token and are the classic failure (LLM.int8(), Dettmers 2022).
    Where the int8 kernel cannot run or is slow (the CPU, one decoded token, odd shapes), the
    activations stay in float and the weight is used dequantized: on the CPU by a weight-only
    kernel (bf16 activations times int8 weights, scaled per row), on a GPU in the activation dtype.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        N = x2.shape[0]
        if _int_mm_ok(N, self.in_features, self.out_features, x.device):
            x2 = x2.float()
            sx = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0  # (N, 1)
            xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * sx * self.weight_scale  # (N, out)
        elif x.device.type == "cpu":
            # weight-only int8 kernel: bf16 activations, int8 weights, per-channel scales
            y = torch._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self.weight_scale.bfloat16()).float()
        else:
            # GPU decode: the weight is turned into the activations' dtype (exact: bf16 and fp16 hold
            # every integer up to 256) and its per-row scale applied to the output, not the weight, so
            # each weight costs 1 + 2 + 2 bytes of traffic in bf16 instead of the 1 + 4 + 4 + 4 + 4 of
            # dequantizing to fp32 and scaling the weight itself.
            y = (F.linear(x2, self.weight_int8.to(dtype)) * self.weight_scale.to(dtype)).float()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


def _int_mm_ok(n, k, m, device):
    """Whether to run int8 x int8 -> int32: on a GPU, within torch._int_mm's shape rules (n > 16
    rows, k and m multiples of 8). Never on the CPU: there torch._int_mm measured about 15x slower
    than the weight-only kernel at Phi-2's shapes with 16 to 256 rows (torch 2.13, 2 cores; bench.py
    section 2's time to first token shows the difference)."""
    return device.type == "cuda" and n > 16 and k % 8 == 0 and m % 8 == 0


def quantize_int8(model, vision=False):
    """A TinyGPTV model: merge LoRA, then replace the language model's Linear layers (and the vision side's, if asked)
    with Int8Linear. Returns the number of layers replaced."""
    merge_lora(model.llama_model)
    roots = [model.llama_model] + ([model.visual_encoder, model.qformer] if vision else [])
    count = 0
    for root in roots:
        for name, module in list(root.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, Int8Linear(child))
                    count += 1
    return count


def weight_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
