"""The command lines' shared parts, and `python tinygptv.py`'s own.

A reader of the paper may skip this file. Its jobs:
- argument types that refuse a bad value where it is parsed (`at_least`, `probability`,
  `device_option`) and an `ArgumentParser` whose errors are one line like every other;
- `run_cli`: an expected failure is one line on stderr and exit code 2, Ctrl-C one line and 130;
- `add_weight_options` and `load_for_inference`: which model a command answers from, the demo's by
  default or real weights (--phi2, --blip2, --checkpoint, --int8, --model), for tinygptv.py, chat.py
  and eval.py; `pack_where_it_pays`: whether its int8 weights are packed for the CPU's kernel;
- `main`: `python tinygptv.py --image x.png --prompt "..."`, `... convert` and `... params`.
"""

import argparse
import math
import os
import re
import sys

import torch
import torch.nn as nn

import data
import demo
import tinygptv as tg
from checkpoints import file_digest, output_file, reuse_freed_memory, write_atomically
from convert import convert
from fastpaths import decoder_for, inference_attention
import int8
from int8 import Int8Linear, quantize_int8
from layouts import load_model, load_quantized, save_quantized

# -----------------------------------------------------------------------------
# Arguments and errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is a one-line `error: ...` like every other expected failure, and
    every text argument is checked where it is parsed: Python hands bytes that are not UTF-8 (a
    Latin-1 terminal, a file name in another encoding) on as lone surrogates, which the tokenizer,
    safetensors and a UTF-8 terminal each reject in their own way, deep inside."""

    def error(self, message):
        raise ValueError(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for name, value in vars(parsed).items():
            texts = [t for v in (value if isinstance(value, list) else [value]) for t in (v if isinstance(v, tuple) else [v])]
            for text in texts:
                if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                    option = name if name in ("sources", "dst") else "--" + name.replace("_", "-")
                    raise ValueError(f"{option}: {text!r} is not valid UTF-8 text; use a UTF-8 terminal, "
                                     "or rename the file")
        return parsed


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


def dropout_rate(text):
    """An argparse type for a dropout probability: a number in [0, 1)."""
    v = at_least(0.0, float)(text)
    if v >= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return v


def device_option(text):
    """An argparse type: a device this program runs on (the CPU, or a CUDA GPU) that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: this program runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


def mixture_item(text):
    """An argparse type for one of --data's words: 'gqa.json:50' -> ('gqa.json', 50.0); no weight: 1."""
    path, _, weight = text.rpartition(":")
    if not path or not re.fullmatch(r"\d+(\.\d+)?", weight):
        return text, 1.0
    if float(weight) <= 0:
        raise argparse.ArgumentTypeError(f"{text}: a weight must be positive")
    return path, float(weight)


def run_cli(main, interrupted="interrupted"):
    """Run an entry point: an expected failure (bad input, a missing or unreadable file, a full
    disk) is one line on stderr and exit code 2, Ctrl-C one line and 130. A bug still shows its
    traceback."""
    for stream in (sys.stdout, sys.stderr):  # a name that is not UTF-8 is printed escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:  # FileNotFoundError and PermissionError are OSErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


def parse_user_prompt(prompt):
    """'[vqa] what color is it' -> tg.instruction_for('vqa', 'what color is it'); untagged -> chat."""
    if "<ImageHere>" in prompt:  # the template's own slot for the image: a second would split it wrongly
        raise ValueError("the prompt contains <ImageHere>, where the image goes: ask without it")
    m = re.match(r"\s*\[(\w+)\]\s*(.*)", prompt, re.S)
    if m is None:
        return tg.instruction_for("chat", prompt.strip())
    tag, rest = m.group(1), m.group(2).strip()
    if tag not in tg.TASK_INSTRUCTIONS or tag in ("chat", "describe"):
        tags = ", ".join(f"[{t}]" for t in tg.TASK_INSTRUCTIONS if t not in ("chat", "describe"))
        raise ValueError(f"unknown task tag [{tag}]: use one of {tags}, or no tag")
    return tg.instruction_for(tag, rest)


def check_real_weights(args):
    """Real weights come as a pair: --phi2 and --blip2 (tinygptv.py, eval.py and train.py)."""
    if (args.phi2 is None) != (args.blip2 is None):
        raise ValueError("real weights need both --phi2 and --blip2")


# -----------------------------------------------------------------------------
# Which model answers


