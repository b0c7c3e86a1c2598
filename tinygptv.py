"""TinyGPT-V, assembled: a frozen vision tower, a trained bridge, and Phi-2 with LoRA.

Yuan et al., "TinyGPT-V: Efficient Multimodal Large Language Model via Small Backbones",
arXiv:2312.16862, section 3 (architecture) and figure 2. The data flow at full size (224 px):

    image (B, 3, 224, 224)
      -> visual_encoder: EVA ViT-g/14 + ln_vision (vit.py)      (B, 257, 1408)  frozen
      -> qformer: 32 learned queries, BLIP-2 (qformer.py)       (B, 32, 768)    frozen
      -> llama_proj  Linear(768, 4096)                          (B, 32, 4096)   trained
      -> llama_proj2 Linear(4096, 2560)                         (B, 32, 2560)   trained
      -> spliced into the prompt's token embeddings at <ImageHere>
      -> llama_model: Phi-2 + QK LayerNorm + RMSNorm (phi2.py), LoRA (lora.py)
      -> next-token logits (B, T, 51200)

Notable parts of this file, top to bottom:
- `TinyGPTVConfig` with the paper's `full` preset and a `tiny` one of the same architecture;
- the prompt templates of the four stages and the stage-4 task tags, in one place;
- image preprocessing (Pillow, bicubic, CLIP mean/std) and the tokenizer (`tokenizers`);
- `TinyGPTV`: image encoding, splicing image embeddings into the prompt, the loss, generation;
- checkpoints holding only what trains, and assembly from real Phi-2 / BLIP-2 downloads;
- conversion of the official TinyGPT-V and LAVIS `.pth` releases to safetensors;
- `--int8`: the language model in int8 (int8.py);
- a command line: `python tinygptv.py --image cat.png --prompt "[vqa] what is this?"`.

The names (`visual_encoder`, `qformer`, `llama_proj`, `llama_proj2`, `llama_model`) are the
official code's, so its checkpoint keys can be held against ours. `llama_model` is Phi-2: the
official code kept MiniGPT-4's name when it swapped LLaMA for Phi-2.
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from checkpoints import write_atomically
from int8 import quantize_int8, quantizer
from lora import LoRALinear, add_lora
from phi2 import Phi2, Phi2Config
from qformer import QFormer, QFormerConfig
from vit import VisionConfig, VisionTransformer

# -----------------------------------------------------------------------------
# Config


@dataclass
class TinyGPTVConfig:
    vision: VisionConfig = field(default_factory=VisionConfig.eva_vit_g)
    qformer: QFormerConfig = field(default_factory=QFormerConfig.blip2)
    llm: Phi2Config = field(default_factory=lambda: Phi2Config.phi2(qk_layernorm=True, post_layernorm=True))
    proj_dim: int = 4096  # llama_proj's output: MiniGPT-4's LLaMA width, kept by TinyGPT-V
    lora_r: int = 64  # docs/PAPER.md section 5: peft r=64, alpha=16, dropout 0.05
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple = ("query_key_value", "dense")  # attention only, not the MLP

    @classmethod
    def full(cls):
        """The paper's widths: ViT-g (39 blocks), Q-Former (12 layers, 32 queries), Phi-2 (32 layers)."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size=1024):
        """The same architecture at a size two CPU cores train in minutes (the demo's)."""
        return cls(
            # 48 px in 16 px patches: a 3x3 patch grid, one patch per cell of the demo's 3x3 world
            # (stage 4's 96 px is 6x6). Cross-attention in both Q-Former layers, not every other
            # one: with only two layers, one cross-attention left the stand-in tower binding
            # colours to cells slowly (stage-0 measurements in train.py). 32 queries as in BLIP-2: the
            # demo's tower says one word of `data.scene_words` per query.
            vision=VisionConfig.tiny(image_size=48, patch_size=16, hidden_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=384),
            qformer=QFormerConfig.tiny(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=384, encoder_hidden_size=96, num_query_tokens=32,
                                       cross_attention_frequency=1),
            llm=Phi2Config.tiny(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=512, max_position_embeddings=512,
                                qk_layernorm=True, post_layernorm=True),
            # llama_proj 96 -> 256 -> 128: the pair is one linear map of rank <= 96 at any width, and
            # 4096 made it cost as much as the whole language model per stage-4 step. LoRA keeps the
            # paper's r 64, alpha 16, which the demo's learning rates were tuned with.
            proj_dim=256,
        )

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), qformer=QFormerConfig(**d.pop("qformer")),
                   llm=Phi2Config(**d.pop("llm")), lora_targets=tuple(d.pop("lora_targets")), **d)


