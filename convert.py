"""Converting the official releases (torch .pth pickles) to safetensors, never unpickling code.

A reader of the paper may skip this file. `python tinygptv.py convert SOURCE... DESTINATION` runs
it (cli.py):
- MiniGPT-4's released projection (`pretrained_minigpt4_7b.pth`: `llama_proj` alone, 768 -> 4096
  into Vicuna 7B) becomes the file `train.py --init-proj` starts stage 1 from;
- a TinyGPT-V stage checkpoint (`TinyGPT-V_for_Stage4.pth`) becomes a stage checkpoint of ours:
  peft's prefix dropped, LoRA's B of the fused qkv re-ordered from the official rows head by head
  to ours, and the config and stage written into the file's metadata;
- LAVIS's EVA ViT-g and BLIP-2 pickles (`eva_vit_g.pth` for the ViT, a BLIP-2 `.pth` for ln_vision
  and the Q-Former) merge into one LAVIS-named file that `--blip2` reads (layouts.py).
Each `.pth` is read with torch.load(weights_only=True): tensors and plain containers, never code.
"""

import json
import os
import re

import torch
from safetensors.torch import save_file

import tinygptv as tg
from checkpoints import output_file, regular_file, write_atomically
from layouts import legacy_qkv_to_ours

OFFICIAL_PREFIX = "llama_model.base_model.model.model."  # peft wrapper + PhiForCausalLM's .model


def _torch_load(path):
    """A .pth's state dict, read with weights_only (tensors and plain containers, never code)."""
    regular_file(path, ".pth file")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic not in (b"PK", b"\x80\x02"):  # torch.save's zip archive, or the legacy pickle protocol 2
        raise ValueError(f"{path}: not a torch .pth file (is the order `convert SOURCE... DESTINATION`?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: never relay that advice
        why = "it holds objects other than tensors and plain containers" if "weights_only" in str(e) \
            else str(e).splitlines()[0]
        raise ValueError(f"{path}: refused: {why} (this project never unpickles code)") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict (a dict of tensors)")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ValueError(f"{path}: key {k!r} is not a tensor name")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: '{k}' holds a {type(v).__name__}, not a tensor")
    return sd


def convert_official_stage(state_dict, num_heads):
    """Official TinyGPT-V stage state dict -> our names. Returns (converted, unknown keys).

    The official Phi-2 fuses q, k, v in one `query_key_value` whose output rows run head by head,
    [h0: q k v][h1: q k v]...; ours are [q (all heads); k; v]. LoRA's B (out, r) indexes output
    rows, so it is permuted the same way; A (r, in) indexes input columns and is unchanged.
    """
    out, unknown = {}, []
    for k, v in state_dict.items():
        if k.startswith(("llama_proj.", "llama_proj2.")):
            out[k] = v
            continue
        if not k.startswith(OFFICIAL_PREFIX):
            unknown.append(k)
            continue
        name = "llama_model." + k[len(OFFICIAL_PREFIX):]
        m = re.fullmatch(r"(.*\.(?:query_key_value|dense))\.lora_([AB])\.weight", name)
        if m:
            if name.endswith("query_key_value.lora_B.weight"):
                if v.dim() != 2 or v.shape[0] % (3 * num_heads):
                    raise ValueError(f"{k}: shape {tuple(v.shape)} is not (3 x {num_heads} heads x head_dim, r): "
                                     "check --num-heads")
                v = legacy_qkv_to_ours(v, num_heads)  # (3*H*hd, r)
            out[f"{m.group(1)}.lora_{m.group(2)}"] = v
        elif name.endswith(tg.NORM_WEIGHTS):
            out[name] = v
        else:
            unknown.append(k)
    return out, unknown