def add_weight_options(p):
    p.add_argument("--run", help="the demo run directory train.py wrote (default: runs/demo)")
    p.add_argument("--checkpoint", help="a stage checkpoint (.safetensors) of this project, or a converted official one")
    p.add_argument("--phi2", help="a Phi-2 directory (transformers layout, with tokenizer.json)")
    p.add_argument("--blip2", help="a BLIP-2 directory or LAVIS safetensors (ViT + Q-Former)")
    p.add_argument("--qformer", help="the Q-Former, if not in the --blip2 path")
    p.add_argument("--int8", action="store_true", help="int8 weights for the language model")
    p.add_argument("--model", help="a quantized model (`tinygptv.py quantize` wrote it): the whole --int8 "
                   "model in one file, loaded as it is instead of --phi2, --blip2 and --checkpoint")


def load_for_inference(args, dtype=None, answers="few"):
    """-> (model on args.device in eval mode, tokenizer, stage): the demo run by default, or real
    weights, which need a trained stage checkpoint (the projections would otherwise be random and
    every answer garbage). With --int8 Phi-2 is quantized as it loads (layouts.load_model).
    `answers` ("few", "many" or "none") says whether packing the int8 weights pays: see pack_where_it_pays."""
    check_real_weights(args)
    if getattr(args, "model", None):  # (a caller's own Namespace may not have the option)
        if args.phi2 or args.checkpoint or args.run:
            raise ValueError("--model is the whole model: give it without --phi2, --blip2, --checkpoint or --run")
        model, tok, stage = load_quantized(args.model)
        return ready_to_answer(model, args.device, answers), tok, max(stage, 1)
    if args.phi2:
        if not args.checkpoint:
            raise ValueError("--phi2/--blip2 need --checkpoint too: without a trained stage checkpoint (ours, or an "
                             "official one converted with `tinygptv.py convert`) the projections are untrained")
        model, stage = load_model(args.phi2, args.blip2, args.qformer, checkpoint=args.checkpoint, int8=args.int8,
                                  dtype=dtype)
        tok = tg.load_tokenizer(args.phi2)
    elif args.checkpoint:
        raise ValueError("--checkpoint needs --phi2 and --blip2 (the frozen weights it builds on)")
    else:
        model, tok, stage = demo.load_demo(args.run or demo.DEMO_RUN)
        if args.int8:  # the demo's small model: quantized after it is built
            quantize_int8(model)
    if tok.get_vocab_size() > model.config.llm.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but the language model only "
                         f"{model.config.llm.vocab_size} embeddings: they do not belong together")
    checkpoint = args.checkpoint or os.path.join(args.run or demo.DEMO_RUN, f"stage{stage}.safetensors")
    trained_with = tg.read_checkpoint(checkpoint, tensors=False)[1].get("tokenizer")  # (a converted official one says none)
    if trained_with not in (None, tg.tokenizer_digest(tok)):
        raise ValueError(f"{checkpoint} was trained with another tokenizer than the one given: use the tokenizer.json "
                         "of the run or download it was trained on")
    return ready_to_answer(model, args.device, answers), tok, max(stage, 1)


def ready_to_answer(model, device, answers):
    """A loaded model on its device, in eval mode, its vision tower's attention computed the fastest way
    for inference (fastpaths.InferenceAttention), its int8 weights packed where that pays, and the
    process's memory allocator set for answering (checkpoints.reuse_freed_memory)."""
    inference_attention(model.visual_encoder)
    model = pack_where_it_pays(model.to(device).eval(), answers)
    reuse_freed_memory()
    return model


def pack_where_it_pays(model, answers):
    """Pack Phi-2's int8 weights for the CPU's kernel (int8.CPU_KERNEL) where that pays. fbgemm (AVX2):
    always, its unpacked stand-in reading at half its speed. oneDNN (AVX-512 VNNI): for "many" answers
    (the chat, its server, eval.py), not "few" (one command's answer): packing Phi-2 took 10-14 s on the
    2-core EPYC and saves about 0.03 s per decoded token (docs/LOG.md, 2026-12-05). "none": quantize."""
    if answers not in ("few", "many", "none"):
        raise ValueError(f"answers={answers!r}: few, many or none")
    if answers == "many" or (answers == "few" and int8.CPU_KERNEL == "fbgemm"):
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.pack()  # (on the CPU, with a kernel that packs)
    return model


# -----------------------------------------------------------------------------
# python tinygptv.py


