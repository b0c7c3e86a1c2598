"""TinyGPT-V, assembled: a frozen vision tower, a trained bridge, and Phi-2 with LoRA.

Yuan et al. 2023, "TinyGPT-V" (arXiv:2312.16862), section 3 and figure 2. The data flow at 224 px:

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
- what trains, checkpoints holding only that, and assembly from real Phi-2 / BLIP-2 downloads.
Its command line, `python tinygptv.py --image cat.png --prompt "[vqa] what is this?"`, is cli.py's.

The module names are the official code's, so its checkpoint keys can be held against ours;
`llama_model` is Phi-2, under the name MiniGPT-4 gave LLaMA.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from checkpoints import StrictReader, regular_file, write_atomically
from lora import add_lora
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
            # 48 px in 16 px patches: one patch per cell of the demo's 3x3 world (stage 4's 96 px: 6x6).
            # Cross-attention in both Q-Former layers, not every other: with one, the stand-in tower bound
            # colours to cells slowly (docs/LOG.md). BLIP-2's 32 queries: one `demo.scene_words` word each.
            vision=VisionConfig.tiny(image_size=48, patch_size=16, hidden_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=384),
            qformer=QFormerConfig.tiny(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=384, encoder_hidden_size=96, num_query_tokens=32,
                                       cross_attention_frequency=1),
            llm=Phi2Config.tiny(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=512, max_position_embeddings=512,
                                qk_layernorm=True, post_layernorm=True),
            # llama_proj 96 -> 256 -> 128: the pair is a rank <= 96 map at any width; 4096 cost as much as the
            # whole LM per stage-4 step. LoRA keeps the paper's r 64, alpha 16, which the demo's rates were tuned for.
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
# Ends of answers, learned and stopped at (stage 4's end-of-text, as MiniGPT-v2 ends with the LLM's eos).
END_MARKERS = {1: "\n", 2: "\n", 3: "###", 4: "<|endoftext|>"}
MAX_TEXT_TOKENS = {1: 32, 2: 32, 3: 160, 4: 1024}  # answers cut to this many tokens (official max_txt_len)
# Stage-4 task tags, in MiniGPT-v2's phrasing; untagged: "chat" (LLaVA-style data), "describe" (stage 3's).
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


def image_size(base, stage):
    """Stages 1-3 see the vision config's size (224); stage 4 twice it (448), as in the paper."""
    return base * (2 if stage == 4 else 1)


def instruction_for(task, query):
    """The instruction text of one sample (what goes in the template's `{}`)."""
    if task not in TASK_INSTRUCTIONS:
        raise ValueError(f"unknown task '{task}': expected one of {', '.join(TASK_INSTRUCTIONS)}")
    return TASK_INSTRUCTIONS[task].format(query)


def stage_instruction(stage, sample):
    """A sample's instruction: none in stages 1-2 (the caption follows the image), else its task's."""
    return "" if stage <= 2 else instruction_for(sample.task, sample.query)


# -----------------------------------------------------------------------------
# Images and text in

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image, size):
    """A PIL image -> (3, size, size) float tensor: RGB, bicubic resize and CLIP normalization, as the
    official processor does (data.load_image reads a file, with one-line errors for bad ones)."""
    return normalize(resized(image, size))


