"""Speed and memory at the real sizes: ours against transformers, and against the paper's claims.

TinyGPT-V's promises are resource promises (Yuan et al., arXiv:2312.16862, abstract and section 1):
inference in 8 GB of memory or on a CPU, training on one 24 GB GPU. This file checks them with
random weights at the paper's sizes (nothing is downloaded); what is compared runs side by side in
one run, with the same weights, dtype and thread count. A reader of the paper may skip this file.

1. Phi-2 decoding (batch 1, KV cache) and prefill, ours against transformers' `PhiForCausalLM`,
   at Phi-2's real width with `--layers` layers. transformers is the reference being compared
   against, not a dependency: it is imported inside that section only, which is skipped without it.
2. int8 against fp32 and bf16 decoding, and against torch's own dynamic int8 (`torch.ao`, fbgemm)
   where it exists: speed, weight memory and logit error.
3. The whole model at the paper's sizes, one 224 px image and 32 new tokens, in int8 and bf16: peak
   memory and time per token, against the memory-bandwidth bound (weight bytes read per token over
   the bandwidth measured here).
4. Training memory: train.py's own step (one step of `train.run`) on full-size random downloads:
   stage 2 at batch 1, and on a GPU (or with --stage4) the official stage 4 (448 px, 1024 text
   tokens, batch 3) with and without activation checkpointing. On a CPU only where it has fast bf16
   (AVX-512 bf16, AMX): train.py keeps the frozen weights in fp32 elsewhere.
5. Training throughput per stage on the demo's tiny preset.
6. From the real downloads: full-size random checkpoints written in their released layouts (Phi-2
   in two fp16 shards with its index, a BLIP-2 directory), then `tinygptv.py --int8` run on them
   from start to answer: its peak resident memory, loading included (the paper's 8 GB).
7. The streaming loader train.py feeds real data through: pictures per second with 0, 1 and 2
   worker processes, and the share of a step spent waiting for data.
8. The chat: the first streamed token of a follow-up question against the first question about the
   same picture, and of the web page against the command line, on the demo's model and at full size.
9. The vision tower at 224 and 448 px against its multiply-adds at the rate one large matrix
   product of the same dtype reaches on this machine; and an int8 tower against it (time, and the
   Q-Former's outputs against the bf16 tower's).

    python bench.py                          # all sections on the CPU, 2 threads
    python bench.py --quick                  # fewer layers, tokens and repeats
    python bench.py --sections 1,2 --layers 4 --threads 2
    python bench.py --sections 3,4 --preset tiny     # the full-size sections' code, at toy size
    python bench.py --device cuda --json results.json

It prints one table: section, what was measured, ours, the reference or baseline, their ratio, the
target and whether it is met. Each peak-memory number comes from a fresh subprocess (this file run
with --child), so one measurement's memory cannot leak into the next: on the CPU it is the
process's peak resident set (VmHWM), on a GPU torch.cuda.max_memory_allocated.
"""

import argparse
import copy
import functools
import io
import json
import math
import os
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import data
import demo
import fastpaths
import int8
import loader
import tinygptv as tg
import train
from checkpoints import reuse_freed_memory
from cli import pack_where_it_pays, parse_user_prompt, ready_to_answer
from fastpaths import decoder_for
from layouts import save_pretrained
from phi2 import Phi2, Phi2Config
from train import DEMO_STAGES, param_groups

GB = 1e9

# -----------------------------------------------------------------------------
# Timing and memory helpers


def now(device):
    """Wall-clock seconds, after the GPU has finished what was queued (its work is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_time(fn, device, repeats):
    times = []
    for _ in range(repeats):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return statistics.median(times)


def timed_generate(run, first_block, device, n):
    """Call run() (one generation of n new tokens) and time it. Returns (seconds to the first token,
    tokens/s after it, run's result). Every forward pass, prefill or decode step, begins in
    `first_block`; a pre-hook notes when, so one call yields both numbers for any model, ours or
    transformers'. Tokens/s comes from the median step, so a moment when another process takes the
    CPU does not count. Decode steps replayed as a CUDA graph enter no Python module, so the hook
    sees only the prefill and the graph's warm-up: then tokens/s is the mean over the steps after
    the first token, warm-up and capture included, as a user pays them."""
    starts = []

    def note(module, args):
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # no sync while recording
            starts.append(now(device))

    hook = first_block.register_forward_pre_hook(note)
    try:
        t0 = now(device)
        out = run()
        t1 = now(device)
    finally:
        hook.remove()
    if n < 2 or len(starts) < 2:
        raise ValueError("timed_generate needs at least 2 new tokens")
    if len(starts) == n:  # one forward per token: prefill, then n - 1 decode steps
        ends = starts[2:] + [t1]
        step = statistics.median(e - s for s, e in zip(starts[1:], ends))  # one decode step, one new token
    else:
        step = (t1 - starts[1]) / (n - 1)
    return starts[1] - t0, 1 / step, out


def bandwidth(device, gib=1.0, repeats=5):
    """Memory bandwidth in bytes/s: the best of a few sums of a `gib` GiB float32 tensor (summing
    reads each byte once and computes almost nothing, like a batch-1 decode step)."""
    x = torch.ones(int(gib * 2 ** 30) // 4, device=device)
    x.sum()
    best = min(median_time(x.sum, device, 1) for _ in range(repeats))
    return x.numel() * 4 / best


def higher_bandwidth(bw, args):
    """The higher of the run's first bandwidth reading and one taken now. A shared machine's memory
    speed moves by 2x within minutes (8.7-20.2 GB/s in one hour on one AVX2 CPU), and a bound that
    a measured speed beats is no bound: a ratio is taken against the faster reading."""
    return max(bw, bandwidth(args.device, args.bandwidth_gib))


def peak_memory(device):
    """This process's peak memory in bytes: the GPU allocator's peak, or the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:  # Linux: VmHWM, the resident set's high-water mark
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # elsewhere: ru_maxrss, in KiB on Linux and bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def state_bytes(model):
    """Bytes of everything in the state dict, torch.ao's packed int8 weights included."""
    def size(v):
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):
            return sum(size(x) for x in v)
        return 0
    return sum(size(v) for v in model.state_dict().values())


# -----------------------------------------------------------------------------
# The table


@dataclass
class Row:
    section: int
    what: str
    ours: object = None  # a number (in `unit`) or text
    baseline: object = None
    unit: str = ""
    target: str = ""
    passed: object = None  # True, False, or None where there is no target

    @property
    def ratio(self):
        if isinstance(self.ours, (int, float)) and isinstance(self.baseline, (int, float)) and self.baseline:
            return self.ours / self.baseline
        return None


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    digits = 3 if abs(v) < 10 else (1 if abs(v) < 1000 else 0)
    return f"{v:,.{digits}f}{' ' + unit if unit else ''}"


def is_note(r):
    return r.ours is None and r.baseline is None


