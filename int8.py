"""int8 inference, by hand: the language model's Linear layers with int8 weights.

The paper promises inference in 8 GB of GPU memory, or on a CPU (docs/PAPER.md section 9); the
official code gets there with bitsandbytes, which runs on a GPU only. This file stores each weight
as per-output-channel symmetric int8 with its own scales and multiplies with torch's kernels.

- `quantize_weight`, `quantize_rows`: the arithmetic, weights per output channel, activations per
  token as two int8 digits;
- `CPU_KERNEL`: which of torch's kernels multiplies on this CPU, chosen once when this file is
  imported, in one place;
- `Int8Linear`: one Linear layer in int8 (weights, scales, bias), its error bound in the docstring;
- `quantize_int8`: merge LoRA, then swap a built model's Linear layers for Int8Linear;
- `quantizer`: the same while the weights load, one layer at a time, so a full-precision copy of
  the language model never exists (checkpoints.StrictReader.load calls it);
- `weight_bytes`: what a module's weights occupy, for the memory figures in bench.py.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import free_promptly
from lora import merge_lora

# -----------------------------------------------------------------------------
# The arithmetic


def quantize_weight(w):
    """(out, in) float -> int8 (out, in) and float32 scales (out,): per output channel, symmetric,
    s_w = max|w_row| / 127 and w_q = round(w / s_w) in [-127, 127] (-128 is never used, so the range
    is symmetric and w_q * s_w never exceeds the row's largest magnitude)."""
    lo, hi = w.detach().aminmax(dim=1)  # (out,) each: no |w| copy of the whole matrix
    scale = torch.maximum(-lo, hi).float().clamp(min=1e-8) / 127.0  # (out,)
    w = w.detach().to(torch.float32, copy=True)  # one float32 copy, rounded in place
    return w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


# Activations are quantized per token as two int8 digits. One 8-bit digit per value (the usual
# W8A8) costs as much error as the weights do: 3.2% logit error against fp32 on bench.py's 4-layer
# Phi-2, against 2.1% for the weights alone. The second digit writes the first digit's rounding
# remainder at 1/126 of its step, so x is held to about 14 bits and the error left is the weights'
# (2.1%). Both digits go through the same int8 GEMM as one batch of 2N rows, so the weights are
# still read once; on the CPU a decode step still took 5-30% longer than with one digit
# (docs/LOG.md, 2026-12-02): the price of the lower error.
DIGIT = 63  # each digit in [-63, 63]: see fbgemm_pack for why not 127


def row_scales(x):
    """(N, in) -> s_x (N, 1) float32: max|x_token| / 63, computed afresh for every input (dynamic)."""
    return x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-8).div_(DIGIT)


def quantize_rows(x):
    """(N, in) float -> the digits hi, lo (N, in each; float, integer values in [-63, 63]) and
    s_x (N, 1), with x = s_x * (hi + lo / 126) to within s_x / 252:
    hi = round(x / s_x), and lo = round(126 * (x / s_x - hi)), that remainder being in [-1/2, 1/2]."""
    scale = row_scales(x)
    u = x.float().div(scale)  # (N, in), in [-63, 63]
    hi = u.round()
    return hi, u.sub_(hi).mul_(2 * DIGIT).round_(), scale


def combine_digits(y, scale):
    """The products of both digits, (2N, out) = [hi; lo] @ w_q^T (times s_w), back to (N, out) in x's
    units: (y_hi + y_lo / 126) * s_x."""
    N = scale.shape[0]
    return torch.add(y[:N], y[N:], alpha=1.0 / (2 * DIGIT)).mul_(scale)