def convert_lavis(state_dict):
    """LAVIS EVA / BLIP-2 pickles -> the LAVIS names vit.py and qformer.py read from safetensors.
    A raw `eva_vit_g.pth` has no `visual_encoder.` prefix; it gets one."""
    out, unknown = {}, []
    ours = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")
    eva = ("cls_token", "pos_embed", "patch_embed.", "blocks.")
    for k, v in state_dict.items():
        if k.startswith(ours):
            out[k] = v
        elif k.startswith(eva):
            out["visual_encoder." + k] = v
        else:
            unknown.append(k)
    return out, unknown


def official_config(tensors, stage):
    """The config a converted official stage checkpoint carries, so that `--checkpoint` can use it:
    the paper's model, with the projection width and LoRA rank read from the tensors (LoRA's alpha
    is not in the file: the official 16, docs/PAPER.md section 5)."""
    config = tg.TinyGPTVConfig.full()
    if "llama_proj.weight" in tensors:
        config.proj_dim = tensors["llama_proj.weight"].shape[0]  # (proj_dim, 768)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A")}  # (r, in)
    if len(ranks) > 1:
        raise ValueError(f"LoRA ranks differ between layers: {sorted(ranks)}")
    if ranks:
        config.lora_r = ranks.pop()
    elif stage >= 2:
        raise ValueError(f"a stage-{stage} checkpoint must hold LoRA adapters; this one has none")
    return config


def convert(sources, dst, num_heads=32, stage=None, force=False):
    """Official .pth files -> one safetensors file. A TinyGPT-V stage checkpoint becomes a stage
    checkpoint of ours, with its config; EVA and BLIP-2 pickles (e.g. `eva_vit_g.pth` for the ViT
    and a BLIP-2 `.pth` for ln_vision and the Q-Former) merge into one file that `--blip2` reads."""
    sources = [sources] if isinstance(sources, str) else sources
    if num_heads < 1:
        raise ValueError(f"--num-heads {num_heads}: must be at least 1")
    state_dicts = [_torch_load(src) for src in sources]  # first: a swapped pair is named as such
    output_file(dst, force, "the converted checkpoint")
    out, unknown, official = {}, [], False
    for src, sd in zip(sources, state_dicts):
        if any(k.startswith((OFFICIAL_PREFIX, "llama_proj")) for k in sd):
            part, skipped = convert_official_stage(sd, num_heads)
            official = True
        else:
            part, skipped = convert_lavis(sd)
        twice = sorted(set(part) & set(out))
        if twice:
            raise ValueError(f"{src}: '{twice[0]}' is also in an earlier source")
        out.update(part)
        unknown += skipped
    if not out:
        raise ValueError(f"{', '.join(sources)}: no TinyGPT-V, EVA or BLIP-2 weights found")
    if official and len(sources) > 1:
        raise ValueError("a TinyGPT-V stage checkpoint converts on its own, not merged with other files")
    meta = {"converted_from": ", ".join(os.path.basename(s) for s in sources)}
    projection = official and set(out) == {"llama_proj.weight", "llama_proj.bias"}  # MiniGPT-4's, alone
    if projection:  # what train.py --init-proj starts stage 1 from (the paper, section 3.1)
        meta["projection"] = "llama_proj"
    elif official:
        if stage is None:
            m = re.search(r"stage[_-]?(\d)", os.path.basename(sources[0]), re.I)
            if m is None:
                raise ValueError(f"{sources[0]}: the file name does not say its stage; pass --stage 1-4")
            stage = int(m.group(1))
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage {stage}: expected 1, 2, 3 or 4")
        meta.update(config=json.dumps(official_config(out, stage).to_dict()), stage=str(stage))
    if unknown:  # reported, never dropped silently
        print(f"convert: {len(unknown)} keys not used: {', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
    write_atomically(dst, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=meta))
    kind = " (MiniGPT-4's llama_proj)" if projection else f" (a stage-{stage} checkpoint)" if official else ""
    print(f"convert: wrote {len(out)} tensors to {dst}{kind}")
    return out, unknown
