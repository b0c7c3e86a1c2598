"""Checkpoint layouts other than transformers', and loading a model from any of them.

A reader of the paper may skip this file: vit.py, qformer.py and phi2.py each load the layout of a
transformers download, and tinygptv.from_pretrained assembles the model from those. This file
reads what else a user (or the demo) has, by handing those loaders a `checkpoints.StrictReader`
that translates names, so loading stays one strict path:

    layout                                   ViT, ln_vision         Q-Former              Phi-2
    transformers download                    vit.py                 qformer.py            phi2.py
    LAVIS .safetensors (`tinygptv.py convert`
      of eva_vit_g.pth and a BLIP-2 .pth)    visual_encoder.*,      Qformer.bert.*,
                                             ln_vision.*            query_tokens
    our own directory (`save_pretrained`:    LAVIS names +          our names +
      the demo's backbones)                  VisionConfig json      QFormerConfig json    transformers'
    legacy fused Phi-2 (transformers 4.36,                                                query_key_value,
      TinyGPT-V's own code)                                                               rows head by head

- `load_vit`, `load_qformer`, `load_phi2`: any layout above, told apart by its files;
- `save_pretrained`: our own directories, which the demo's stage 0 writes;
- `load_model`: TinyGPT-V from any of them, optionally with Phi-2 quantized to int8 while it loads;
- `init_projections`: stage 1's start from MiniGPT-4's released projection.
"""

import json
import math
import os
import re
from dataclasses import asdict, fields

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

import tinygptv as tg
from checkpoints import (StrictReader, check_overrides, config_file, open_safetensors, read_json, regular_file,
                         save_aligned, write_atomically, write_json)
from fastpaths import float32_blocks
from int8 import Int8Linear, quantize_int8
from phi2 import Phi2, Phi2Config
from qformer import QFormer, QFormerConfig
from qformer import config_from_json as qformer_config_from_json
from vit import VisionConfig, VisionTransformer, transformers_key

# -----------------------------------------------------------------------------
# The ViT and ln_vision


def lavis_key(name):
    """Our ViT parameter name -> LAVIS's: the ViT lives under `visual_encoder.`, ln_vision beside it."""
    return name if name.startswith("ln_vision.") else "visual_encoder." + name