# -----------------------------------------------------------------------------
# Which kernel multiplies on the CPU, chosen once for this machine
#
#   "fbgemm":      fbgemm's prepacked int8 x int8 -> int32 GEMM, the kernel torch.ao's dynamic int8
#                  calls (torch.ops.quantized), fed our int8 weights, our scales and our activation
#                  digits. x86 CPUs (AVX2 and AVX-512; VNNI where there is one).
#   "weight_only": torch._weight_int8pack_mm, bf16 activations times int8 weights: everywhere else
#                  (ARM, or a torch built without fbgemm).
#
# Why fbgemm: one token through Phi-2's matrices, weights not in cache, on a 2-core AMD EPYC with
# AVX-512 and VNNI but no AMX, it read the weights at 30-34 GB/s. oneDNN's int8 GEMM
# (torch.ops.onednn.qlinear_pointwise) read them at 30-33, a torch.compile'd dequantize-and-reduce at
# 32 (K = 2560) or 12 (K = 10240), and _weight_int8pack_mm at 25 (docs/LOG.md, 2026-12-02). On a
# 2-core AMD EPYC with AVX2 only: fbgemm 12-13 GB/s, _weight_int8pack_mm 6.5-13, a torch.compile'd
# dequantize-and-reduce 1.3, so fbgemm there too (docs/LOG.md, 2026-12-02, third session).


def cpu_kernel():
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight_only"


CPU_KERNEL = cpu_kernel()


def fbgemm_pack(weight_int8, scale):
    """Our int8 weight (out, in) and scales (out,) in fbgemm's packed layout (its own copy, the only
    one kept). fbgemm wants a per-channel quantized tensor: ours, with zero points 0.

    fbgemm takes uint8 activations: a digit d goes in as d + 64, in [1, 127]. On CPUs without VNNI
    its kernel sums pairs of uint8 x int8 products in int16, which saturates above 32767; pairs of
    at most 127 * 127 never do (torch.ao's dynamic Linear passes `reduce_range=True`, 7-bit
    activations, for the same reason). So each digit keeps to [-63, 63], and the products are exact
    on every x86 CPU."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's kernels still take them
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight_int8.cpu(), scale.double().cpu(),
                                                     torch.zeros_like(scale, dtype=torch.long).cpu(), 0)
        return torch.ops.quantized.linear_prepack(q, None)


class Int8Linear(nn.Module):
    """A Linear layer stored in int8, for inference.

    Weights: per output channel symmetric, w_q = round(w / s_w) in [-127, 127], s_w = max|w_row| / 127.
    Activations (dynamic, per token): two digits, x = s_x * (hi + lo / 126), s_x = max|x_token| / 63
    (`quantize_rows`). Then y = (hi @ w_q^T + (lo @ w_q^T) / 126) * s_x * s_w^T + b, each product
    accumulated exactly in int32. Rounding a weight moves it by at most half a step, a relative
    error of about 1/254 of its row's largest magnitude; over a K-long dot product these errors are
    independent and grow like sqrt(K), not K. The activations' digits are 126 times finer than one
    8-bit value, which leaves the weights' rounding as almost the whole error. Outlier features (a
    few huge activations) inflate s_x for their whole token and are the classic failure of 8-bit
    activations (LLM.int8(), Dettmers 2022); per token, one outlier token cannot spoil the others.

    Kernels (torch's): on the CPU, CPU_KERNEL above. fbgemm quantizes its input itself, with one
    scale and zero point for the whole tensor: handed the digits as floats with scale 1 and zero
    point 64, it rounds nothing, and its int32 sums are exactly ours (tests/test_int8.py). On a GPU
    with more than 16 rows `torch._int_mm` multiplies the digits and w_q; for fewer (one decoded
    token) the weight is used dequantized in the activations' dtype.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.register_buffer("weight_int8", weight)
        self.packed = None  # fbgemm's packed copy of weight_int8, which then is the only one kept
        self.pack()

    def pack(self):
        """On the CPU with fbgemm: move the int8 weight into fbgemm's packed layout (once, at load
        time; bench.py calls it again after filling a model built on the meta device)."""
        if self.weight_int8 is not None and self.weight_int8.device.type == "cpu" and CPU_KERNEL == "fbgemm":
            free_promptly()  # packing layer after layer frees as much as it keeps: see checkpoints.py
            self.packed, self.weight_int8 = fbgemm_pack(self.weight_int8, self.weight_scale), None

    def int8_weight(self):
        """The int8 weight (out, in), read back from fbgemm's packed copy where that is the one kept."""
        if self.packed is None:
            return self.weight_int8
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def _apply(self, fn, recurse=True):
        # model.to("cuda") and the like: fbgemm's packed weight stays on the CPU, so unpack it first
        if self.packed is not None and fn(torch.empty(0)).device.type != "cpu":
            self.weight_int8, self.packed = self.int8_weight(), None
        return super()._apply(fn, recurse)

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        N = x2.shape[0]
        if self.packed is not None:  # CPU, fbgemm: both digits as one batch of 2N rows
            hi, lo, sx = quantize_rows(x2)  # (N, in) each, (N, 1)
            fbgemm = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            y = combine_digits(fbgemm(torch.cat([hi, lo]), 1.0, DIGIT + 1, self.packed), sx)  # (N, out)
        elif x.device.type == "cpu":  # weight-only kernel: bf16 activations, int8 weights, per-row scales
            y = torch._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self.weight_scale.bfloat16()).float()
        elif N > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:  # torch._int_mm's rules
            hi, lo, sx = quantize_rows(x2)  # (N, in) each, (N, 1)
            digits = torch.cat([hi, lo]).to(torch.int8)  # (2N, in)
            y = combine_digits(torch._int_mm(digits, self.weight_int8.t()).float() * self.weight_scale, sx)  # (N, out)
        else:
            # GPU decode: the weight is turned into the activations' dtype (exact: bf16 and fp16 hold
            # every integer up to 256) and its per-row scale applied to the output, not the weight, so
            # each weight costs 1 + 2 + 2 bytes of traffic in bf16 instead of the 1 + 4 + 4 + 4 + 4 of
            # dequantizing to fp32 and scaling the weight itself.
            y = (F.linear(x2, self.weight_int8.to(dtype)) * self.weight_scale.to(dtype)).float()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        kernel = "fbgemm" if self.packed is not None else "torch"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