def resized(image, size):
    """A PIL image -> (3, size, size) uint8, RGB, resized bicubically (what a loader's workers send)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(rgb.resize((size, size), Image.BICUBIC))).permute(2, 0, 1)


def normalize(x):
    """uint8 pixels (..., 3, H, W) -> floats in [0, 1], CLIP-normalized."""
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x.float() / 255.0 - mean) / std


def load_tokenizer(path):
    """A `tokenizer.json` file, or a directory holding one (a Phi-2 download, or the demo's)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    regular_file(path, "tokenizer")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
    if tok.token_to_id(BOS) is None:
        raise ValueError(f"tokenizer {path} has no {BOS} token")
    return tok


def tokenizer_digest(tok):
    """A hash of the vocabulary: stage checkpoints record the tokenizer they were trained with."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


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
    text = (template or TEMPLATES[stage]).format(instruction)
    if text.count("<ImageHere>") != 1:  # the image has one place
        raise ValueError(f"{instruction[:60]!r}: an instruction may not hold <ImageHere>, where the image goes")
    before, after = text.split("<ImageHere>")
    ids_answer = []
    if answer is not None:  # the end marker is learned too, so the model knows when to stop
        ids_answer = encode(tok, answer)[: MAX_TEXT_TOKENS[stage] - 1] + encode(tok, END_MARKERS[stage])
    return Example([tok.token_to_id(BOS)] + encode(tok, before), encode(tok, after), ids_answer)


# -----------------------------------------------------------------------------
# The model


class TinyGPTV(nn.Module):
    """TinyGPT-V (section 3, figure 2). An image (B, 3, H, W) becomes 32 query vectors (`encode_queries`,
    frozen), the projections carry them into Phi-2's embedding space (`project`), and `assemble` splices
    them into each prompt at `<ImageHere>`. `forward` gives the answer positions' logits for the loss,
    `generate` one answer per image; `is_trainable` picks what trains, in every stage the same but for
    stage 2's LoRA (`add_lora`)."""

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
        return image_size(self.config.vision.image_size, stage)

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

    # -- splicing: one row = [before tokens][image embeds][after tokens][answer tokens]
    def assemble(self, image_embeds, examples, pad_left=False):
        """The LLM input for a batch: image_embeds (B, n_query, C) after the projections and B `Example`s
        -> inputs_embeds (B, T, C), attention_mask (B, T), labels (B, T) (-100 but on answers). Rows are
        right-padded for training, left-padded for generation so that every row's last prompt token sits
        at the same position when decoding starts."""
        embed = self.llama_model.embed_tokens
        device, n_img = image_embeds.device, image_embeds.shape[1]
        rows, labels = [], []
        for img, ex in zip(image_embeds, examples):
            ids = torch.tensor(ex.before + ex.after + ex.answer, dtype=torch.long, device=device)
            tok = embed(ids).to(img.dtype)  # (L, C)
            nb = len(ex.before)
            rows.append(torch.cat([tok[:nb], img, tok[nb:]]))  # (L + n_img, C)
            lab = torch.full((len(ids) + n_img,), -100, dtype=torch.long, device=device)
            if ex.answer:
                lab[-len(ex.answer):] = ids[-len(ex.answer):]
            labels.append(lab)
        T = max(r.shape[0] for r in rows)
        B, C = len(rows), image_embeds.shape[-1]
        inputs = image_embeds.new_zeros(B, T, C)
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
        lab_out = torch.full((B, T), -100, dtype=torch.long, device=device)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            L = r.shape[0]
            sl = slice(T - L, T) if pad_left else slice(0, L)
            inputs[i, sl], mask[i, sl], lab_out[i, sl] = r, 1, lab
        return inputs, mask, lab_out

    def forward(self, examples, pixel_values=None, queries=None):
        """Training forward -> (logits (N, V), targets (N,)) at the N positions whose next token is an
        answer token (answer_logits). Pass pixels, or Q-Former outputs the caller cached (the vision
        tower is frozen in every stage, so an image's output never changes)."""
        if queries is None:
            queries = self.encode_queries(pixel_values)
        inputs, mask, labels = self.assemble(self.project(queries), examples)
        hidden = self.llama_model.hidden_states(inputs_embeds=inputs, attention_mask=mask)  # (B, T, C)
        return answer_logits(self.llama_model.lm_head, hidden, labels)

    @torch.no_grad()
    def generate(self, tok, images, instructions, stage=4, max_new_tokens=20, **sampling):
        """Answer one instruction per image. Greedy by default; `sampling` goes to Phi2.generate
        (temperature, top_k, top_p, repetition_penalty, seed). Returns one string per image."""
        examples = [make_example(tok, stage, ins) for ins in instructions]
        end = END_MARKERS[stage]
        stops = [encode(tok, end), encode(tok, " " + end)]  # a marker tokenizes differently after a space
        out = self.generate_ids(self.pixels(images, stage), examples, max_new_tokens, stops, **sampling)
        return [tok.decode(ids).split(end)[0].strip() for ids in out]

    @torch.no_grad()
    def generate_ids(self, pixel_values, examples, max_new_tokens, stop_sequences, **sampling):
        """The token ids Phi-2 writes after each example's prompt, its image spliced in; one list each."""
        inputs, mask, _ = self.assemble(self.project(self.encode_queries(pixel_values)), examples, pad_left=True)
        limit = self.config.llm.max_position_embeddings
        if inputs.shape[1] + max_new_tokens > limit:
            raise ValueError(f"the prompt is {inputs.shape[1]} tokens with the image; with {max_new_tokens} new tokens "
                             f"that exceeds the context of {limit}: ask for fewer new tokens or a shorter prompt")
        return self.llama_model.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         stop_sequences=stop_sequences, **sampling)