def print_table(rows, header):
    """One table; rows without numbers (a section's setting, a skip, a failure) print as plain lines."""
    cells = [("", "what", "ours", "reference / baseline", "ratio", "target", "result")]
    for r in rows:
        cells.append(None if is_note(r) else (
            str(r.section), r.what, fmt(r.ours, r.unit), fmt(r.baseline, r.unit),
            "-" if r.ratio is None else f"{r.ratio:.2f}x", r.target or "-",
            {True: "pass", False: "MISS", None: "-"}[r.passed]))
    widths = [max(len(c[i]) for c in cells if c) for i in range(len(cells[0]))]
    print("\n" + header)
    for i, c in enumerate(cells):
        if c is None:
            r = rows[i - 1]
            print(f"{r.section}  {r.what}" + ("  MISS" if r.passed is False else ""))
            continue
        print("  ".join(x.ljust(w) if j < 2 else x.rjust(w) for j, (x, w) in enumerate(zip(c, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# -----------------------------------------------------------------------------
# 1. Phi-2: ours against transformers


def greedy_ours(model, ids, n, **kw):
    return lambda: model.generate(ids, max_new_tokens=n, stop_sequences=[], **kw)[0]


def greedy_transformers(model, ids, n):
    # all-ones mask and no eos: exactly n new tokens, like ours with stop_sequences=[]
    return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()


def section_phi2(args, bw):
    try:
        import transformers
        from transformers import PhiForCausalLM
    except ImportError:
        return [Row(1, "skipped: transformers is not installed (the reference; pip install -r requirements-test.txt)")]
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    dev, L, n = args.device, args.layers, args.new_tokens
    torch.manual_seed(0)
    ours = Phi2(Phi2Config.phi2(num_hidden_layers=L)).eval()  # random N(0, 0.02) weights, plain Phi-2
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        ref = PhiForCausalLM.from_pretrained(d, **{dtype_arg: torch.float32}).to(dev).eval()
    ours = ours.to(dev)
    attn = ref.config._attn_implementation
    ids = torch.randint(0, 51200, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    long_ids = torch.randint(0, 51200, (1, args.prefill), generator=torch.Generator().manual_seed(2)).to(dev)

    runs = {"ours": (ours, ours.layers[0], functools.partial(greedy_ours, decoder=decoder_for(dev))),
            "ref": (ref, ref.model.layers[0], greedy_transformers)}
    if dev.type == "cuda":  # ours decodes through a CUDA graph there (fastpaths.py); also time it without
        runs["ours, eager"] = (ours, ours.layers[0], greedy_ours)
    decode, prefill, tokens = {k: [] for k in runs}, {k: [] for k in runs}, {}
    with torch.no_grad():
        for model, _, greedy in runs.values():  # warm-up: first calls allocate and pick kernels
            greedy(model, ids[:, :8], 4)()
        for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits both
            for k, (model, block, greedy) in runs.items():
                _, tok_s, tokens[k] = timed_generate(greedy(model, ids, n), block, dev, n)
                decode[k].append(tok_s)
                prefill[k].append(args.prefill / median_time(greedy(model, long_ids, 1), dev, 1))
    med = {k: statistics.median(v) for k, v in decode.items()}
    per_token = sum(p.numel() * p.element_size() for name, p in ours.named_parameters() if "embed_tokens" not in name)
    same = sum(a == b for a, b in zip(tokens["ours"], tokens["ref"]))
    return [
        Row(1, f"reference: transformers {transformers.__version__} PhiForCausalLM, attn '{attn}'; "
               f"Phi-2 width, {L} layers, fp32, {torch.get_num_threads()} threads"),
        Row(1, f"decode, batch 1, {args.prompt}-token prompt, {n} new tokens", med["ours"], med["ref"],
            "tok/s", ">= 1.2x", med["ours"] >= 1.2 * med["ref"]),
        Row(1, f"prefill {args.prefill} tokens (generate to the first token)", statistics.median(prefill["ours"]),
            statistics.median(prefill["ref"]), "tok/s"),
    ] + ([
        Row(1, "decode: ours with vs without the CUDA graph (GraphedDecodeStep)", med["ours"], med["ours, eager"],
            "tok/s"),
        Row(1, "decode: ours without the CUDA graph vs transformers", med["ours, eager"], med["ref"], "tok/s"),
    ] if "ours, eager" in med else []) + [
        Row(1, f"decode vs bandwidth bound ({per_token / GB:.2f} GB read per token)", med["ours"],
            bw / per_token, "tok/s"),
        Row(1, "greedy tokens identical to the reference's", f"{same}/{n}", passed=None),
    ]


# -----------------------------------------------------------------------------
# 2. int8 decoding against fp32, bf16 and torch's own int8


def int8_copy(model):
    """model's Linear layers as Int8Linear, packed as the chat packs them (cli.pack_where_it_pays)."""
    model = copy.deepcopy(model)
    int8.int8_linears(model)
    return pack_where_it_pays(model, "many")


def torch_ao_int8(model):
    """torch's built-in dynamic int8 (fbgemm/x86 kernels, per-channel weights like ours), or None."""
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return None
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    except (ImportError, RuntimeError, AttributeError):
        return None


def decode_bytes(model):
    """Weight bytes one decode step reads: all of them but the embedding table (one row of it)."""
    embed = sum(t.numel() * t.element_size() for t in model.embed_tokens.parameters())
    if any(isinstance(m, int8.Int8Linear) for m in model.modules()):
        return int8.weight_bytes(model) - embed
    return state_bytes(model) - embed  # torch.ao's packed weights are in the state dict only


def section_int8(args, bw):
    dev, L = args.device, args.layers
    n = min(args.new_tokens, 32)  # bf16 decodes slowly on CPUs without bf16 units: keep the section short
    torch.manual_seed(0)
    fp32 = Phi2(Phi2Config.phi2(num_hidden_layers=L)).to(dev).eval()
    variants = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
                "int8": int8_copy(fp32)}
    if dev.type == "cpu":
        ao = torch_ao_int8(copy.deepcopy(fp32))
        if ao is not None:
            variants["torch.ao int8"] = ao
    ids = torch.randint(0, 51200, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    # logits are compared on a 12-token prompt: on a GPU that is under Int8Linear's 16-row threshold,
    # so every variant runs the kernels that decoding runs
    short = ids[:, :12]
    decode, first, logits = {k: [] for k in variants}, {k: [] for k in variants}, {}
    with torch.no_grad():
        for k, m in variants.items():
            greedy_ours(m, ids[:, :8], 4)()  # warm-up
            logits[k] = m(short)[0].float()  # (12, vocab)
        for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits every variant
            for k, m in variants.items():
                t_first, tok_s, _ = timed_generate(greedy_ours(m, ids, n), m.layers[0], dev, n)
                decode[k].append(tok_s)
                first[k].append(t_first)
    tok_s = {k: statistics.median(v) for k, v in decode.items()}
    t_first = {k: statistics.median(v) for k, v in first.items()}
    size = {k: int8.weight_bytes(m) / 1e6 if k == "int8" else state_bytes(m) / 1e6 for k, m in variants.items()}
    gb_s = {k: decode_bytes(m) * tok_s[k] / GB for k, m in variants.items()}  # achieved read bandwidth
    ref = logits["fp32"]
    err = {k: ((v - ref).norm() / ref.norm()).item() for k, v in logits.items()}
    agree = {k: (v.argmax(-1) == ref.argmax(-1)).float().mean().item() for k, v in logits.items()}
    has_ao = "torch.ao int8" in variants
    kernel = int8.CPU_KERNEL if dev.type == "cpu" else "torch._int_mm / dequantized"
    rows = [
        Row(2, f"Phi-2 width, {L} layers, {dev.type}, {torch.get_num_threads()} threads; decode of {n} tokens "
               f"after a {args.prompt}-token prompt; Int8Linear's kernel: {kernel}" +
               ("" if has_ao or dev.type != "cpu" else "; torch.ao int8 unavailable here")),
        Row(2, f"decode: int8 (Int8Linear, {gb_s['int8']:.1f} GB/s) vs fp32 ({gb_s['fp32']:.1f} GB/s)",
            tok_s["int8"], tok_s["fp32"], "tok/s", ">= 1.5x", tok_s["int8"] >= 1.5 * tok_s["fp32"]),
        Row(2, f"decode: bf16 ({gb_s['bf16']:.1f} GB/s) vs fp32", tok_s["bf16"], tok_s["fp32"], "tok/s"),
    ]
    if has_ao:
        rows += [Row(2, f"decode: torch.ao dynamic int8 ({gb_s['torch.ao int8']:.1f} GB/s) vs fp32",
                     tok_s["torch.ao int8"], tok_s["fp32"], "tok/s"),
                 Row(2, "decode: int8 (Int8Linear) vs torch.ao int8 (its error is the row to compare: 1.1x retired, "
                        "issue 31)", tok_s["int8"], tok_s["torch.ao int8"], "tok/s")]
    bw = higher_bandwidth(bw, args)
    rows += [Row(2, f"decode: int8 vs the bandwidth bound ({decode_bytes(variants['int8']) / GB:.3f} GB read per token "
                    f"at {bw / GB:.1f} GB/s)", tok_s["int8"], bw / decode_bytes(variants["int8"]), "tok/s")]
    rows += [Row(2, f"time to first token ({args.prompt}-token prompt): int8 vs fp32", t_first["int8"],
                 t_first["fp32"], "s", "<= 1x", t_first["int8"] <= t_first["fp32"])]
    if has_ao:
        rows += [Row(2, "time to first token: torch.ao int8 vs fp32", t_first["torch.ao int8"], t_first["fp32"], "s")]
    rows += [Row(2, f"weights: {k} vs fp32", size[k], size["fp32"], "MB") for k in variants if k != "fp32"]
    rows += [Row(2, f"logit error |l - l_fp32| / |l_fp32|: {k}", err[k], None, "",
                 *(("<= 0.025", err[k] <= 0.025) if k == "int8" else ()))
             for k in variants if k != "fp32"]
    rows += [Row(2, f"top-1 token agreement with fp32: {k}", agree[k], None, "",
                 *((">= 0.9", agree[k] >= 0.9) if k == "int8" else ()))
             for k in variants if k != "fp32"]
    return rows


# -----------------------------------------------------------------------------
# Random models at the paper's sizes, built in their final dtype


def random_model(config, dtype, device, quantized=False, pack=True):
    """TinyGPTV with random weights, made in `dtype` directly. The modules are first built on the
    meta device (shapes only, no memory); then each module's tensors are allocated and filled in
    turn, so no float32 copy of the whole model ever exists. With `quantized`, Phi-2's Linear layers are
    turned into Int8Linear while still on meta, so the int8 weights are the only copy allocated, packed as
    the chat packs them unless not `pack` (one command's answer). Every model is readied to answer as a
    command readies it (cli.ready_to_answer)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the meta tensors take this dtype, so to_empty allocates it
    try:
        with torch.device("meta"):
            model = tg.TinyGPTV(config)
            if quantized:  # not named int8: that is the module
                int8.quantize_int8(model)
    finally:
        torch.set_default_dtype(default)
    fill_like_trained(model, torch.Generator(device).manual_seed(0), device)
    # ready as a command readies its model to answer: the tower's inference attention, Phi-2 packed as the
    # chat and the server pack it (sections 3, 8) or used as stored, the allocator set for answering
    return ready_to_answer(model, device, "many" if quantized and pack else "none")


def fill_like_trained(model, gen, device):
    """Give a model random weights at a trained model's scale, module by module, each module's tensors
    allocated afresh (to_empty): a model built on the meta device never exists in full at another dtype."""
    for prefix, module in model.named_modules():
        module.to_empty(device=device, recurse=False)
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            with torch.no_grad():
                if t.dtype == torch.int8:  # Int8Linear weights, standing for N(0, 0.02) ones
                    t.copy_(torch.randint(-127, 128, t.shape, generator=gen, device=device))
                elif name == "weight_scale":
                    t.fill_(0.02 * 3.5 / 127)  # the largest of 2560 N(0, 0.02) values is about 3.5 sigma
                elif t.dim() >= 2:
                    t.normal_(0.0, 0.02, generator=gen)  # matrices, embeddings, query tokens, positions
                else:
                    t.fill_(1.0 if name == "weight" else 0.0)  # norms start at 1; biases at 0
    return model


def prompt_example(llm, n_before=6, n_after=20, n_answer=0, seed=0):
    """Random token ids shaped like a stage-4 prompt: BOS + "[INST] <Img>", then (the image goes
    here) "</Img> [vqa] ... [/INST]", then the answer. llm: the Phi2Config (vocabulary, BOS id)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(0, llm.vocab_size, (k,), generator=g).tolist()
    return tg.Example([llm.bos_token_id] + ids(n_before - 1), ids(n_after), ids(n_answer))


def run_child(args, job, **spec):
    """Run one measurement in a fresh python process and return its result dict."""
    spec = dict(job=job, device=str(args.device), threads=args.threads, preset=args.preset, **spec)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"{job} {spec.get('dtype', '')}: exit {proc.returncode}: {tail[0]}"}


def preset_config(name):
    return tg.TinyGPTVConfig.full() if name == "full" else tg.TinyGPTVConfig.tiny()


# -----------------------------------------------------------------------------
# 3. Inference of the whole model at the paper's sizes


def child_inference(spec, device):
    """One image, `new_tokens` greedy tokens, the model in int8 (Phi-2) + bf16 (the rest), or all bf16."""
    config = preset_config(spec["preset"])
    int8.CPU_KERNEL = spec.get("kernel", int8.CPU_KERNEL)  # (section 3's comparison of CPU kernels)
    model = random_model(config, torch.bfloat16, device, quantized=spec["dtype"] == "int8", pack=spec.get("pack", True))
    size = config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    example = prompt_example(config.llm)

    def answer(n):  # TinyGPTV.generate without the tokenizer: image -> queries -> splice -> Phi-2
        return model.generate_ids(pixels, [example], n, stop_sequences=[])

    with torch.no_grad():  # no warm-up run: at this size one-time costs are small next to a prefill
        t_first, tok_s, _ = timed_generate(lambda: answer(spec["new_tokens"]), model.llama_model.layers[0], device,
                                            spec["new_tokens"])
    llm = model.llama_model
    # a decode step reads every weight of Phi-2 once, except the embedding table (one row of it)
    per_token = int8.weight_bytes(llm) - int8.weight_bytes(llm.embed_tokens)
    return dict(peak=peak_memory(device), weights=int8.weight_bytes(model), per_token=per_token,
                first_token_s=t_first, s_per_token=1 / tok_s)


def section_inference(args, bw):
    runs = {dtype: run_child(args, "infer", dtype=dtype, new_tokens=args.full_new_tokens) for dtype in ("int8", "bf16")}
    first, bw = bw, higher_bandwidth(bw, args)
    rows = [Row(3, f"{args.preset} preset, random weights, {args.device.type}, one {preset_config(args.preset).vision.image_size}"
                   f" px image, {args.full_new_tokens} new tokens; bandwidth {first / GB:.1f} GB/s before, "
                   f"{bw / GB:.1f} for the bound")]
    for dtype, label in (("int8", "int8 Phi-2 + bf16 vision"), ("bf16", "bf16")):
        r = runs[dtype]
        if "error" in r:
            rows.append(Row(3, f"{label}: failed: {r['error']}", passed=False))
            continue
        bound = r["per_token"] / bw
        rows += [
            Row(3, f"{label}: peak memory (weights {r['weights'] / GB:.2f} GB)", r["peak"] / GB, 8.0, "GB",
                "< 8 GB" if dtype == "int8" else "", r["peak"] < 8 * GB if dtype == "int8" else None),
            Row(3, f"{label}: time per token vs bandwidth bound ({r['per_token'] / GB:.2f} GB/token, "
                   f"{r['per_token'] / r['s_per_token'] / GB:.1f} GB/s)",
                r["s_per_token"], bound, "s", "<= 1.5x" if dtype == "int8" else "",
                r["s_per_token"] <= 1.5 * bound if dtype == "int8" else None),
            Row(3, f"{label}: time to first token (vision tower + prefill)", r["first_token_s"], None, "s"),
        ]
    # This CPU's kernel, packed (as the chat runs), against fbgemm's where that is another (int8.py), and
    # against the weights as stored (one command's answer, cli.pack_where_it_pays): three runs of each,
    # alternated, as this machine's speed drifts between runs
    if args.device.type == "cpu" and "error" not in runs["int8"] and int8.CPU_KERNEL in int8.PACKING:
        ours = f"{int8.CPU_KERNEL}, packed"
        others = {"as stored": dict(kernel=int8.CPU_KERNEL, pack=False)}
        if int8.CPU_KERNEL != "fbgemm":
            others["fbgemm, packed"] = dict(kernel="fbgemm")
        times = {ours: [runs["int8"]["s_per_token"]], **{k: [] for k in others}}
        for name in [*others, ours] * 2 + [*others]:
            spec = others.get(name, dict(kernel=int8.CPU_KERNEL))
            r = run_child(args, "infer", dtype="int8", new_tokens=args.full_new_tokens, **spec)
            if "error" not in r:
                times[name].append(r["s_per_token"])
        for name in others:
            if times[name]:
                rows.append(Row(3, f"int8 Phi-2: time per token, {ours} vs {name} (medians of {len(times[ours])} and "
                                   f"{len(times[name])} runs, alternated)", statistics.median(times[ours]),
                                statistics.median(times[name]), "s"))
    return rows


# -----------------------------------------------------------------------------
# 4. Training memory at the paper's sizes


def child_train(spec, device):
    """train.py's own step, not a copy of it: `train.run` for one step of stage spec["stage"] on the
    downloads section 6 writes, in this fresh process, so its peak is the step's and the loading's."""
    d, stage, batch = spec["dir"], spec["stage"], spec["batch"]
    out = os.path.join(d, f"run-{stage}-{'on' if spec['checkpointing'] else 'off'}")
    os.makedirs(out)
    shutil.copy(os.path.join(d, f"stage{stage - 1}.safetensors"), out)  # the stage it starts from
    rows = [{"image": "red.png", "caption": " ".join(["red"] * spec["answer_tokens"])}] * batch
    with open(os.path.join(d, f"captions-{stage}.json"), "w") as f:
        json.dump(rows, f)
    args = train.parse_args(["--phi2", os.path.join(d, "phi-2"), "--blip2", os.path.join(d, "blip2"), "--out", out,
                             "--stage", str(stage), "--steps", "1", "--batch-size", str(batch), "--no-eval",
                             "--device", str(device), "--data", os.path.join(d, f"captions-{stage}.json"),
                             "--workers", "0", "--grad-checkpoint", "on" if spec["checkpointing"] else "off"])
    t0 = now(device)
    train.run(args)
    return dict(peak=peak_memory(device), seconds=now(device) - t0,
                dtype=str(fastpaths.compute_dtype(str(device), "auto", real=True)).removeprefix("torch."))


def bf16_backward_rate(device):
    """FLOP/s of grad_input = grad_output @ W in bf16: what a frozen bf16 Linear's backward runs."""
    g = torch.randn(90, 10240, dtype=torch.bfloat16, device=device)
    w = torch.randn(10240, 2560, dtype=torch.bfloat16, device=device)
    return 2 * g.shape[0] * w.shape[0] * w.shape[1] / median_time(lambda: g @ w, device, 1)


def section_training(args, bw):
    cpu_bf16 = args.device.type == "cpu" and fastpaths.CPU_BF16_MATMUL
    if args.device.type == "cpu" and not (cpu_bf16 or args.cpu_train):
        # without fast bf16 the frozen weights stay fp32 (train.py's plan), and a bf16 backward is slow
        rate = bf16_backward_rate(args.device)
        return [Row(4, f"skipped on this CPU: it has no fast bf16 matrix products ({rate / 1e9:.1f} GFLOP/s for a "
                       f"frozen bf16 Linear's backward); measure on a GPU or a CPU with AVX-512 bf16, or --cpu-train")]
    if not hasattr(os, "wait4") and args.device.type == "cpu":
        return [Row(4, "skipped: the peak resident memory of a child needs Linux")]
    jobs = [dict(stage=2, batch=1, answer_tokens=32, checkpointing=False)]
    if args.device.type == "cuda" or args.stage4:
        # the official stage 4: 448 px, up to 1024 text tokens, 1-3 samples a batch; where users ran out
        # of 24 GB (docs/PAPER.md section 10); train.py checkpoints its activations by default
        both = (True, False) if args.device.type == "cuda" else (True,)  # (on a CPU the one that fits 24 GB)
        jobs += [dict(stage=4, batch=3, answer_tokens=args.stage4_tokens, checkpointing=c) for c in both]
    where = "torch.cuda.max_memory_allocated" if args.device.type == "cuda" else "peak resident memory (VmHWM)"
    rows = [Row(4, f"train.py's own step (train.run, one step) on {args.preset}-size random downloads in their released "
                   f"layouts, {args.device.type}{' with fast bf16' if cpu_bf16 else ''}: frozen weights in the "
                   f"device's compute dtype, trained ones and AdamW state fp32; {where}, loading included")]
    targets = {2: 12.0, 4: 24.0}
    with tempfile.TemporaryDirectory(dir=args.scratch) as d:  # removed afterwards, whatever happens
        r = run_child(args, "write", dir=d)
        if "error" in r:
            return rows + [Row(4, f"writing the downloads failed: {r['error']}", passed=False)]
        for job in jobs:
            r = run_child(args, "train", dir=d, **job)
            label = (f"stage {job['stage']} step, batch {job['batch']}, {job['answer_tokens']} answer tokens"
                     + (", activation checkpointing" if job["checkpointing"] else ""))
            if "error" in r:
                rows.append(Row(4, f"{label}: failed: {r['error']}", passed=False))
                continue
            limit = targets[job["stage"]]
            rows.append(Row(4, f"{label} (frozen weights {r['dtype']}, {r['seconds']:.0f} s)", r["peak"] / GB, limit,
                            "GB", f"<= {limit:.0f} GB" if job["checkpointing"] or job["stage"] == 2 else "",
                            r["peak"] <= limit * GB if job["checkpointing"] or job["stage"] == 2 else None))
    return rows


# -----------------------------------------------------------------------------
# 5. Demo training throughput per stage (tiny preset)

# synthetic prompt and answer lengths per stage, in tokens: roughly the demo's
STAGE_LENGTHS = {1: (3, 2, 12), 2: (3, 2, 12), 3: (6, 16, 40), 4: (5, 16, 12)}  # before, after, answer


def section_demo_training(args, bw):
    dev = args.device
    rows = [Row(5, f"tiny preset, {dev.type}, demo batch sizes, {args.train_steps} steps each; ours: Q-Former outputs "
                   "cached (train.py on the demo), baseline: the frozen vision tower run every step")]
    for stage in (1, 2, 3, 4):
        torch.manual_seed(stage)
        model = tg.TinyGPTV(tg.TinyGPTVConfig.tiny()).to(dev)
        if stage >= 2:
            model.add_lora()
        for name, p in model.named_parameters():
            p.requires_grad_(tg.is_trainable(name))
        model.train()
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
        B, size = DEMO_STAGES[stage].batch_size, model.image_size(stage)
        before, after, answer = STAGE_LENGTHS[stage]
        examples = [prompt_example(model.config.llm, before, after, answer, seed=i) for i in range(B)]
        pixels = torch.randn(B, 3, size, size, device=dev)
        with torch.no_grad():
            queries = model.encode_queries(pixels)

        def step(cached):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(examples, queries=queries) if cached else model(examples, pixel_values=pixels)
                loss = tg.lm_loss(*out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        speed = {}
        for cached in (True, False):
            step(cached)  # warm-up
            speed[cached] = B / median_time(lambda: step(cached), dev, args.train_steps)
        rows.append(Row(5, f"stage {stage}: batch {B}, {size} px, {before + after + answer} text tokens",
                        speed[True], speed[False], "samples/s"))
    return rows


# -----------------------------------------------------------------------------
# 6. From the real downloads: tinygptv.py --int8 on full-size checkpoints in their released layouts


def random_tensor(shape, dtype, gen, name=""):
    """Weights like a trained model's scale: matrices N(0, 0.02), norm weights 1, biases 0."""
    if len(shape) >= 2:
        return torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(dtype)
    return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)


def write_phi2(directory, llm, gen, shards=2):
    """Phi-2 as microsoft/phi-2 ships it: fp16 in `shards` safetensors files with
    model.safetensors.index.json, config.json (transformers' PhiConfig) and tokenizer.json; q, k, v
    apart, under transformers' names. Without the stabilizers, which the release has not."""
    from safetensors.torch import save_file
    config = replace(llm, qk_layernorm=False, post_layernorm=False)
    with torch.device("meta"):
        names = [(k, tuple(p.shape)) for k, p in Phi2(config).state_dict().items()]
    keys = []  # (checkpoint key, shape), in the model's order
    for name, shape in names:
        key = name if name.startswith("lm_head.") else "model." + name
        if "query_key_value" in name:
            keys += [(key.replace("query_key_value", proj), (shape[0] // 3, *shape[1:])) for proj in ("q_proj", "k_proj", "v_proj")]
        else:
            keys.append((key, shape))
    total = sum(math.prod(shape) * 2 for _, shape in keys)
    os.makedirs(directory, exist_ok=True)
    weight_map, start = {}, 0
    for i in range(shards):  # each shard's tensors are made, written and freed before the next
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part, size = {}, 0
        while start < len(keys) and (size < total / shards or i == shards - 1):
            key, shape = keys[start]
            part[key] = random_tensor(shape, torch.float16, gen, key)
            size, start = size + part[key].numel() * 2, start + 1
            weight_map[key] = file
        save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        del part
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(asdict(config), architectures=["PhiForCausalLM"], model_type="phi",
                       hidden_act="gelu_new", num_key_value_heads=config.num_attention_heads,
                       tie_word_embeddings=False, torch_dtype="float16"), f)
    word_tokenizer(config.vocab_size).save(os.path.join(directory, "tokenizer.json"))
    return total


def write_blip2(directory, config, gen):
    """The vision side as a transformers BLIP-2 directory: config.json (vision_config, qformer_config,
    num_query_tokens) and model.safetensors in fp16 with vision_model.*, qformer.* and query_tokens.
    (The released Blip2ForConditionalGeneration also holds an OPT language model, which TinyGPT-V
    does not read: it is left out, so the files are the 2.1 GB that are read.)"""
    import qformer
    import vit
    from safetensors.torch import save_file
    with torch.device("meta"):
        vision, bridge = vit.VisionTransformer(config.vision), qformer.QFormer(config.qformer)
    tensors = {}
    for name, p in vision.state_dict().items():
        if name.endswith(".attn.q_bias"):  # transformers keeps one qkv bias, (3D,): q, k (zero), v
            key = vit.transformers_key(name.removesuffix(".q_bias") + ".qkv.bias")
            tensors["vision_model." + key] = torch.zeros(3 * p.shape[0], dtype=torch.float16)
        elif not name.endswith(".attn.v_bias"):
            tensors["vision_model." + vit.transformers_key(name)] = random_tensor(p.shape, torch.float16, gen, name)
    for name, p in bridge.state_dict().items():
        tensors[qformer.transformers_key(name)] = random_tensor(p.shape, torch.float16, gen, name)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(model_type="blip-2", num_query_tokens=config.qformer.num_query_tokens,
                       vision_config=dict(asdict(config.vision), hidden_act="gelu", qkv_bias=True),
                       qformer_config=dict(asdict(config.qformer), hidden_act="gelu")), f)
    return sum(t.numel() * 2 for t in tensors.values())


def child_write_downloads(spec, device):
    """Write the downloads into spec["dir"], and a stage-4 checkpoint of ours (random projections,
    non-zero LoRA) that the command line needs beside them. Run in a child: the writer holds a
    shard at a time, and none of that should count in the parent."""
    config, d = preset_config(spec["preset"]), spec["dir"]
    gen = torch.Generator().manual_seed(0)
    sizes = dict(phi2=write_phi2(os.path.join(d, "phi-2"), config.llm, gen),
                 blip2=write_blip2(os.path.join(d, "blip2"), config, gen))
    for stage in (1, 3, 4):  # what section 4's steps start from, and section 6's answer
        with torch.device("meta"):
            shell = tg.TinyGPTV(config)
            if stage >= 2:
                shell.add_lora()
        for name, p in list(shell.named_parameters()):  # only what a stage checkpoint holds becomes real
            if tg.is_trainable(name):
                module, _, leaf = name.rpartition(".")
                t = random_tensor(p.shape, torch.float32, gen, name)
                if leaf == "lora_A" or leaf == "lora_B":
                    t = torch.empty(p.shape).normal_(0.0, 0.01, generator=gen)  # a trained adapter, not a fresh one
                setattr(shell.get_submodule(module), leaf, nn.Parameter(t))
        tg.save_checkpoint(shell, os.path.join(d, f"stage{stage}.safetensors"), stage=stage)
    Image.new("RGB", (320, 240), (200, 20, 20)).save(os.path.join(d, "red.png"))
    return sizes


# Linux charges a process's ru_maxrss with the resident set it had when it called exec, so a
# command started straight from this process would count what this process holds at the time (by
# section 6, GBs of earlier sections' freed but unreturned memory; measured: `python -c pass` from a
# parent holding a 4 GB tensor peaked at 4.5 GB). A bare Python in between, which imports nothing
# large, starts the command and reports the command's own peak from os.wait4.
LAUNCHER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:])\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print('PEAK', usage.ru_maxrss, os.waitstatus_to_exitcode(status))")


def peak_rss_of(cmd, threads):
    """Run cmd to its end; -> (exit status, its peak resident set in bytes, seconds, its output)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # torch's thread count in the command
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=out, stderr=subprocess.STDOUT, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
        seconds = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    text, _, peak = text.rpartition("PEAK ")  # the launcher's line comes last
    maxrss, code = peak.split()
    return int(code), int(maxrss) * (1 if sys.platform == "darwin" else 1024), seconds, text


def section_downloads(args, bw):
    if not hasattr(os, "wait4"):
        return [Row(6, "skipped: measuring one child's peak memory needs os.wait4 (Linux, macOS)")]
    rows = [Row(6, f"{args.preset} preset, random fp16 weights written in the released layouts (Phi-2: two "
                   f"shards + index; BLIP-2: config.json + safetensors), then `tinygptv.py --int8` from start to "
                   f"answer, {args.threads} threads")]
    with tempfile.TemporaryDirectory(dir=args.scratch) as d:  # removed afterwards, whatever happens
        r = run_child(args, "write", dir=d)
        if "error" in r:
            return rows + [Row(6, f"writing the downloads failed: {r['error']}", passed=False)]
        script = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinygptv.py")]
        weights = ["--phi2", os.path.join(d, "phi-2"), "--blip2", os.path.join(d, "blip2"),
                   "--checkpoint", os.path.join(d, "stage4.safetensors")]
        question = ["--image", os.path.join(d, "red.png"), "--prompt", "[vqa] what color is it", "--max-new-tokens", "8"]
        code, peak, seconds, text = peak_rss_of(script + weights + ["--int8"] + question, args.threads)
        # quantized once (issue 31), then the same question from that file
        quantized = os.path.join(d, "model.safetensors")
        q_code, q_peak, q_seconds, q_text = peak_rss_of(script + ["quantize", quantized] + weights, args.threads)
        m_code, m_peak, m_seconds, m_text = peak_rss_of(script + ["--model", quantized] + question, args.threads) \
            if q_code == 0 else (q_code, 0, 0, q_text)
    files = (r["phi2"] + r["blip2"]) / GB
    if code != 0:
        return rows + [Row(6, f"tinygptv.py --int8 failed (exit {code}): {text.strip().splitlines()[-1:]}", passed=False)]
    if m_code != 0:
        rows.append(Row(6, f"quantize / --model failed (exit {m_code}): {m_text.strip().splitlines()[-1:]}", passed=False))
    else:
        same = m_text.strip().splitlines()[-1:] == text.strip().splitlines()[-1:]
        rows += [Row(6, f"`tinygptv.py quantize` from the same downloads, once: seconds (peak {q_peak / GB:.2f} GB)",
                     q_seconds, None, "s"),
                 Row(6, "`tinygptv.py --model` the quantized file, start to answer, against --int8 from the downloads "
                        f"(the same answer: {same})", m_seconds, seconds, "s", "<= 0.25x", m_seconds <= 0.25 * seconds and same),
                 Row(6, "`tinygptv.py --model`: peak resident memory", m_peak / GB, 5.0, "GB", "<= 5 GB", m_peak <= 5 * GB)]
    return rows + [
        Row(6, f"tinygptv.py --int8 from the downloads ({r['phi2'] / GB:.1f} + {r['blip2'] / GB:.1f} GB of fp16 "
               f"files), loading included: peak resident memory ({seconds:.0f} s)", peak / GB, 8.0, "GB", "< 8 GB",
            peak < 8 * GB),
        Row(6, "the same peak against the files' size", peak / GB, files, "GB"),
    ]


# -----------------------------------------------------------------------------
# 7. The streaming loader (train.py on a user's data): pictures decoded in worker processes


def write_jpeg_shards(directory, size, n_shards=2, per_shard=480):
    """webdataset shards of photo-like JPEGs (smooth colour fields with noise) at `size` px, written here."""
    import io
    import tarfile
    g = np.random.default_rng(size)
    for i in range(n_shards):
        with tarfile.open(os.path.join(directory, f"{size}-{i:05d}.tar"), "w") as tf:
            for j in range(per_shard):
                yy, xx = np.mgrid[0:size, 0:size] / size
                base = np.stack([yy, xx, (yy + xx) / 2], -1) * g.uniform(100, 255, 3)
                pixels = np.clip(base + g.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                for name, payload in ((f"{j:06d}.jpg", buf.getvalue()), (f"{j:06d}.txt", b"a picture")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return os.path.join(directory, f"{size}-{{00000..{n_shards - 1:05d}}}.tar")


def section_loader(args, bw):
    """Pictures per second through loader.stream with 0, 1 and 2 workers (decoding and resizing the
    JPEGs to the stage's size), and, with 2 workers, the share of each step the training process
    waits for data when a step takes longer than decoding its batch and leaves the CPU to the
    workers, as a step on a GPU does (a sleep stands in for it)."""
    rows = [Row(7, f"batches of 16 from webdataset shards of JPEGs written here; {torch.get_num_threads()} torch "
                   "threads in the training process")]
    bs = 16
    with tempfile.TemporaryDirectory(dir=args.scratch) as d:
        for size in (224, 448):
            samples = data.load_dataset(write_jpeg_shards(d, size))
            steps = len(samples) // bs
            order = lambda step: train.batch_indices(step, len(samples), bs, 0)
            rate = {}
            for workers in (0, 1, 2):
                batches = iter(loader.stream(samples, size, order, 0, steps, workers=workers))
                next(batches)  # the workers' start, once per stage, is not their rate
                t0 = time.perf_counter()
                n = sum(len(idx) for idx, _, _ in batches)
                rate[workers] = n / (time.perf_counter() - t0)
            for workers in (1, 2):
                rows.append(Row(7, f"{size} px: images/s with {workers} worker(s) vs 0 (decoding in the training "
                                   "process)", rate[workers], rate[0], "img/s",
                                target="2 workers about 2x 0" if workers == 2 else ""))
            step_s = 1.5 * bs / rate[0]  # a step 1.5x longer than decoding its batch in one process
            batches = iter(loader.stream(samples, size, order, 0, steps, workers=2))
            next(batches)  # the first batch waits for the workers to start: once per stage
            waited, t0 = 0.0, time.perf_counter()
            for _ in range(steps - 1):
                t = time.perf_counter()
                next(batches)
                waited += time.perf_counter() - t
                time.sleep(step_s)  # a GPU's step: the CPU left to the workers
            share = waited / (time.perf_counter() - t0)
            rows.append(Row(7, f"{size} px, 2 workers: share of a {step_s * 1000:.0f} ms step spent waiting for data "
                               "(after the first batch)", 100 * share, None, "%", target="under 10%", passed=share < 0.1))
    # What a worker's batch costs beyond decoding: it is written into new shared memory, whose pages
    # the kernel must supply (and the training process map again), while a batch stacked in the
    # training process lands in memory malloc reuses.
    n = 64 << 20
    t0 = time.perf_counter()
    torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n)).fill_(1)
    fresh = (time.perf_counter() - t0) / (n / 4096)
    reused = torch.empty(n, dtype=torch.uint8)
    reused.fill_(1)
    t0 = time.perf_counter()
    reused.fill_(2)
    again = (time.perf_counter() - t0) / (n / 4096)
    pages = bs * 3 * 448 * 448 / 4096
    rows.append(Row(7, f"a new shared-memory page costs {fresh * 1e6:.2f} us (a reused one {again * 1e6:.2f} us): "
                       f"{pages * fresh * 1e3:.1f} ms of a worker's 448-px batch of {bs}", fresh * 1e6, again * 1e6, "us"))
    return rows


# -----------------------------------------------------------------------------
# 8. The chat (chat.py, server.py): what a follow-up question costs, and the web page's overhead


def word_tokenizer(vocab_size):
    """A tokenizer that names every id of a random model (w0, w1, ...), so each token streams as text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = [tg.BOS, "[UNK]"] + [f"w{i}" for i in range(vocab_size - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return tok


def first_piece(start):
    """Seconds from start() -> an iterator of answer pieces, to its first piece."""
    t0 = time.perf_counter()
    next(iter(start()))
    return time.perf_counter() - t0


def child_chat(spec, device):
    """In one process: the time to the first streamed token of a first question (the picture encoded,
    the whole prompt run) and of a follow-up about the same picture (its own tokens only), through
    chat.Chat; then a fresh conversation's first token through the web page's API against chat.Chat
    called directly, the same question on the same model, alternately, medians of 3 (of 4 for these)."""
    import http.client
    import threading
    import chat
    import server
    if spec["model"] == "demo":
        model, tok, stage = demo.load_demo()
    else:
        config = preset_config(spec["preset"])
        model, tok, stage = random_model(config, torch.bfloat16, device, quantized=True), \
            word_tokenizer(config.llm.vocab_size), 4
    image = Image.new("RGB", (320, 240), (200, 20, 20))
    c = chat.Chat(model, tok, stage, max_new_tokens=8)
    question, follow_up = "[vqa] what color is the square?", "[vqa] what shape is it?"
    instruction, follow_instruction = parse_user_prompt(question), parse_user_prompt(follow_up)  # as chat.py's loop
    first, later = [], []
    for _ in range(3):
        first.append(first_piece(lambda: (c.set_image(image), c.ask(instruction))[1]))
        list(c.ask(instruction))  # (the rest of the answer)
        later.append(first_piece(lambda: c.ask(follow_instruction)))
    buf = io.BytesIO()
    image.save(buf, "PNG")

    def web(port):
        """A new conversation's first token through the page's API (its picture encoded before)."""
        def post(path, body):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("POST", path, body=body)
            return conn.getresponse()

        def ask():
            post("/api/restart?v=bench", b"").read()
            t0 = time.perf_counter()
            reply = post("/api/ask?v=bench", json.dumps({"question": question}).encode())
            while b'"text"' not in reply.readline():
                pass
            seconds = time.perf_counter() - t0
            reply.read()
            return seconds
        post("/api/image?v=bench", buf.getvalue()).read()
        ask()  # the picture is encoded on the visitor's first question; the memory that freed is cold
        ask()  # (as for the command line, whose previous question ran the model just before)
        return ask()

    def served():  # server.serve as `chat.py --serve` runs it: the model on this (main) thread, a visitor on another
        out = {}
        client = lambda srv: threading.Thread(target=lambda: (out.update(s=web(srv.server_port)), srv.shutdown()),
                                              daemon=True).start()
        server.serve(c, "127.0.0.1", 0, ready=client)
        return out["s"]
    web_s, cli_s = [], []
    for i in range(4):  # each goes first in half the rounds: what runs second finds the first's memory warm
        for way in ("web", "cli") if i % 2 == 0 else ("cli", "web"):
            if way == "web":
                web_s.append(served())
            else:
                c.restart()
                cli_s.append(first_piece(lambda: c.ask(instruction)))
    med = statistics.median
    return dict(first=med(first), later=med(later), web=med(web_s), cli=med(cli_s), stage=stage,
                size=model.image_size(stage))


def section_chat(args, bw):
    rows = [Row(8, "chat.Chat, greedy, time to the first streamed token (medians of 3); the page through "
                   "server.py's API against chat.Chat called directly, same process, same question")]
    models = [("demo", "the demo's model"), ("full", f"{args.preset} preset, random weights, int8 Phi-2 + bf16 vision")]
    for name, label in models:
        if name == "demo" and not os.path.isfile(os.path.join(demo.DEMO_RUN, "stage4.safetensors")):
            rows.append(Row(8, f"{label}: skipped: train it first (python train.py)"))
            continue
        r = run_child(args, "chat", model=name)
        if "error" in r:
            rows.append(Row(8, f"{label}: failed: {r['error']}", passed=False))
            continue
        rows += [Row(8, f"{label}, stage {r['stage']} ({r['size']} px): a follow-up question vs the first one "
                        "(picture encoded, whole prompt)", r["later"], r["first"], "s"),
                 Row(8, f"{label}: a new conversation's first token, the web page vs the command line", r["web"],
                     r["cli"], "s", "within 10%", r["web"] <= 1.1 * r["cli"])]
    return rows


# -----------------------------------------------------------------------------
# 9. The vision tower against this machine's compute bound (issue 31)


def vision_macs(config, size):
    """Multiply-adds of one image through the ViT: the patch embedding, then per block qkv, the two
    attention products, the output projection and the MLP, at (size / patch)^2 + 1 tokens."""
    C, F, L, p = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.patch_size
    T = (size // p) ** 2 + 1
    per_block = T * (3 * C * C + C * C + 2 * C * F) + 2 * T * T * C
    return (T - 1) * 3 * p * p * C + L * per_block


def section_vision(args, bw):
    """The vision tower (ViT + ln_vision, random weights, in the dtype --int8 loads it in) at 224 and
    448 px against its multiply-adds over the rate one large matrix product of the same dtype reaches
    here, in the same run; the CPU float32 path where bf16 is not fast (fastpaths.py)."""
    from qformer import QFormer
    from vit import VisionTransformer
    full = preset_config(args.preset)
    config = full.vision
    dtype = torch.bfloat16 if args.device.type == "cuda" or fastpaths.CPU_BF16_MATMUL else torch.float32
    reuse_freed_memory()  # as a command answers once its model is loaded (cli.ready_to_answer): the bound too
    a = torch.randn(2048, config.hidden_size, dtype=dtype, device=args.device)
    w = torch.randn(config.hidden_size, config.intermediate_size, dtype=dtype, device=args.device)
    fastest = min(median_time(lambda: a @ w, args.device, 1) for _ in range(6))  # what the machine reaches
    rate = a.shape[0] * w.shape[0] * w.shape[1] / fastest  # MAC/s
    with torch.device("meta"):  # shapes only: fill_like_trained allocates each module's tensors in `dtype`
        vit, bridge = VisionTransformer(config).to(dtype), QFormer(full.qformer).to(dtype)
    gen = torch.Generator(args.device).manual_seed(0)
    vit, bridge = (fill_like_trained(m, gen, args.device).eval() for m in (vit, bridge))
    rows = [Row(9, f"{args.preset} preset ViT in {str(dtype).removeprefix('torch.')}; one {a.shape[0]}x"
                   f"{w.shape[0]}x{w.shape[1]} product reaches {rate * 2 / 1e12:.2f} TFLOP/s here")]
    seconds = {}
    for label in ("attention written out (vit.py: training)", "inference attention (answering)"):
        if label.startswith("inference"):
            fastpaths.inference_attention(vit)
        for size in (224, 448):
            x = torch.randn(1, 3, size, size, dtype=dtype, device=args.device)
            with torch.no_grad():
                vit(x)  # warm-up: the position embedding's resize, allocator caches
                t = seconds[size] = median_time(lambda: vit(x), args.device, 2)
            bound, last = vision_macs(config, size) / rate, size == 448 and label.startswith("inference")
            rows.append(Row(9, f"vision tower, {label}, one image at {size} px ({vision_macs(config, size) / 1e9:.0f} "
                               "GMAC) vs the compute bound", t, bound, "s", "<= 1.3x at 448" if last else "",
                            t <= 1.3 * bound if last else None))
    # An int8 tower through the int8 path Phi-2 has (Int8Linear: weights per output channel, activations
    # per token): kept only if it is faster and the Q-Former's 32 outputs stay within 1% of the bf16 tower's
    quantized = copy.deepcopy(vit)
    int8.int8_linears(quantized)
    pack_where_it_pays(quantized, "few")  # as one command's answer would run it
    for size in (224, 448):
        x = torch.randn(1, 3, size, size, dtype=dtype, device=args.device)
        with torch.no_grad():
            ref, out = bridge(vit(x)).float(), bridge(quantized(x)).float()
            t = median_time(lambda: quantized(x), args.device, 2)
        error = ((out - ref).norm() / ref.norm()).item()
        keep = t < seconds[size] and error <= 0.01
        rows.append(Row(9, f"int8 vision tower at {size} px against the inference one above: the Q-Former's outputs "
                           f"{100 * error:.2f}% off ({'kept' if keep else 'not kept'}: needs faster and <= 1%)",
                        t, seconds[size], "s"))
    return rows


# -----------------------------------------------------------------------------
# Main

SECTIONS = {1: section_phi2, 2: section_int8, 3: section_inference, 4: section_training, 5: section_demo_training,
            6: section_downloads, 7: section_loader, 8: section_chat,
            9: section_vision}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="1,2,3,4,5,6,7,8,9", help="comma-separated, from 1-9 (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU, the same for every run")
    p.add_argument("--layers", type=int, help="Phi-2 layers in sections 1-2 (real width; default 4)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding (sections 1-2)")
    p.add_argument("--new-tokens", type=int, help="tokens decoded in sections 1-2 (default 64)")
    p.add_argument("--prefill", type=int, help="prompt tokens for the prefill measurement (default 256)")
    p.add_argument("--repeats", type=int, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--preset", choices=("full", "tiny"), default="full", help="model size for sections 3-4")
    p.add_argument("--full-new-tokens", type=int, default=32, help="tokens generated in section 3")
    p.add_argument("--cpu-train", action="store_true", help="run section 4 at full size on the CPU, however slow")
    p.add_argument("--stage4", action="store_true", help="also measure a stage-4 step on the CPU (slow)")
    p.add_argument("--stage4-tokens", type=int, default=1024, help="answer tokens per row in the stage-4 step")
    p.add_argument("--train-steps", type=int, help="timed steps per stage in section 5 (default 5)")
    p.add_argument("--quick", action="store_true", help="2 layers, 16 new tokens, 64-token prefill, 1 repeat")
    p.add_argument("--scratch", default=None, help="where section 6 writes its 7.7 GB of downloads (default: the "
                   "system's temporary directory); removed afterwards")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    a = p.parse_args(argv)
    quick = a.quick
    a.layers = a.layers or (2 if quick else 4)
    a.new_tokens = a.new_tokens or (16 if quick else 64)
    a.prefill = a.prefill or (64 if quick else 256)
    a.repeats = a.repeats or (1 if quick else 3)
    a.bandwidth_gib = 0.25 if quick else 1.0  # the tensor bandwidth() sums
    a.train_steps = a.train_steps or (2 if quick else 5)
    a.sections = sorted({int(s) for s in a.sections.split(",") if s.strip()})
    if not set(a.sections) <= set(SECTIONS):
        p.error(f"--sections takes numbers from 1 to 9, got {a.sections}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no GPU")
    a.device = torch.device(a.device)
    return a


def machine(device):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def child_main(spec):
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    result = {"infer": child_inference, "train": child_train, "write": child_write_downloads,
              "chat": child_chat}[spec["job"]](spec, device)
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    torch.set_num_threads(args.threads)
    header = f"bench.py on {machine(args.device)}; {args.threads} threads; sections {args.sections}"
    print(header, flush=True)
    bw = bandwidth(args.device, args.bandwidth_gib)
    rows = [Row(0, "memory bandwidth (sum of a float32 tensor)", bw / GB, None, "GB/s")]
    for s in args.sections:
        t0 = time.time()
        try:
            rows += SECTIONS[s](args, bw)
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:  # report it, go on with the rest
            rows.append(Row(s, f"section {s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                            passed=False))
        # timings are only as good as the machine is quiet: on a shared machine, check the load
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows.append(Row(s, f"section {s} took {time.time() - t0:.0f} s; load average at its end {load:.1f} "
                           f"({os.cpu_count()} cores)"))
        print(rows[-1].what, flush=True)
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "rows": [dict(vars(r), ratio=r.ratio) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