# -----------------------------------------------------------------------------
# Prompts (docs/PAPER.md section 6). `<ImageHere>` marks where the 32 image embeddings go.

IMAGE_SLOT = "<Img><ImageHere></Img>"
TEMPLATES = {
    1: IMAGE_SLOT,  # stages 1-2: no instruction; the caption follows the image directly
    2: IMAGE_SLOT,
    3: "###Human: " + IMAGE_SLOT + " {} ###Assistant: ",  # MiniGPT-4's conversation format
    4: "[INST] " + IMAGE_SLOT + " {} [/INST]",  # MiniGPT-v2's format, with task tags
}
# What ends an answer (the model learns to write it, and generation stops at it). Stage 4 ends with
# the tokenizer's end-of-text token, as MiniGPT-v2 ends with the LLM's eos.
END_MARKERS = {1: "\n", 2: "\n", 3: "###", 4: "<|endoftext|>"}
# Answers longer than this many tokens are cut (the official max_txt_len per stage).
MAX_TEXT_TOKENS = {1: 32, 2: 32, 3: 160, 4: 1024}
# Stage-4 task tags and the instruction each wraps its query in (MiniGPT-v2's phrasing).
# "chat" is an untagged instruction (LLaVA-style data); "describe" is stage 3's own instruction.
TASK_INSTRUCTIONS = {
    "vqa": "[vqa] Based on the image, respond to this question with a short answer: {}",
    "caption": "[caption] Briefly describe this image.",
    "refer": "[refer] give me the location of {}",
    "identify": "[identify] what object is in this location {}",
    "grounding": "[grounding] describe this image in detail",
    "detection": "[detection] {}",
    "chat": "{}",
    "describe": "{}",
}
BOS = "<|endoftext|>"  # Phi-2's bos = eos = 50256; the demo tokenizer has the same token


def instruction_for(task, query):
    """The instruction text of one sample (what goes in the template's `{}`)."""
    if task not in TASK_INSTRUCTIONS:
        raise ValueError(f"unknown task '{task}': expected one of {', '.join(TASK_INSTRUCTIONS)}")
    return TASK_INSTRUCTIONS[task].format(query)


def stage_instruction(stage, sample):
    """A sample's instruction under stage `stage`'s template: none in stages 1-2 (the caption
    follows the image), its task's instruction from stage 3 on."""
    return "" if stage <= 2 else instruction_for(sample.task, sample.query)


def parse_user_prompt(prompt):
    """'[vqa] what color is it' -> instruction_for('vqa', 'what color is it'); untagged -> chat."""
    m = re.match(r"\s*\[(\w+)\]\s*(.*)", prompt, re.S)
    if m is None:
        return instruction_for("chat", prompt.strip())
    tag, rest = m.group(1), m.group(2).strip()
    if tag not in TASK_INSTRUCTIONS or tag in ("chat", "describe"):
        tags = ", ".join(f"[{t}]" for t in TASK_INSTRUCTIONS if t not in ("chat", "describe"))
        raise ValueError(f"unknown task tag [{tag}]: use one of {tags}, or no tag")
    return instruction_for(tag, rest)