def count_parameters(config):
    with torch.device("meta"):
        model = tg.TinyGPTV(config)  # meta tensors: shapes only, no memory
        model.add_lora()
    parts = {"visual_encoder (ViT + ln_vision)": model.visual_encoder, "qformer (+ query_tokens)": model.qformer,
             "llama_proj + llama_proj2": nn.ModuleList([model.llama_proj, model.llama_proj2]),
             "llama_model (Phi-2 + stabilizers + LoRA)": model.llama_model}
    rows = [(k, sum(p.numel() for p in m.parameters())) for k, m in parts.items()]
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    trainable = sum(p.numel() for n, p in model.named_parameters() if tg.is_trainable(n))
    rows += [("  of which LoRA", lora), ("total", sum(p.numel() for p in model.parameters())),
             ("trainable in stages 2-4", trainable)]
    return rows


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
    if argv[:1] == ["quantize"]:
        p = ArgumentParser(prog="tinygptv.py quantize", description="Write what --int8 builds from the downloads "
                           "and a stage checkpoint (Phi-2 in int8 with the LoRA merged, the vision side in bf16) "
                           "into one file, which --model then loads without quantizing again")
        p.add_argument("dst", metavar="OUT.safetensors", help="the file to write")
        add_weight_options(p)
        p.add_argument("--force", action="store_true", help="replace OUT.safetensors if it exists")
        a = p.parse_args(argv[1:])
        if not (a.phi2 and a.checkpoint) or a.model:
            raise ValueError("quantize needs --phi2, --blip2 and --checkpoint: the downloads and a trained stage")
        output_file(a.dst, a.force, "the quantized model")
        a.int8, a.device = True, "cpu"
        model, tok, stage = load_for_inference(a, dtype=torch.bfloat16, answers="none")
        source = {"phi2": os.path.abspath(a.phi2), "blip2": os.path.abspath(a.blip2), "checkpoint":
                  os.path.abspath(a.checkpoint), "checkpoint_sha256": file_digest(a.checkpoint)}
        save_quantized(model, tok, stage, a.dst, source)
        print(f"wrote {a.dst} ({os.path.getsize(a.dst) / 2 ** 20:,.1f} MB): "
              f"python tinygptv.py --model {a.dst} --image PICTURE --prompt \"[vqa] ...\"")
        return
    if argv[:1] == ["params"]:
        for name, n in count_parameters(tg.TinyGPTVConfig.full()):
            print(f"{name:45s} {n:>15,d}")
        return
    p = ArgumentParser(prog="tinygptv.py", description="Ask TinyGPT-V about an image. Without weight options it "
                       "answers from the demo that `python train.py` trains.")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help='e.g. "[vqa] what color is the circle" or "[refer] the red square"')
    add_weight_options(p)
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="prompt template (default: the checkpoint's stage)")
    p.add_argument("--device", type=device_option, default="cpu")
    p.add_argument("--max-new-tokens", type=at_least(1), default=40)
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-p", type=probability, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draw", metavar="OUT.png", help="outline the answer's boxes on the image, into this file")
    p.add_argument("--force", action="store_true", help="let --draw replace an existing file")
    a = p.parse_args(argv)
    if a.draw:
        output_file(a.draw, a.force, "the drawing")
    if not a.prompt.strip():
        raise ValueError('--prompt is empty: ask something, e.g. --prompt "[vqa] what color is the circle"')
    # --int8 from the downloads: Phi-2 is quantized layer by layer as it loads and the rest is read in
    # bf16 (the official code runs the ViT in fp16): about 5 GB in all, where float32 would need 15 GB.
    model, tok, stage = load_for_inference(a, dtype=torch.bfloat16 if a.int8 and a.phi2 else None)
    if a.max_new_tokens >= model.config.llm.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: the model's context is "
                         f"{model.config.llm.max_position_embeddings} tokens, prompt and image included")
    stage = a.stage or stage
    instruction = parse_user_prompt(a.prompt) if stage >= 3 else ""
    image = data.load_image(a.image)
    # one image per command: once the tower has encoded it, its weights (2 GB at full size) can go, so
    # they are not resident beside Phi-2's while it answers (bench.py section 6 measures the peak)
    def let_go(tower, inputs, output):  # (returns None: the tower's output stands)
        tower.to("meta")
    model.visual_encoder.register_forward_hook(let_go)
    answer = model.generate(tok, [image], [instruction], stage=stage, max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, top_p=a.top_p, seed=a.seed, decoder=decoder_for(a.device))[0]
    print(answer)
    if a.draw:
        boxes = data.parse_boxes(answer)
        if boxes:
            write_atomically(a.draw, lambda tmp: data.draw_boxes(image, boxes).save(tmp, format="PNG"))
        print(f"drew {len(boxes)} box(es) in {a.draw}" if boxes else f"no box in the answer: {a.draw} not written",
              file=sys.stderr)
