"""Speed paths for particular hardware: decode steps replayed as CUDA graphs, a bf16 vision tower
computed in float32 on CPUs without fast bf16 matrix products, and the dtype each device trains in.

A reader of the paper may skip this file: it computes exactly what phi2.py and vit.py compute,
only faster on some machines. Its jobs:
- `CUDAGraphDecoder`: the `decoder` Phi2.generate takes, each decode step recorded once as a CUDA
  graph (`GraphedDecodeStep`, over a fixed-size `StaticKVCache`) and replayed; `decoder_for(device)`
  says whether a device gets it;
- `CPU_BF16_MATMUL` and `Float32Blocks`: whether torch multiplies bf16 matrices at full speed on
  this CPU, decided once when this file is imported, and, where it does not, a ViT whose bf16
  blocks are computed in float32, one block's weights widened at a time;
- `InferenceAttention`: the ViT's attention for answering, head by head on a CPU in bf16, through
  torch's fused kernel elsewhere;
- `compute_dtype`, `mixed_precision`, `autocast`: bf16 where a device computes in it at full speed.
"""

import torch
import torch.nn.functional as F

from phi2 import KVCache
from vit import Attention, VisionTransformer

# -----------------------------------------------------------------------------
# The GPU decode path: one CUDA graph per decode step


class StaticKVCache:
    """A cache of fixed size, for decode steps replayed as a CUDA graph (`GraphedDecodeStep`).

    A graph replays the same kernels on the same addresses and shapes, so nothing here may grow or
    move: storage for the whole generation is allocated once, the new key and value go to the slot
    held in the tensor `slot` (a replay writes wherever it points), and attention always reads all
    `capacity` slots while the attention mask hides the ones not written yet. Zeros rather than
    empty memory there: a hidden slot's value is still multiplied by probability 0, and 0 * NaN is NaN."""

    def __init__(self, cache: KVCache, capacity):
        n = cache.length  # the prompt, from the prefill's ordinary cache
        self.keys, self.values = [], []
        for k, v in zip(cache.keys, cache.values):
            for src, store in ((k, self.keys), (v, self.values)):
                buf = src.new_zeros(*src.shape[:2], capacity, src.shape[3])  # (B, nh, capacity, hd)
                buf[:, :, :n] = src[:, :, :n]
                store.append(buf)
        self.slot = torch.tensor([n], device=self.keys[0].device)  # where the next token's key goes
        self.capacity = capacity

    @property
    def length(self):
        return self.capacity - 1  # what Phi2.hidden_states sees: one new token, every other slot is "past"

    def update(self, layer, k, v):
        """Write k, v (B, nh, 1, hd) at `slot`; return all slots (B, nh, capacity, hd)."""
        if k.shape[2] != 1:
            raise ValueError("a StaticKVCache takes one token per step; prefill with a KVCache")
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]


class GraphedDecodeStep:
    """One decode step, token (B,) -> next-token logits (B, vocab), recorded as a CUDA graph.

    Why: a batch-1 decode step of Phi-2 is a few hundred small kernels, and on a GPU launching them
    one by one from Python takes longer than running them (bench.py section 1). A CUDA graph records
    the launches once; each replay() issues them all in one call. Every input of the step lives in a
    buffer that is overwritten in place before a replay: the token, its position, the attention mask
    over all the cache's slots, and the cache's write slot. Without a GPU the same step runs eagerly,
    which is how the CPU tests check the fixed-size cache and the mask bookkeeping."""

    def __init__(self, model, cache: KVCache, attention_mask, capacity):
        B, S = attention_mask.shape
        self.model, self.cache = model, StaticKVCache(cache, capacity)
        self.token = attention_mask.new_zeros(B, 1)  # (B, 1)
        self.mask = attention_mask.new_zeros(B, capacity)  # (B, capacity): 1 = a real, written slot
        self.mask[:, :S] = attention_mask
        self.position = attention_mask.sum(-1, keepdim=True) - 1  # (B, 1): real tokens so far, minus 1
        self.filled = S
        self.graph = None
        if attention_mask.is_cuda:
            # Warm up on a side stream before capturing, as torch.cuda.graphs asks: first calls do
            # one-time work (cuBLAS handles, workspaces) that must not be recorded. The warm-up writes
            # slot S, which the first real step overwrites; the mask hides it meanwhile.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()  # (B, vocab), rewritten by every replay

    def _step(self):
        h = self.model.hidden_states(self.token, attention_mask=self.mask, position_ids=self.position,
                                     kv_cache=self.cache)  # (B, 1, C)
        return self.model.lm_head(h[:, -1])  # (B, vocab)

    def __call__(self, token):
        if self.filled == self.cache.capacity:
            raise ValueError(f"the decode cache is full ({self.cache.capacity} slots)")
        self.token.copy_(token[:, None])
        self.cache.slot.fill_(self.filled)
        self.mask[:, self.filled] = 1
        self.position += 1
        self.filled += 1
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the buffer


class CUDAGraphDecoder:
    """Phi2.generate's `decoder`: at a generation's first decode step the prompt's keys and values
    move into a fixed-size cache and the step is recorded (a one-token answer never records one);
    every later step replays it."""

    def __init__(self):
        self.prefill, self.step = None, None

    def __call__(self, model, token, cache, attention_mask, capacity):
        if self.prefill is not cache:  # a new generation
            self.prefill, self.step = cache, GraphedDecodeStep(model, cache, attention_mask, capacity)
        return self.step(token)  # (B, vocab)