def answer_logits(lm_head, hidden, labels):
    """Position t predicts token t + 1 and the loss counts answer tokens only (labels -100 elsewhere),
    so lm_head runs just before answer tokens: (N, V) logits, (N,) targets. The other rows, the prompt
    and the image, are most of a sample and their logits would only be ignored."""
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


def trainable_state_dict(model):
    return {k: v.detach() for k, v in model.state_dict().items() if is_trainable(k)}


def save_checkpoint(model, path, stage, extra=None):
    """Write what trains, plus the config, to one safetensors file, atomically."""
    meta = {"config": json.dumps(model.config.to_dict()), "stage": str(stage), **(extra or {})}
    tensors = {k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))  # never half-written


def read_checkpoint(path, tensors=True):
    """-> (tensors, or None for the metadata alone, metadata) with one-line errors for a missing or corrupt file."""
    regular_file(path, "checkpoint")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path) if tensors else None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"corrupt checkpoint {path}: {str(e).splitlines()[0]}") from None
    return tensors, meta


def load_trained(model, tensors, where, fresh_lora=False):
    """Strictly load what trains ({name: tensor}): each trained tensor with its shape, nothing else.
    fresh_lora: a file without LoRA leaves the adapters fresh (stage 2 starts from stage 1's, B = 0)."""
    keep_fresh = fresh_lora and not any(".lora_" in k for k in tensors)
    reader = StrictReader(tensors, where)
    state = {k: reader.take(k, v.shape) for k, v in trainable_state_dict(model).items()
             if not (keep_fresh and ".lora_" in k)}
    reader.finish()
    model.load_state_dict(state, strict=False)  # strictness checked above, over the trained subset


def load_checkpoint(model, path):
    """Strictly load a stage checkpoint into `model`; a stage-1 file into a model with fresh LoRA too."""
    tensors, meta = read_checkpoint(path)
    load_trained(model, tensors, path, fresh_lora=True)
    return meta


def config_from_checkpoint(path):
    """-> (TinyGPTVConfig, stage) from a stage checkpoint's metadata, or a one-line error."""
    _, meta = read_checkpoint(path, tensors=False)
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


# -----------------------------------------------------------------------------
# Assembly from the downloads: Phi-2 and BLIP-2 as transformers saves them


def from_pretrained(phi2_path, blip2_path, checkpoint=None, dtype=None, device="cpu"):
    """TinyGPT-V from a `microsoft/phi-2` directory, a `Salesforce/blip2-*` one and optionally our stage
    checkpoint -> (model, its stage or 0). The new stabilizer norms are reported if no checkpoint has them."""
    llm = Phi2.from_pretrained(phi2_path, dtype=dtype, device=device, qk_layernorm=True, post_layernorm=True,
                               report=checkpoint is None)
    visual_encoder = VisionTransformer.from_pretrained(blip2_path, dtype=dtype, device=device)
    qformer = QFormer.from_pretrained(blip2_path, dtype=dtype, device=device)
    return build(visual_encoder, qformer, llm, checkpoint, dtype=dtype, device=device)


def build(visual_encoder, qformer, llm, checkpoint=None, proj_dim=TinyGPTVConfig.proj_dim, dtype=None, device="cpu"):
    """The model around loaded backbones, with new projections (`proj_dim`: the paper's 4096) or a
    stage checkpoint's, LoRA from stage 2 on -> (model in eval mode, the checkpoint's stage or 0)."""
    stage, config = 0, TinyGPTVConfig(vision=visual_encoder.config, qformer=qformer.config, llm=llm.config,
                                      proj_dim=proj_dim)
    if checkpoint is not None:
        ck_config, stage = config_from_checkpoint(checkpoint)
        config.proj_dim, config.lora_r, config.lora_alpha = ck_config.proj_dim, ck_config.lora_r, ck_config.lora_alpha
    with torch.device("meta"):  # the big parts are loaded already: build only the shell
        model = TinyGPTV(config)
    model.visual_encoder, model.qformer, model.llama_model = visual_encoder, qformer, llm
    model.llama_proj = nn.Linear(config.qformer.hidden_size, config.proj_dim, device=device, dtype=dtype)
    model.llama_proj2 = nn.Linear(config.proj_dim, config.llm.hidden_size, device=device, dtype=dtype)
    if checkpoint is not None:
        if stage >= 2:
            model.add_lora()
        load_checkpoint(model, checkpoint)
    return model.eval(), stage


if __name__ == "__main__":  # the command line is cli.py's; the model above never imports it
    import cli
    cli.run_cli(cli.main)