class LavisVisionReader(StrictReader):
    """Hands out LAVIS-named ViT tensors under the transformers names vit.py asks for. LAVIS keeps
    q_bias and v_bias apart, where transformers has one qkv.bias [q; k = 0; v]."""

    def __init__(self, tensors, path, dtype, device, config):
        super().__init__(tensors, path, dtype, device)
        with torch.device("meta"):
            names = VisionTransformer(config).state_dict()
        names = [n.replace(".attn.q_bias", ".attn.qkv.bias") for n in names if not n.endswith(".attn.v_bias")]
        self.ours = {transformers_key(n): n for n in names}

    def take(self, key, shape, hint=""):
        name = self.ours[key]
        if name.endswith(".attn.qkv.bias"):
            attn = lavis_key(name.removesuffix(".qkv.bias"))
            q = super().take(attn + ".q_bias", (shape[0] // 3,))
            return torch.cat([q, torch.zeros_like(q), super().take(attn + ".v_bias", (shape[0] // 3,))])
        no_ln = " (a raw EVA checkpoint has no ln_vision: it is BLIP-2's)" if name.startswith("ln_vision") else ""
        return super().take(lavis_key(name), shape, no_ln)


def load_vit(path, dtype=None, device="cpu", **overrides):
    """The ViT and ln_vision from a transformers BLIP-2 directory (vit.py), our own directory
    (config.json of VisionConfig fields, LAVIS-named tensors) or a LAVIS .safetensors file, whose
    config is inferred from its tensor shapes (ln_vision_eps 1e-5, torch's default that LAVIS used;
    the head count is not in the file: 16 at width 1408 as in EVA ViT-g, otherwise pass
    num_attention_heads=). A LAVIS file with 40 blocks (the released EVA ViT-g) loads blocks 0-38
    and leaves block 39, as BLIP-2 does; one line says so."""
    check_overrides(overrides, VisionConfig)
    tensors = open_safetensors(path)  # checkpoint key -> (open file, its path)
    if os.path.isdir(path):
        d = read_json(config_file(path))
        if "vision_config" in d or d.get("model_type") == "blip_2_vision_model":
            return VisionTransformer.from_pretrained(path, dtype, device, **overrides)
        bad = set(d) - {f.name for f in fields(VisionConfig)}
        if bad:
            raise ValueError(f"{config_file(path)}: not a BLIP-2 config (no vision_config) nor ours "
                             f"(unknown fields: {', '.join(sorted(bad))})")
        file_config = d
    else:
        file_config = config_from_lavis_shapes({k: tuple(h.get_slice(k).get_shape()) for k, (h, _) in tensors.items()},
                                               path)
        if file_config["num_attention_heads"] is None and "num_attention_heads" not in overrides:
            raise ValueError(f"{path}: a LAVIS checkpoint does not record its number of heads; at width "
                             f"{file_config['hidden_size']} pass num_attention_heads= (EVA ViT-g: 1408 -> 16)")
    config = VisionConfig(**{**file_config, **overrides})
    tensors = {k: v for k, v in tensors.items() if k.startswith(("visual_encoder.", "ln_vision."))}  # not the Q-Former's
    file_blocks = len({k.split(".")[2] for k in tensors if k.startswith("visual_encoder.blocks.")})
    if not os.path.isdir(path) and file_blocks == 40 and config.num_hidden_layers == 39:
        # BLIP-2 (section 3.3): "we remove the last layer of the ViT and use the second last
        # layer's output features, which leads to slightly better performance."
        tensors = {k: v for k, v in tensors.items() if not k.startswith("visual_encoder.blocks.39.")}
        print(f"vit: {path} holds 40 blocks (EVA ViT-g as released); loading blocks 0-38 and ignoring "
              "block 39, as BLIP-2 does (it uses the penultimate block's features)")
    return VisionTransformer.load(config, LavisVisionReader(tensors, path, dtype or torch.float32, device, config))


def config_from_lavis_shapes(shapes, source="checkpoint"):
    """VisionConfig fields from the tensor shapes {key: shape} of a LAVIS checkpoint, which stores no
    config. num_attention_heads is None unless the width is ViT-g's 1408 (16 heads of 88, LAVIS's
    1408 // 88). A 40-block file (EVA as released) means 39 blocks: see load_vit."""
    def shape(key):
        if key not in shapes:
            raise ValueError(f"{source}: missing tensor '{key}'")
        return shapes[key]

    D, _, p, _ = shape("visual_encoder.patch_embed.proj.weight")  # (D, 3, p, p)
    n = shape("visual_encoder.pos_embed")[1] - 1  # (1, 1 + g*g, D)
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{source}: pos_embed holds {n} patch positions, not a square grid")
    depth = len({k.split(".")[2] for k in shapes if k.startswith("visual_encoder.blocks.")})
    return dict(image_size=g * p, patch_size=p, hidden_size=D, num_hidden_layers=39 if depth == 40 else depth,
                num_attention_heads=16 if D == 1408 else None,
                intermediate_size=shape("visual_encoder.blocks.0.mlp.fc1.weight")[0],  # (mlp, D)
                layer_norm_eps=1e-6, ln_vision_eps=1e-5)


# -----------------------------------------------------------------------------
# The Q-Former

# LAVIS (MiniGPT-4, TinyGPT-V): the prefixes differ from transformers', and the q/k/v projections
# sit in `self`, not `attention`. Its text branch: BERT word / position embeddings, the text FFN,
# the LM head.
LAVIS_TEXT_BRANCH = re.compile(r"Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
                               r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")
NOTHING = re.compile(r"(?!)")  # our own directories hold no text branch


def qformer_lavis_key(name):
    """Our Q-Former name -> LAVIS's, e.g. layers.2.crossattention.key.weight ->
    Qformer.bert.encoder.layer.2.crossattention.self.key.weight."""
    if name == "query_tokens":
        return name
    if name.startswith("layernorm."):
        return "Qformer.bert.embeddings.LayerNorm" + name[len("layernorm"):]
    name = re.sub(r"attention\.(query|key|value)\.", r"attention.self.\1.", name)  # also crossattention
    return "Qformer.bert.encoder.layer." + name[len("layers."):]


def load_qformer(path, dtype=None, device="cpu", **overrides):
    """The Q-Former and its query tokens from a transformers BLIP-2 directory (qformer.py), a
    LAVIS-named .safetensors file (its config from a config.json beside it if there is one, else
    BLIP-2's, the only Q-Former LAVIS ships) or our own directory. Other parts' tensors are left."""
    file = config_file(path)
    tensors = open_safetensors(path)
    layout = ("lavis" if any(k.startswith("Qformer.") for k in tensors) else
              "transformers" if any(k.startswith("qformer.") for k in tensors) else "ours")
    if layout == "transformers":
        return QFormer.from_pretrained(path, dtype, device, **overrides)
    file_config = read_json(file) if file else {}
    if "qformer_config" in file_config or file_config.get("model_type") == "blip-2":
        file_config = qformer_config_from_json(file)
    unknown = set(file_config) - {f.name for f in fields(QFormerConfig)}
    if unknown:
        raise ValueError(f"{file}: not a Q-Former config: neither BLIP-2's (no qformer_config) "
                         f"nor a QFormerConfig (unknown fields: {', '.join(sorted(unknown))})")
    check_overrides(overrides, QFormerConfig)
    config = QFormerConfig(**{**file_config, **overrides})
    if layout == "lavis":  # keep the Q-Former's keys; the other parts' are not ours to check
        tensors = {k: v for k, v in tensors.items() if k.startswith("Qformer.") or k == "query_tokens"}
    reader = StrictReader(tensors, path, dtype or torch.float32, device)
    if layout == "lavis":
        return QFormer.load(config, reader, qformer_lavis_key, LAVIS_TEXT_BRANCH, path)
    return QFormer.load(config, reader, lambda name: name, NOTHING, path)


# -----------------------------------------------------------------------------
# Phi-2 in the legacy fused layout


def legacy_qkv_to_ours(t, num_heads):
    """Legacy fused query_key_value rows [h0: q,k,v][h1: q,k,v]... (3C, ...) -> ours [q; k; v]."""
    rest = t.shape[1:]
    t = t.reshape(num_heads, 3, -1, *rest)  # (nh, 3, hd, ...)
    return t.transpose(0, 1).reshape(-1, *rest)  # (3, nh, hd, ...) -> (3C, ...)


class FusedQKVReader(StrictReader):
    """Hands out a legacy fused `query_key_value` as the q_proj, k_proj and v_proj phi2.py asks for."""

    def __init__(self, tensors, path, dtype, device, num_heads):
        super().__init__(tensors, path, dtype, device)
        self.num_heads, self.parts = num_heads, {}

    def take(self, key, shape, hint=""):
        m = re.fullmatch(r"(.*)\.([qkv])_proj\.(weight|bias)", key)
        if m is None:
            return super().take(key, shape, hint)
        if key not in self.parts:
            fused = super().take(f"{m[1]}.query_key_value.{m[3]}", (3 * shape[0], *shape[1:]))
            for proj, part in zip("qkv", legacy_qkv_to_ours(fused, self.num_heads).chunk(3)):
                self.parts[f"{m[1]}.{proj}_proj.{m[3]}"] = part
        return self.parts.pop(key)


def load_phi2(path, dtype=None, device="cpu", **kwargs):
    """Phi-2 from a transformers-layout download (phi2.py) or a legacy fused one; kwargs are
    Phi2.from_pretrained's (convert, report, Phi2Config overrides)."""
    tensors = open_safetensors(path)
    if not any(".query_key_value." in k and ".lora_" not in k for k in tensors):
        return Phi2.from_pretrained(path, dtype, device, **kwargs)
    file = config_file(path)
    heads = kwargs.get("num_attention_heads") or (read_json(file).get("num_attention_heads") if file else None)
    reader = FusedQKVReader(tensors, path, dtype or torch.float32, device, heads or Phi2Config.num_attention_heads)
    return Phi2.from_pretrained(path, dtype, device, reader=reader, **kwargs)


# -----------------------------------------------------------------------------
# Our own directories: what the demo's stage 0 writes


def save_pretrained(module, directory):
    """Write `module` (a VisionTransformer, QFormer or Phi2) as config.json + model.safetensors, each
    atomically: Phi-2 in transformers' layout (plus our "post_layernorm" field; transformers loads
    it when that is off), the ViT with LAVIS names and the Q-Former with ours, each beside its
    config's fields. The loaders above read all three back."""
    if isinstance(module, Phi2):
        c = module.config
        config = dict(architectures=["PhiForCausalLM"], model_type="phi", vocab_size=c.vocab_size,
                      hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_attention_heads, hidden_act="gelu_new",
                      partial_rotary_factor=c.partial_rotary_factor, rope_theta=c.rope_theta,
                      layer_norm_eps=c.layer_norm_eps, max_position_embeddings=c.max_position_embeddings,
                      resid_pdrop=c.resid_pdrop, embd_pdrop=0.0, attention_dropout=0.0,
                      qk_layernorm=c.qk_layernorm, post_layernorm=c.post_layernorm, rms_norm_eps=c.rms_norm_eps,
                      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=False,
                      torch_dtype=str(module.lm_head.weight.dtype).removeprefix("torch."))
        tensors = {}
        for name, t in module.state_dict().items():
            key = name if name.startswith("lm_head.") else "model." + name
            if "query_key_value" in name:  # [q; k; v] rows -> three tensors
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3)):
                    tensors[key.replace("query_key_value", proj)] = part
            else:
                tensors[key] = t
    else:
        config = asdict(module.config)
        rename = lavis_key if isinstance(module, VisionTransformer) else (lambda name: name)
        tensors = {rename(name): t for name, t in module.state_dict().items()}
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, "model.safetensors"),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(os.path.join(directory, "config.json"), lambda tmp: write_json(config, tmp))


# -----------------------------------------------------------------------------
# TinyGPT-V from any of these


def quantizer(lora=None, scaling=1.0):
    """A `convert` for checkpoints.StrictReader.load (Phi2.from_pretrained passes it on): each
    nn.Linear becomes an Int8Linear as soon as its weight and bias are read, so only one layer is
    ever held at full precision. lora: {name.lora_A: (r, in), name.lora_B: (out, r)} from a stage
    checkpoint, merged first (W + scaling * B A, in float32, as LoRALinear.merge), as quantize_int8
    merges before quantizing. `convert.unused()` lists the pairs that found no layer."""
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


def load_model(phi2_path, vit_path, qformer_path=None, checkpoint=None, dtype=None, device="cpu",
               proj_dim=tg.TinyGPTVConfig.proj_dim, int8=False, report=True):
    """tinygptv.from_pretrained for every layout above: a Phi-2 directory, a ViT + Q-Former path
    (the Q-Former is read from `vit_path` unless `qformer_path` says otherwise) and optionally a
    stage checkpoint. proj_dim is llama_proj's width for new projections (the paper's 4096; a
    checkpoint's own config overrides it). -> (model in eval mode, the checkpoint's stage or 0).

    int8: Phi-2's Linear layers become Int8Linear while they load, one at a time, with the
    checkpoint's LoRA merged into each first (`quantizer`), so Phi-2 never exists at full
    precision: the same weights as int8.quantize_int8 after loading, without the 11 GB float32
    copy. A bf16 ViT computes its blocks in float32 on a CPU without fast bf16 (fastpaths.py).
    report=False: the caller loads a stage checkpoint itself, so Phi-2's new stabilizer norms need
    no word that they start at 1 and 0."""
    if not int8:
        llm = load_phi2(phi2_path, dtype, device, qk_layernorm=True, post_layernorm=True,
                        report=report and checkpoint is None)
        return tg.build(float32_blocks(load_vit(vit_path, dtype, device)),
                        load_qformer(qformer_path or vit_path, dtype, device), llm, checkpoint, proj_dim, dtype, device)
    lora, scaling, tensors, stage = {}, 1.0, {}, 0
    if checkpoint is not None:
        ck_config, stage = tg.config_from_checkpoint(checkpoint)
        tensors, _ = tg.read_checkpoint(checkpoint)
        lora = {k.removeprefix("llama_model."): v for k, v in tensors.items() if ".lora_" in k}
        scaling, proj_dim = ck_config.lora_alpha / ck_config.lora_r, ck_config.proj_dim
    convert = quantizer(lora, scaling)
    llm = load_phi2(phi2_path, dtype, device, convert=convert, qk_layernorm=True, post_layernorm=True,
                    report=report and checkpoint is None)
    targets = [n for n, _ in llm.named_modules() if n.endswith(tg.TinyGPTVConfig.lora_targets)]
    missing = [n for n in targets if lora and f"{n}.lora_A" not in lora] + convert.unused()
    if missing:  # every adapter of the checkpoint merged, and every layer's found
        raise ValueError(f"{checkpoint}: the LoRA of {missing[0]} does not match Phi-2's layers")
    vit = float32_blocks(load_vit(vit_path, dtype, device))
    model, _ = tg.build(vit, load_qformer(qformer_path or vit_path, dtype, device), llm, None, proj_dim, dtype, device)
    if checkpoint is not None:  # the adapters are in Phi-2's int8 weights: the rest loads as usual
        model.config.lora_r, model.config.lora_alpha = ck_config.lora_r, ck_config.lora_alpha
        tg.load_trained(model, {k: v for k, v in tensors.items() if ".lora_" not in k}, checkpoint)
    return model, stage


# -----------------------------------------------------------------------------
# The quantized file: `--int8`'s model written once, loaded without quantizing again

QUANTIZED = "tinygptv-int8"  # the metadata "format" of a file save_quantized writes


def save_quantized(model, tok, stage, path, source):
    """The model as `load_model(..., int8=True)` built it (Phi-2's Linear layers int8 with the
    checkpoint's LoRA merged, the rest in the dtype it was read in) in one safetensors file, with its
    config, stage, tokenizer and `source` ({what: where it came from}) in the metadata."""
    tensors = dict(model.state_dict())
    for name, m in model.named_modules():  # a packed layer keeps only its packed copy: the int8 weight read back
        if isinstance(m, Int8Linear):
            tensors[f"{name}.weight_int8"] = m.int8_weight()
    meta = {"format": QUANTIZED, "config": json.dumps(model.config.to_dict()), "stage": str(stage),
            "source": json.dumps(source), "tokenizer": tok.to_str(), "tokenizer_digest": tg.tokenizer_digest(tok)}
    write_atomically(path, lambda tmp: save_aligned(tensors, tmp, meta))  # (so the int8 weights map aligned)


def load_quantized(path, device="cpu"):
    """-> (model in eval mode, tokenizer, stage) from a save_quantized file: the model is built on the
    meta device and each tensor taken into it as stored (no quantization, no float32 copy), by memory
    map; packing for the CPU's kernel, where it pays, is the caller's (cli.pack_where_it_pays). Strict:
    a missing, unexpected or mis-shaped tensor is named; a file of another kind is refused in one line."""
    regular_file(path, "quantized model")
    try:
        with safe_open(path, framework="pt") as handle:  # (its header: the metadata)
            meta = handle.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != QUANTIZED:
        kind = "a stage checkpoint: give it as --checkpoint" if "stage" in meta else "not one"
        raise ValueError(f"{path}: not a quantized model ({kind}); write one with `tinygptv.py quantize`")
    try:
        config, stage = tg.TinyGPTVConfig.from_dict(json.loads(meta["config"])), int(meta["stage"])
        tok = Tokenizer.from_str(meta["tokenizer"])
    except Exception as e:  # (a missing key, bad JSON, a tokenizer `tokenizers` cannot read)
        raise ValueError(f"{path}: its metadata is damaged ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"{path}: says it holds stage {stage}; TinyGPT-V has stages 1-4")
    with torch.device("meta"):  # shapes only: the file's tensors become the model's
        model = tg.TinyGPTV(config)
        quantize_int8(model)  # Phi-2's Linear layers as --int8 makes them
    # every tensor used as stored: the model's tensors are views of the file's memory maps (private: nothing
    # written to them reaches the file), whose pages are read when first used. The vision tower has a map of
    # its own, unmapped when its tensors go (a one-shot answer lets them go: cli.py); so has each int8 weight,
    # unmapped if it is packed (cli.pack_where_it_pays), so the file's pages never stay resident beside the
    # packed copies (8.0 GB at full size)
    with safe_open(path, framework="pt") as tower, safe_open(path, framework="pt") as rest:
        tensors = {}
        for key in rest.keys():
            if key.endswith(".weight_int8"):
                with safe_open(path, framework="pt") as one:
                    tensors[key] = one.get_tensor(key)
            else:
                tensors[key] = (tower if key.startswith("visual_encoder.") else rest).get_tensor(key)
    reader = StrictReader(tensors, path, integers=True)
    del tensors

    def read(name, p):
        t = reader.take(name, p.shape)
        # an int8 weight off a 64-byte boundary (a file save_quantized did not write) is copied: torch's CPU
        # int8 kernels crashed on one 1 byte off
        return t.clone() if t.dtype == torch.int8 and t.data_ptr() % 64 else t
    reader.load(model, read)
    float32_blocks(model.visual_encoder)  # as --int8 from the downloads
    return model.to(device).eval(), tok, stage


def init_projections(model, path):
    """Stage 1 as the paper (v3, section 3.1) starts it: llama_proj (768 -> 4096) from MiniGPT-4's
    released projection (a file `tinygptv.py convert` wrote from its .pth), strictly, and the new
    llama_proj2 (4096 -> 2560) from a Gaussian, N(0, 0.02) as BERT's and BLIP-2's initializer_range."""
    tensors = open_safetensors(path)
    if tensors and (next(iter(tensors.values()))[0].metadata() or {}).get("projection") != "llama_proj":
        raise ValueError(f"{path}: not a converted MiniGPT-4 projection (`tinygptv.py convert pretrained_minigpt4.pth ...`)")
    reader = StrictReader(tensors, path, torch.float32, "cpu")
    with torch.no_grad():
        for name, p in model.llama_proj.named_parameters():
            p.copy_(reader.take(f"llama_proj.{name}", p.shape))
        reader.finish()
        torch.nn.init.normal_(model.llama_proj2.weight, std=0.02)
        torch.nn.init.zeros_(model.llama_proj2.bias)