# -----------------------------------------------------------------------------
# Images and text in

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(im, name="image"):
    """Any image Pillow opens -> RGB, fully decoded. 16- and 32-bit grey ("I;16", "I") are scaled
    from 0-65535 to 0-255: Pillow's own convert clips them, and most greys come out white."""
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max() > 255):
        grey = (np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        raise ValueError(f"{name}: a floating-point image (mode F) has no agreed 0-255 range; save it as 8-bit")
    try:
        return im.convert("RGB")  # L, P, RGBA, CMYK, YCbCr, ...; forces a full decode
    except ValueError as e:  # a mode Pillow cannot turn into RGB (LAB, ...)
        raise ValueError(f"{name}: cannot convert mode {im.mode} to RGB ({e})") from None


def load_image(image):
    """A path or a PIL image -> an RGB PIL image; a one-line error for a missing, corrupt, truncated
    or oversized file (Pillow's decompression-bomb limit)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if not os.path.isfile(image):
        raise FileNotFoundError(f"image not found: {image}")
    try:
        with Image.open(image) as im:
            return to_rgb(im, image)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{image}: refused: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: Pillow's word for some bad files
        raise ValueError(f"cannot read image {image}: {e}") from None


def preprocess(image, size):
    """PIL image or path -> (3, size, size) float tensor, bicubic resize and CLIP normalization."""
    im = load_image(image).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def load_tokenizer(path):
    """A `tokenizer.json` file, or a directory holding one (a Phi-2 download, or the demo's)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
    if tok.token_to_id(BOS) is None:
        raise ValueError(f"tokenizer {path} has no {BOS} token")
    return tok


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


@dataclass
class Example:
    """One tokenized sample: text before the image slot, after it, and the answer to learn."""
    before: list  # BOS + template text up to <ImageHere>
    after: list  # template text after <ImageHere> (including the instruction)
    answer: list  # answer + end marker; empty when generating


def make_example(tok, stage, instruction, answer=None, template=None):
    """template: another prompt around `{}` and `<ImageHere>` (eval.py's official one); default the stage's."""
    before, after = (template or TEMPLATES[stage]).format(instruction).split("<ImageHere>")
    ids_answer = []
    if answer is not None:  # the end marker is learned too, so the model knows when to stop
        ids_answer = encode(tok, answer)[: MAX_TEXT_TOKENS[stage] - 1] + encode(tok, END_MARKERS[stage])
    return Example([tok.token_to_id(BOS)] + encode(tok, before), encode(tok, after), ids_answer)


# -----------------------------------------------------------------------------
# The model


class TinyGPTV(nn.Module):
    """TinyGPT-V (paper section 3, figure 2): the frozen vision tower, the two trained projections
    and Phi-2, under the official code's module names so its checkpoint keys read against ours.

    An image (B, 3, H, W) becomes 32 query vectors (`encode_queries`, frozen), which the projections
    carry into Phi-2's embedding space (`project`); `assemble` splices them into each prompt at
    `<ImageHere>`. `forward` returns the logits at the answer positions for the loss; `generate`
    answers an instruction per image. What trains is chosen by `is_trainable` below, the same in
    every stage but for the LoRA adapters that stage 2 adds (`add_lora`)."""

    def __init__(self, config: TinyGPTVConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)  # ends with ln_vision
        self.qformer = QFormer(config.qformer)  # holds query_tokens
        # Two projections with no activation between them (section 3.1): 768 -> 4096 is
        # MiniGPT-4's projection into LLaMA, reused; 4096 -> 2560 is new, into Phi-2's width.
        self.llama_proj = nn.Linear(config.qformer.hidden_size, config.proj_dim)
        self.llama_proj2 = nn.Linear(config.proj_dim, config.llm.hidden_size)
        self.llama_model = Phi2(config.llm)

    def image_size(self, stage):
        """Stages 1-3 see the config's size (224); stage 4 twice it (448), as in the paper."""
        return self.config.vision.image_size * (2 if stage == 4 else 1)

    def pixels(self, images, stage):
        """PIL images -> (B, 3, H, W) at the stage's size, on the model's device and in its dtype."""
        param = next(self.llama_proj.parameters())
        size = self.image_size(stage)
        return torch.stack([preprocess(im, size) for im in images]).to(param.device, param.dtype)

    # -- image -> LLM embeddings
    def encode_queries(self, pixel_values):
        """(B, 3, H, W) -> the frozen vision tower's Q-Former output (B, n_query, 768)."""
        return self.qformer(self.visual_encoder(pixel_values))

    def project(self, queries):
        """(B, n_query, 768) -> (B, n_query, llm hidden): the only path the image takes into Phi-2."""
        return self.llama_proj2(self.llama_proj(queries))

    def add_lora(self):
        """Stages 2-4: LoRA on Phi-2's fused qkv and dense (docs/PAPER.md section 5)."""
        c = self.config
        names = add_lora(self.llama_model, targets=c.lora_targets, r=c.lora_r, alpha=c.lora_alpha,
                         dropout=c.lora_dropout)
        self.train(self.training)  # the new dropout layers follow the model's mode (eval stays eval)
        return names

    @property
    def has_lora(self):
        return any(isinstance(m, LoRALinear) for m in self.llama_model.modules())

    # -- splicing: one row = [before tokens][image embeds][after tokens][answer tokens]
    def assemble(self, image_embeds, examples, pad_left=False):
        """Build the LLM input for a batch.

        image_embeds: (B, n_query, C) after the projections; examples: B `Example`s.
        Returns inputs_embeds (B, T, C), attention_mask (B, T), labels (B, T) (-100 but on answers),
        and image_start (B,), the position of each row's first image embedding.
        Rows are right-padded for training and left-padded for generation, so that every row's
        last prompt token sits at the same position when decoding starts.
        """
        embed = self.llama_model.embed_tokens
        device, n_img = image_embeds.device, image_embeds.shape[1]
        rows, labels, starts = [], [], []
        for img, ex in zip(image_embeds, examples):
            ids = torch.tensor(ex.before + ex.after + ex.answer, dtype=torch.long, device=device)
            tok = embed(ids).to(img.dtype)  # (L, C)
            nb = len(ex.before)
            rows.append(torch.cat([tok[:nb], img, tok[nb:]]))  # (L + n_img, C)
            lab = torch.full((len(ids) + n_img,), -100, dtype=torch.long, device=device)
            if ex.answer:
                lab[-len(ex.answer):] = ids[-len(ex.answer):]
            labels.append(lab)
            starts.append(nb)
        T = max(r.shape[0] for r in rows)
        B, C = len(rows), image_embeds.shape[-1]
        inputs = image_embeds.new_zeros(B, T, C)
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
        lab_out = torch.full((B, T), -100, dtype=torch.long, device=device)
        image_start = torch.tensor(starts, device=device)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            L = r.shape[0]
            sl = slice(T - L, T) if pad_left else slice(0, L)
            inputs[i, sl], mask[i, sl], lab_out[i, sl] = r, 1, lab
            if pad_left:
                image_start[i] += T - L
        return inputs, mask, lab_out, image_start

    def forward(self, examples, pixel_values=None, queries=None):
        """Training forward: returns (logits (N, V), targets (N,)) for the N positions whose next
        token is an answer token (answer_logits). Pass pixels, or the Q-Former outputs cached by
        the caller (the vision tower is frozen in every stage, so its output for an image never
        changes)."""
        if queries is None:
            queries = self.encode_queries(pixel_values)
        inputs, mask, labels, _ = self.assemble(self.project(queries), examples)
        hidden = self.llama_model.hidden_states(inputs_embeds=inputs, attention_mask=mask)  # (B, T, C)
        return answer_logits(self.llama_model.lm_head, hidden, labels)

    @torch.no_grad()
    def generate(self, tok, images, instructions, stage=4, max_new_tokens=20, **sampling):
        """Answer one instruction per image. Greedy by default; `sampling` goes to Phi2.generate
        (temperature, top_k, top_p, repetition_penalty, seed). Returns one string per image."""
        examples = [make_example(tok, stage, ins) for ins in instructions]
        end = END_MARKERS[stage]
        # a marker can tokenize differently after a space, so both spellings stop generation
        stops = [encode(tok, end), encode(tok, " " + end)]
        out = self.generate_ids(self.pixels(images, stage), examples, max_new_tokens, stops, **sampling)
        return [tok.decode(ids).split(end)[0].strip() for ids in out]

    @torch.no_grad()
    def generate_ids(self, pixel_values, examples, max_new_tokens, stop_sequences, **sampling):
        """The token ids Phi-2 writes after each example's prompt, its image spliced in: image ->
        queries -> projections -> prompt, then Phi2.generate. One list per example."""
        inputs, mask, _, _ = self.assemble(self.project(self.encode_queries(pixel_values)), examples, pad_left=True)
        limit = self.config.llm.max_position_embeddings
        if inputs.shape[1] + max_new_tokens > limit:
            raise ValueError(f"the prompt is {inputs.shape[1]} tokens with the image; with {max_new_tokens} new tokens "
                             f"that exceeds the context of {limit}: ask for fewer new tokens or a shorter prompt")
        return self.llama_model.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         stop_sequences=stop_sequences, **sampling)


def answer_logits(lm_head, hidden, labels):
    """Position t predicts token t + 1, and the loss counts answer tokens only (labels -100
    elsewhere), so lm_head runs on the positions just before an answer token: (N, V) logits and
    their (N,) targets. The other rows, the prompt and the image, are most of a sample and their
    logits would only be ignored."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != -100
    return lm_head(hidden[:, :-1][keep]), targets[keep]  # (N, V), (N,)


def lm_loss(logits, targets, reduction="mean"):
    """Cross-entropy of answer logits (N, V) against their tokens (N,), as answer_logits gives."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


# -----------------------------------------------------------------------------
# What trains, and checkpoints that hold only that (docs/PAPER.md section 7)

# The stabilizer and pre-norm weights train in every stage; their biases stay frozen.
NORM_WEIGHTS = ("q_layernorm.weight", "k_layernorm.weight", "post_layernorm.weight",
                "input_layernorm.weight", "final_layernorm.weight")


def is_trainable(name):
    """The parameters TinyGPT-V trains: the projections, LoRA (when present) and the norm weights."""
    return (name.startswith(("llama_proj.", "llama_proj2.")) or ".lora_" in name
            or (name.startswith("llama_model.") and name.endswith(NORM_WEIGHTS)))


def warmup_cosine(step, steps, peak, warmup, end=0.0, start=0.0):
    """The learning rate at `step`: linear warm-up from `start` to `peak`, then a cosine from `peak`
    to `end` at `steps`, stepped per iteration as the official configs do (docs/PAPER.md section 7)."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def trainable_state_dict(model):
    return {k: v.detach() for k, v in model.state_dict().items() if is_trainable(k)}


def save_checkpoint(model, path, stage, extra=None):
    """Write what trains, plus the config, to one safetensors file, atomically."""
    meta = {"config": json.dumps(model.config.to_dict()), "stage": str(stage), **(extra or {})}
    tensors = {k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))  # never half-written


def read_checkpoint(path):
    """-> (tensors, metadata) with one-line errors for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"corrupt checkpoint {path}: {str(e).splitlines()[0]}") from None
    return tensors, meta


