"""int8 inference, by hand: the language model's Linear layers with int8 weights.

The paper promises inference in 8 GB of GPU memory, or on a CPU (docs/PAPER.md section 9); the
official code gets there with bitsandbytes, which runs on a GPU only. This file stores each weight
as per-output-channel symmetric int8 with its own scales and multiplies with torch's kernels.

- `quantize_weight`, `quantize_rows`: the arithmetic, one rule for weights and for activations;
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


def row_scales(x):
    """(N, in) -> s_x (N, 1) float32: max|x_token| / 127, computed afresh for every input (dynamic)."""
    return x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127.0


def quantize_rows(x):
    """(N, in) float -> x_q = round(x / s_x) (float, integer values in [-127, 127]) and s_x (N, 1):
    the weights' rule, per token. x / s_x is taken as x * (1 / s_x), as fbgemm does, so that its
    rounding and this one agree to the last bit."""
    scale = row_scales(x)
    return torch.round(x.float() * (1.0 / scale)).clamp(-127, 127), scale


# -----------------------------------------------------------------------------
# Which kernel multiplies on the CPU, chosen once for this machine
#
#   "fbgemm":      fbgemm's prepacked int8 x int8 -> int32 GEMM, the kernel torch.ao's dynamic int8
#                  calls (torch.ops.quantized), fed our int8 weights, our scales and our per-token
#                  quantized activations. x86 CPUs (AVX2 and AVX-512; VNNI where there is one).
#   "weight_only": torch._weight_int8pack_mm, bf16 activations times int8 weights: everywhere else
#                  (ARM, or a torch built without fbgemm).
#
# Why fbgemm: at Phi-2's four matrix shapes, 4 layers' worth (315 MB of int8), on an AMD EPYC with
# AVX-512, VNNI and bf16 but no AMX, 2 threads, it took 72 ms for one token where _weight_int8pack_mm
# took 207 and torch._int_mm (oneDNN) 179-290, and 253 ms for 32 tokens against 1021 and 464.


def cpu_kernel():
    return "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight_only"


CPU_KERNEL = cpu_kernel()


def fbgemm_pack(weight_int8, scale):
    """Our int8 weight (out, in) and scales (out,) in fbgemm's packed layout (its own copy, the only
    one kept). fbgemm wants a per-channel quantized tensor: ours, with zero points 0."""
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's kernels still take them
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight_int8.cpu(), scale.double().cpu(),
                                                     torch.zeros_like(scale, dtype=torch.long).cpu(), 0)
        return torch.ops.quantized.linear_prepack(q, None)


class Int8Linear(nn.Module):
    """A Linear layer stored in int8, for inference.

    Weights: per output channel symmetric, w_q = round(w / s_w) in [-127, 127], s_w = max|w_row| / 127.
    Activations (dynamic, per token): x_q = round(x / s_x), s_x = max|x_token| / 127.
    Then y = (x_q @ w_q^T) * s_x * s_w^T + b, with the product accumulated exactly in int32.
    Rounding each value moves it by at most half a step, so a relative error of about 1/254 of the
    row's (token's) largest magnitude per value; over a K-long dot product the errors are
    independent and grow like sqrt(K), not K. Outlier features (a few huge activations) inflate s_x
    for their whole token and are the classic failure (LLM.int8(), Dettmers 2022); per token, one
    outlier token cannot spoil the others, as it does with one scale for the whole input (torch.ao).

    Kernels (torch's): on the CPU, CPU_KERNEL above. fbgemm quantizes its input itself, with one
    scale and zero point for the whole tensor: given zero point 128 (int8 -> uint8) and, for one
    token, that token's s_x, it rounds exactly as we do; for several tokens it is handed x / s_x row
    by row with scale 1, and the per-token s_x is applied to its output. Its int32 sums are then
    exactly ours (tests/test_int8.py). On a GPU with more than 16 rows
    `torch._int_mm` multiplies x_q and w_q; for fewer (one decoded token) the weight is used
    dequantized in the activations' dtype.
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
        if self.packed is not None:  # CPU, fbgemm: it rounds x / scale + 128 to uint8 itself
            fbgemm = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            sx = row_scales(x2)  # (N, 1)
            if N == 1:  # one token (decoding): fbgemm's one scale for the whole input is the token's own
                y = fbgemm(x2.float(), sx.item(), 128, self.packed)  # (1, out) = x_q @ w_q^T * s_x * s_w
            else:  # rows pre-scaled, so its scale is 1 and the per-token s_x comes after
                y = fbgemm(x2.float() * (1.0 / sx), 1.0, 128, self.packed) * sx  # (N, out)
        elif x.device.type == "cpu":  # weight-only kernel: bf16 activations, int8 weights, per-row scales
            y = torch._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self.weight_scale.bfloat16()).float()
        elif N > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:  # torch._int_mm's rules
            xq, sx = quantize_rows(x2)  # (N, in), (N, 1)
            y = torch._int_mm(xq.to(torch.int8), self.weight_int8.t()).float() * sx * self.weight_scale  # (N, out)
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
