"""int8 inference, by hand: the language model's Linear layers with int8 weights.

The paper promises inference in 8 GB of GPU memory, or on a CPU (docs/PAPER.md section 9), where the
official code's bitsandbytes needs a GPU: here each weight row is symmetric int8 with its own scale.

- `quantize_weight`, `quantize_rows`: weights per output channel, activations per token as two int8 digits;
- `CPU_KERNEL`, `pack_weight`: which of torch's kernels multiplies on this CPU (chosen once), its layout;
- `Int8Linear`: one Linear layer in int8 (weights, scales, bias), its error bound in the docstring;
- `quantize_int8`: merge LoRA, then swap a built model's Linear layers for Int8Linear (layouts.py: while loading);
- `weight_bytes`: what a module's weights occupy, for bench.py's memory figures.
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
    s_w = max|w_row| / 127, w_q = round(w / s_w) in [-127, 127] (never -128: |w_q * s_w| <= max|w_row|)."""
    lo, hi = w.detach().aminmax(dim=1)  # (out,) each: no |w| copy of the whole matrix
    scale = torch.maximum(-lo, hi).float().clamp(min=1e-8) / 127.0  # (out,)
    w = w.detach().to(torch.float32, copy=True)  # one float32 copy, rounded in place
    return w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


# Activations go per token as two int8 digits. One (the usual W8A8) gives 3.2% logit error against
# fp32 on bench.py's 4-layer Phi-2, the weights alone 2.1%; a second, the first's rounding remainder at
# 1/126 of its step, holds x to about 14 bits and leaves the weights' 2.1%. Both share one int8 GEMM of
# 2N rows (weights read once), yet a CPU decode step took 5-30% longer than with one (docs/LOG.md, 2026-12-02).
DIGIT = 63  # each digit in [-63, 63]: see pack_weight for why not 127


def quantize_rows(x):
    """(N, in) float -> digits hi, lo (N, in each; float, integers in [-63, 63]) and s_x (N, 1), with
    x = s_x * (hi + lo / 126) to within s_x / 252: hi = round(x / s_x), lo = round(126 * (x / s_x - hi))."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-8).div_(DIGIT)  # (N, 1), afresh each time
    u = x.float().div(scale)  # (N, in), in [-63, 63]
    hi = u.round()
    return hi, u.sub_(hi).mul_(2 * DIGIT).round_(), scale


def combine_digits(y, scale):
    """[hi; lo] @ w_q^T (times s_w), (2N, out), back to (N, out) in x's units: (y_hi + y_lo / 126) * s_x."""
    N = scale.shape[0]
    return torch.add(y[:N], y[N:], alpha=1.0 / (2 * DIGIT)).mul_(scale)


# -----------------------------------------------------------------------------
# Which kernels multiply on the CPU, chosen once for this machine (docs/LOG.md, 2026-12-02 and -05). The
# packing ones take a packed copy of the weight (`Int8Linear.pack`, where it pays: cli.pack_where_it_pays):
#   "onednn":      AVX-512 VNNI: oneDNN's int8 GEMM, one decoded token reading Phi-2 at 44 GB/s to fbgemm's 35.
#                  Unpacked: torch._int_mm over 4 rows, _weight_int8pack_mm for fewer (bf16 activations, 31 GB/s).
#   "fbgemm":      other x86 (AVX2): fbgemm's int8 GEMM, the kernel torch.ao's dynamic int8 calls.
#   "weight_only": torch._weight_int8pack_mm for every row count: ARM, or no fbgemm.
PACKING = ("onednn", "fbgemm")


def cpu_kernel():
    engines = torch.backends.quantized.supported_engines
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    return "weight_only" if "fbgemm" not in engines else "onednn" if vnni and "onednn" in engines else "fbgemm"


CPU_KERNEL = cpu_kernel()


def pack_weight(weight_int8, scale):
    """Our int8 weight (out, in) and scales (out,), zero points 0, in the CPU kernel's packed layout. Both
    take uint8 activations, digit d as d + 64 in [1, 127]; without VNNI fbgemm sums pairs of products in
    int16, saturating above 32767, which two of at most 127 * 127 never reach (so torch.ao passes
    `reduce_range=True`, 7-bit activations): digits keep to [-63, 63], products exact on any x86."""
    if CPU_KERNEL == "onednn":  # its weight (in, out), blocked, and the zero points it is given with it
        return torch.ops.onednn.qlinear_prepack(weight_int8, None), torch.zeros(len(scale), dtype=torch.int32)
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's kernels still take them
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight_int8.cpu(), scale.double().cpu(),
                                                     torch.zeros_like(scale, dtype=torch.long).cpu(), 0)
        return torch.ops.quantized.linear_prepack(q, None)