def decoder_for(device):
    """The decoder generation uses on `device`: CUDA graphs on a GPU outside autocast (graphs and
    autocast's cast cache do not mix); None, the plain step, elsewhere: on the CPU graphs gain nothing."""
    if torch.device(device).type == "cuda" and not torch.is_autocast_enabled("cuda"):
        return CUDAGraphDecoder()
    return None


# -----------------------------------------------------------------------------
# A bf16 vision tower on a CPU without fast bf16 matrix products


def cpu_bf16_matmul():
    """Whether torch multiplies bf16 matrices at full speed on this CPU: through oneDNN, which needs
    AVX-512 (or AMX, or ARM's bf16). Without it (an AVX2 CPU) bf16 matmuls take a slow generic path."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_BF16_MATMUL = cpu_bf16_matmul()  # decided once, when this file is imported


class Float32Blocks(VisionTransformer):
    """vit.py's tower, whose blocks, when it is bf16 on a CPU without fast bf16 matmuls
    (CPU_BF16_MATMUL false), are computed in float32. The weights stay bf16 in memory (2 GB, not
    float32's 4) and each block's are widened for its own call only, about 100 MB at a time. On an
    AVX2 CPU a 448 px block ran 8x faster this way than in bf16 (docs/LOG.md, 2026-12-02, third
    session). Elsewhere it is vit.py's forward."""

    def forward(self, pixel_values):
        p = self.pos_embed
        if p.dtype != torch.bfloat16 or p.device.type != "cpu" or CPU_BF16_MATMUL:
            return super().forward(pixel_values)
        x = self.embed(pixel_values)  # (B, 1 + N, D)
        return self.ln_vision(self.blocks_in_float32(x).to(x.dtype))  # (B, 1 + N, D)

    def blocks_in_float32(self, x):
        """The blocks of a bf16 tower, computed in float32: (B, T, D) -> (B, T, D) float32."""
        x = x.float()
        for block in self.blocks:
            weights = {k: v.float() if v.is_floating_point() else v for k, v in block.state_dict().items()}
            x = torch.func.functional_call(block, weights, (x,))  # (B, T, D)
        return x


def compute_dtype(device, amp="auto", real=True):
    """What frozen weights are stored and multiplied in: bf16 where the device does it at full speed
    (a CUDA GPU with bf16; for real weights a CPU with fast bf16), else fp32. Phi-2 and the vision
    tower then take 7.8 GB instead of 15.7 (docs/PAPER.md section 9); the demo's tiny stand-ins
    keep training in fp32 on a CPU, as their tables were measured."""
    if amp in ("off", "fp16"):
        return torch.float32
    if device.startswith("cuda"):
        return torch.bfloat16 if amp == "bf16" or torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if real and (amp == "bf16" or CPU_BF16_MATMUL) else torch.float32


def mixed_precision(device, amp="auto", real=True):
    """-> (autocast dtype or None, GradScaler): bf16 autocast where compute_dtype is bf16; on a CUDA
    GPU without bf16, fp16 with a GradScaler (fp16's narrow range underflows small gradients unless
    the loss is scaled up first); else fp32."""
    if compute_dtype(device, amp, real) == torch.bfloat16:
        return torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)
    if device.startswith("cuda") and amp != "off":
        return torch.float16, torch.amp.GradScaler("cuda")
    return None, torch.amp.GradScaler("cuda", enabled=False)


def autocast(device, amp="auto", real=True):
    dtype = mixed_precision(device, amp, real)[0]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def float32_blocks(vit):
    """Give a loaded VisionTransformer the forward above (same parameters, same state dict)."""
    vit.__class__ = Float32Blocks
    return vit


class InferenceAttention(Attention):
    """vit.py's attention for answering (every command's model: cli.ready_to_answer), the same weights
    and formula computed the way each device does it fastest (docs/LOG.md, 2026-12-05):
    - on a CPU in bf16, vit.py's formula one head at a time: a head's (T, T) scores (2 MB at 448 px)
      stay in cache from the first product through the softmax to the second, and the products run at
      the machine's bf16 rate. At 448 px a block's attention took 12 ms here against 34 ms through torch's
      fused kernel, whose bf16 CPU kernel multiplies small tiles at a fifth of that rate;
    - elsewhere (a GPU, or float32 blocks), torch's fused kernel (F.scaled_dot_product_attention),
      which never holds the scores; its rounding differs from the written-out softmax's within the dtype's
      precision."""

    def forward(self, x):
        B, T, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # (3D,)
        q, k, v = (self.qkv(x) + bias).view(B, T, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        if x.device.type != "cpu" or x.dtype != torch.bfloat16:
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        else:
            q = q * self.hd ** -0.5  # (B, nh, T, hd): scaling T queries costs less than scaling T*T scores
            y = torch.empty_like(q)
            for b in range(B):
                for h in range(self.nh):
                    att = (q[b, h] @ k[b, h].transpose(0, 1)).softmax(-1)  # (T, T); computed in fp32, rounded once
                    y[b, h] = att @ v[b, h]  # (T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


def inference_attention(vit):
    """Give every block of a loaded VisionTransformer the attention above (same parameters)."""
    for block in vit.blocks:
        block.attn.__class__ = InferenceAttention
    return vit