# -----------------------------------------------------------------------------
# Quantizing a model: after it is built, or while it loads


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


def quantizer(lora=None, scaling=1.0):
    """A `convert` for checkpoints.StrictReader.load (Phi2.from_pretrained passes it on): each
    nn.Linear becomes an Int8Linear as soon as its weight and bias are read, so only one layer is
    ever held at full precision. lora: {name.lora_A: (r, in), name.lora_B: (out, r)} from a stage
    checkpoint, merged first (W + scaling * B A, in float32, as LoRALinear.merge), as quantize_int8
    merges before quantizing. Every LoRA pair must find its layer: `convert.unused()` lists those
    that did not."""
    lora = dict(lora or {})

    def convert(name, module):
        if type(module) is not nn.Linear:
            return module
        a, b = lora.pop(f"{name}.lora_A", None), lora.pop(f"{name}.lora_B", None)
        if a is not None and b is not None:
            delta = (b.float() @ a.float()) * scaling  # (out, in)
            if delta.shape != module.weight.shape:
                raise ValueError(f"LoRA for {name} makes a {tuple(delta.shape)} update, the weight is "
                                 f"{tuple(module.weight.shape)}")
            module.weight = nn.Parameter(module.weight.float() + delta.to(module.weight.device), requires_grad=False)
        elif a is not None or b is not None:
            raise ValueError(f"LoRA for {name}: lora_A and lora_B come in pairs, one is missing")
        return Int8Linear(module)

    convert.unused = lambda: sorted(lora)
    return convert


def weight_bytes(module):
    """Bytes of a module's weights: parameters, buffers and fbgemm's packed int8 copies."""
    packed = sum(m.out_features * m.in_features for m in module.modules()
                 if isinstance(m, Int8Linear) and m.packed is not None)
    return packed + sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