class Int8Linear(nn.Module):
    """A Linear layer stored in int8, for inference.

    Weights w_q, s_w per output channel (`quantize_weight`), activations per token as two digits,
    x = s_x * (hi + lo / 126) (`quantize_rows`): y = (hi @ w_q^T + (lo @ w_q^T) / 126) * s_x * s_w^T + b,
    each product summed exactly in int32. Rounding moves a weight by at most half a step, 1/254 of its
    row's largest magnitude, and over a K-long dot product these independent errors grow like sqrt(K),
    not K; the digits, 126 times finer than one 8-bit value, leave that as almost the whole error. And
    outliers, 8-bit activations' classic failure (LLM.int8(), Dettmers 2022), inflate only their token's s_x.

    Kernels: CPU_KERNEL's packed copy on the CPU, fed the digits as uint8 with zero point 64 (oneDNN), or
    as floats that fbgemm's own per-tensor rounding, scale 1, maps to the same: their int32 sums are
    exactly ours (tests/test_int8.py), as are `torch._int_mm`'s, on a GPU for over 16 rows (over 4 on a
    VNNI CPU, unpacked); for fewer the weight-only kernel (CPU) or the weight dequantized (GPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.register_buffer("weight_int8", weight)
        self.packed = None  # the CPU kernel's packed copy of weight_int8, which then is the only one kept

    def pack(self):
        """On the CPU with a packing kernel (CPU_KERNEL): the int8 weight replaced by the kernel's packed copy."""
        if self.weight_int8 is not None and self.weight_int8.device.type == "cpu" and CPU_KERNEL in PACKING:
            free_promptly()  # packing layer after layer frees as much as it keeps: see checkpoints.py
            self.packed, self.weight_int8 = pack_weight(self.weight_int8, self.weight_scale), None

    def int8_weight(self):
        """The int8 weight (out, in), read back from the packed copy where that is the one kept."""
        if self.packed is None:
            return self.weight_int8
        if isinstance(self.packed, tuple):  # oneDNN's
            return self.packed[0].to_dense().t().contiguous()
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def _apply(self, fn, recurse=True):
        # model.to("cuda") and the like: a packed weight stays on the CPU, so unpack it first
        if self.packed is not None and fn(torch.empty(0)).device.type != "cpu":
            self.weight_int8, self.packed = self.int8_weight(), None
        return super()._apply(fn, recurse)

    def forward(self, x):
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        N = x2.shape[0]
        if self.packed is not None:  # CPU: both digits as one batch of 2N rows, as uint8 with zero point 64
            hi, lo, sx = quantize_rows(x2)  # (N, in) each, (N, 1)
            if isinstance(self.packed, tuple):  # oneDNN
                digits = torch.cat([hi, lo]).add_(DIGIT + 1).to(torch.uint8)  # (2N, in)
                y = torch.ops.onednn.qlinear_pointwise(digits, 1.0, DIGIT + 1, self.packed[0], self.weight_scale.float(),
                                                       self.packed[1], None, 1.0, 0, torch.float32, "none", [], "")
            else:  # fbgemm, given floats, rounds them to the same uint8
                fbgemm = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
                y = fbgemm(torch.cat([hi, lo]), 1.0, DIGIT + 1, self.packed)
            y = combine_digits(y, sx)  # (N, out)
        elif (self.in_features % 8 == 0 and self.out_features % 8 == 0  # torch._int_mm's rules on a GPU,
              and (N > 16 if x.device.type != "cpu" else N > 4 and CPU_KERNEL == "onednn")):  # crossover on a CPU
            hi, lo, sx = quantize_rows(x2)  # (N, in) each, (N, 1)
            digits = torch.cat([hi, lo]).to(torch.int8)  # (2N, in)
            y = combine_digits(torch._int_mm(digits, self.weight_int8.t()).float() * self.weight_scale, sx)  # (N, out)
        elif x.device.type == "cpu":  # weight-only kernel: bf16 activations, int8 weights, per-row scales
            y = torch._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self.weight_scale.bfloat16()).float()
        else:
            # GPU decode: the weight cast to the activations' dtype (exact for int8 in bf16 and fp16), its scale
            # applied to the output: 1 + 2 + 2 bytes of traffic per weight, not the 1 + 4 + 4 + 4 + 4 of fp32
            y = (F.linear(x2, self.weight_int8.to(dtype)) * self.weight_scale.to(dtype)).float()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        kernel = "torch" if self.packed is None else "onednn" if isinstance(self.packed, tuple) else "fbgemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


# -----------------------------------------------------------------------------
# Quantizing a model: after it is built, or while it loads


def quantize_int8(model, vision=False):
    """A TinyGPTV model: merge LoRA, then replace the language model's Linear layers (and the vision side's, if asked)
    with Int8Linear. Returns the number of layers replaced."""
    merge_lora(model.llama_model)
    roots = [model.llama_model] + ([model.visual_encoder, model.qformer] if vision else [])
    return sum(int8_linears(root) for root in roots)


def int8_linears(root):
    """Replace every nn.Linear inside `root` with an Int8Linear; -> how many."""
    linears = [(m, name) for m in root.modules() for name, child in m.named_children() if isinstance(child, nn.Linear)]
    for module, name in linears:
        setattr(module, name, Int8Linear(getattr(module, name)))
    return len(linears)


def weight_bytes(module):
    """Bytes of a module's weights: parameters, buffers and the packed int8 copies."""
    packed = sum(m.out_features * m.in_features for m in module.modules()
                 if isinstance(m, Int8Linear) and m.packed is not None)
    return packed + sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