def check_tensors(expected, tensors, where, optional=()):
    """Strictness over a set of tensors: every expected name present (but those in `optional`),
    none unexpected, each with the expected shape and a floating-point dtype. Errors name the tensor."""
    missing = sorted(set(expected) - set(tensors) - set(optional))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected)")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"{where}: {k} is {getattr(v, 'dtype', type(v).__name__)}, not a floating-point tensor")
        if v.shape != expected[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")


def load_checkpoint(model, path):
    """Strictly load a stage checkpoint into `model`. A stage-1 file (no LoRA) into a model with fresh
    LoRA is allowed: stage 2 starts its adapters from zero. Every other difference is an error."""
    tensors, meta = read_checkpoint(path)
    expected = trainable_state_dict(model)
    file_has_lora = any(".lora_" in k for k in tensors)
    check_tensors(expected, tensors, path, optional=() if file_has_lora else [k for k in expected if ".lora_" in k])
    model.load_state_dict(tensors, strict=False)  # strictness checked above, over the trained subset
    return meta


def config_from_checkpoint(path):
    """-> (TinyGPTVConfig, stage) from a stage checkpoint's metadata, or a one-line error."""
    _, meta = read_checkpoint(path)
    if "config" not in meta:
        raise ValueError(f"{path} holds no TinyGPT-V config: is it a checkpoint written by this project, or "
                         "converted with `tinygptv.py convert`?")
    stage = meta.get("stage", "4")
    if stage not in ("1", "2", "3", "4"):
        raise ValueError(f"{path}: its metadata says stage {stage!r}; expected 1, 2, 3 or 4")
    try:
        return TinyGPTVConfig.from_dict(json.loads(meta["config"])), int(stage)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config metadata is not a TinyGPT-V config ({type(e).__name__}: {e})") from None


def from_pretrained(phi2_path, vit_path, qformer_path=None, checkpoint=None, dtype=None, device="cpu",
                    proj_dim=TinyGPTVConfig.proj_dim, int8=False, report=True):
    """Assemble TinyGPT-V from what a user can download: a Phi-2 directory, a BLIP-2 directory
    (ViT, ln_vision, Q-Former, query tokens; pass it as `vit_path`, the Q-Former is read from the
    same place unless `qformer_path` says otherwise) and optionally a stage checkpoint of ours.
    proj_dim is llama_proj's width for new projections (the paper's 4096; the demo's tiny
    backbones take `TinyGPTVConfig.tiny().proj_dim`); a checkpoint's own config overrides it.

    int8: Phi-2's Linear layers become Int8Linear while they load, one at a time, with the
    checkpoint's LoRA merged into each first (int8.quantizer), so Phi-2 never exists at full
    precision: the same weights as quantize_int8 after loading, without the 11 GB float32 copy.
    Everything else loads in `dtype`. report=False: the caller loads a stage checkpoint itself, so
    Phi-2's new stabilizer norms need no word that they start at 1 and 0."""
    stage, ck_tensors, lora, scaling = 0, {}, {}, 1.0
    if checkpoint is not None:
        ck_config, stage = config_from_checkpoint(checkpoint)
        if int8:
            ck_tensors, _ = read_checkpoint(checkpoint)
            lora = {k.removeprefix("llama_model."): v for k, v in ck_tensors.items() if ".lora_" in k}
            scaling = ck_config.lora_alpha / ck_config.lora_r
    convert = quantizer(lora, scaling) if int8 else None
    # a stage checkpoint holds the stabilizer norm weights trained (every stage trains them, checked below):
    # Phi-2's report that they start at 1 and 0 would then mislead
    llm = Phi2.from_pretrained(phi2_path, dtype=dtype, device=device, convert=convert, qk_layernorm=True,
                               post_layernorm=True, report=report and checkpoint is None)
    visual_encoder = VisionTransformer.from_pretrained(vit_path, dtype=dtype, device=device)
    qformer = QFormer.from_pretrained(qformer_path or vit_path, dtype=dtype, device=device)
    config = TinyGPTVConfig(vision=visual_encoder.config, qformer=qformer.config, llm=llm.config, proj_dim=proj_dim)
    if checkpoint is not None:
        config.proj_dim, config.lora_r, config.lora_alpha = ck_config.proj_dim, ck_config.lora_r, ck_config.lora_alpha
    with torch.device("meta"):  # the big parts come from the downloads: build only the shell
        model = TinyGPTV(config)
        if checkpoint is not None and stage >= 2:
            model.add_lora()
        expected = trainable_state_dict(model)  # what a checkpoint of this stage holds
    model.visual_encoder, model.qformer, model.llama_model = visual_encoder, qformer, llm
    model.llama_proj = nn.Linear(config.qformer.hidden_size, config.proj_dim, device=device, dtype=dtype)
    model.llama_proj2 = nn.Linear(config.proj_dim, config.llm.hidden_size, device=device, dtype=dtype)
    if checkpoint is not None and int8:  # as load_checkpoint, but the adapters are already merged in
        check_tensors(expected, ck_tensors, checkpoint, optional=() if lora else [k for k in expected if ".lora_" in k])
        model.load_state_dict({k: v for k, v in ck_tensors.items() if ".lora_" not in k}, strict=False)
    elif checkpoint is not None:
        if stage >= 2:
            model.add_lora()
        load_checkpoint(model, checkpoint)
    return model.eval(), stage


# -----------------------------------------------------------------------------
# Converting the official releases (torch .pth pickles) to safetensors, never unpickling code

OFFICIAL_PREFIX = "llama_model.base_model.model.model."  # peft wrapper + PhiForCausalLM's .model


def _torch_load(path):
    """A .pth's state dict, read with weights_only (tensors and plain containers, never code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file" + (" (a directory)" if os.path.isdir(path) else ""))
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
                r = v.shape[1]
                v = v.reshape(num_heads, 3, -1, r).transpose(0, 1).reshape(-1, r)  # (3*H*hd, r)
            out[f"{m.group(1)}.lora_{m.group(2)}"] = v
        elif name.endswith(NORM_WEIGHTS):
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
    config = TinyGPTVConfig.full()
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
    if os.path.isdir(dst):
        raise ValueError(f"{dst}: is a directory; give the file to write")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such directory for {os.path.basename(dst)}")
    state_dicts = [_torch_load(src) for src in sources]  # first: a swapped pair is named as such
    if os.path.exists(dst) and not force:
        raise ValueError(f"{dst} exists; pass --force to replace it")
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
    if official:
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
    try:
        write_atomically(dst, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=meta))
    except SafetensorError as e:  # safetensors reports a failed write (read-only, full disk) in its own type
        raise ValueError(f"{dst}: cannot write ({e})") from None
    print(f"convert: wrote {len(out)} tensors to {dst}" + (f" (a stage-{stage} checkpoint)" if official else ""))
    return out, unknown


# -----------------------------------------------------------------------------
# Command line

def count_parameters(config):
    with torch.device("meta"):
        model = TinyGPTV(config)  # meta tensors: shapes only, no memory
        model.add_lora()
    parts = {"visual_encoder (ViT + ln_vision)": model.visual_encoder, "qformer (+ query_tokens)": model.qformer,
             "llama_proj + llama_proj2": nn.ModuleList([model.llama_proj, model.llama_proj2]),
             "llama_model (Phi-2 + stabilizers + LoRA)": model.llama_model}
    rows = [(k, sum(p.numel() for p in m.parameters())) for k, m in parts.items()]
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    trainable = sum(p.numel() for n, p in model.named_parameters() if is_trainable(n))
    rows += [("  of which LoRA", lora), ("total", sum(p.numel() for p in model.parameters())),
             ("trainable in stages 2-4", trainable)]
    return rows


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is a one-line `error: ...` like every other expected failure."""

    def error(self, message):
        raise ValueError(message)


def at_least(low, kind=int):
    """An argparse type: a number >= low (a finite one, for floats)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(v) or v < low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low}")
        return v
    return parse


def probability(text):
    """An argparse type for top-p: a number in (0, 1]."""
    v = at_least(0.0, float)(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return v


def device_option(text):
    """An argparse type: a torch device this machine has."""
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use cpu")
    try:
        return str(torch.device(text))
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None


def run_cli(main, interrupted="interrupted"):
    """Run an entry point: an expected failure (bad input, a missing or unreadable file, a full
    disk) is one line on stderr and exit code 2, Ctrl-C one line and 130. A bug still shows its
    traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # FileNotFoundError and PermissionError are OSErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        p = ArgumentParser(prog="tinygptv.py convert", description="Convert official .pth files (a TinyGPT-V "
                           "stage; LAVIS EVA and BLIP-2, merged into one) to safetensors")
        p.add_argument("sources", nargs="+", metavar="SOURCE", help="one or more .pth files")
        p.add_argument("dst", metavar="DESTINATION", help="the .safetensors file to write")
        p.add_argument("--num-heads", type=at_least(1), default=32, help="Phi-2's heads, to un-interleave the fused qkv")
        p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="a TinyGPT-V checkpoint's stage, if its "
                       "file name does not say it")
        p.add_argument("--force", action="store_true", help="replace DESTINATION if it exists")
        a = p.parse_args(argv[1:])
        convert(a.sources, a.dst, a.num_heads, stage=a.stage, force=a.force)
        return
    if argv[:1] == ["params"]:
        for name, n in count_parameters(TinyGPTVConfig.full()):
            print(f"{name:45s} {n:>15,d}")
        return
    p = ArgumentParser(description="Ask TinyGPT-V about an image. Without weight options it "
                       "answers from the demo that `python train.py` trains.")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help='e.g. "[vqa] what color is the circle" or "[refer] the red square"')
    p.add_argument("--checkpoint", help="a stage checkpoint (.safetensors) of this project, or a converted official one")
    p.add_argument("--run", help="the demo run directory train.py wrote (default: runs/demo)")
    p.add_argument("--phi2", help="a Phi-2 directory (transformers layout, with tokenizer.json)")
    p.add_argument("--blip2", help="a BLIP-2 directory or LAVIS safetensors (ViT + Q-Former)")
    p.add_argument("--qformer", help="the Q-Former, if not in the --blip2 path")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="prompt template (default: the checkpoint's stage)")
    p.add_argument("--int8", action="store_true", help="int8 weights for the language model")
    p.add_argument("--device", type=device_option, default="cpu")
    p.add_argument("--max-new-tokens", type=at_least(1), default=40)
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not a.prompt.strip():
        raise ValueError('--prompt is empty: ask something, e.g. --prompt "[vqa] what color is the circle"')
    if a.phi2 or a.blip2:
        if not (a.phi2 and a.blip2):
            raise ValueError("real weights need both --phi2 and --blip2")
        if not a.checkpoint:  # the projections would be random: every answer garbage
            raise ValueError("--phi2/--blip2 need --checkpoint too: without a trained stage checkpoint (ours, or an "
                             "official one converted with `tinygptv.py convert`) the projections are untrained")
        # --int8: Phi-2 is quantized layer by layer as it loads and the rest is read in bf16 (the
        # official code runs the ViT in fp16): about 5 GB in all, where float32 would need 15 GB.
        # A CPU without fast bf16 matmuls computes the ViT's blocks in float32 (vit.CPU_BF16_MATMUL).
        model, stage = from_pretrained(a.phi2, a.blip2, a.qformer, checkpoint=a.checkpoint, int8=a.int8,
                                       dtype=torch.bfloat16 if a.int8 else None)
        tok = load_tokenizer(a.phi2)
    elif a.checkpoint:
        raise ValueError("--checkpoint needs --phi2 and --blip2 (the frozen weights it builds on)")
    else:  # the demo is the default; demo.py builds on this file, so it is imported only here
        import demo
        model, tok, stage = demo.load_demo(a.run or demo.DEMO_RUN)
    if tok.get_vocab_size() > model.config.llm.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but the language model only "
                         f"{model.config.llm.vocab_size} embeddings: they do not belong together")
    if a.max_new_tokens >= model.config.llm.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: the model's context is "
                         f"{model.config.llm.max_position_embeddings} tokens, prompt and image included")
    stage = a.stage or max(stage, 1)
    instruction = parse_user_prompt(a.prompt) if stage >= 3 else ""
    image = load_image(a.image)
    if a.int8 and not a.phi2:  # the demo's small model: quantized after it is built
        quantize_int8(model)
    model.to(a.device)
    answer = model.generate(tok, [image], [instruction], stage=stage, max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, top_p=a.top_p, seed=a.seed)[0]
    print(answer)


if __name__ == "__main__":
    run_cli(main)
