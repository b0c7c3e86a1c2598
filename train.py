"""Training TinyGPT-V in its four stages (paper section 4.2 and table 1; docs/PAPER.md section 7).

    python train.py                 # every stage of the built-in demo, skipping finished ones
    python train.py --stage 2       # one stage, from stage 1's checkpoint (built first if missing)
    python train.py --resume        # continue an interrupted stage exactly where it stopped
    torchrun --nproc_per_node 2 train.py --stage 2      # data parallel (gloo on CPU, nccl on GPU)
    python train.py --stage 1 --phi2 DIR --blip2 DIR --data 'laion/{00000..00099}.tar'   # real ones

What each stage trains (everything else is frozen: ViT, ln_vision, Q-Former, Phi-2's weights):
    stage 1 warm-up       llama_proj, llama_proj2, norm weights           image-caption pairs
    stage 2 pre-training  + LoRA on Phi-2's qkv and dense                 image-caption pairs
    stage 3 instruction   same, "###Human: ... ###Assistant:" prompts     detailed descriptions
    stage 4 multi-task    same, "[INST] [task] ... [/INST]", 2x image     VQA, refer, identify, ...
The official code also trained LoRA in stage 1 (a config default); this file follows the paper.
Real weights (--phi2/--blip2) follow the paper's table; demo.py's stand-ins the demo's (minutes on a CPU).

Notable features: AdamW with decay only on >= 2-D tensors, linear warm-up then cosine per step, gradient
accumulation and clipping, activation checkpointing, frozen weights in bf16 where the device computes in
bf16, exact resume (weights, optimizer, step, data order, RNG), a NaN guard.
"""

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import demo
import fastpaths
import loader
import runs
import scoring
import tinygptv as tg
from cli import ArgumentParser, at_least, check_real_weights, device_option, dropout_rate, mixture_item, run_cli
from layouts import init_projections, load_model
from lora import mark_trainable

# -----------------------------------------------------------------------------
# The stage table and the learning-rate schedule


@dataclass
class StageConfig:
    lr: float  # peak learning rate, after warm-up
    min_lr: float  # the cosine ends here
    warmup: int  # steps of linear warm-up from warmup_start_lr
    steps: int
    batch_size: int
    lora: bool
    warmup_start_lr: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    dropout: float = None  # every dropout (Phi-2 residual, LoRA); None keeps the model's (0.1, 0.05)


# The official configs (docs/PAPER.md section 7). Stage 4 "1e-5 -> 8e-5" is the official file's
# own (sic): its min_lr is above its peak. Kept as written, for the record.
PAPER_STAGES = {
    1: StageConfig(lr=1e-4, min_lr=8e-5, warmup=1000, steps=5000, batch_size=64, lora=False),
    2: StageConfig(lr=1e-4, min_lr=8e-5, warmup=5000, steps=20000, batch_size=64, lora=True),
    3: StageConfig(lr=3e-5, min_lr=1e-5, warmup=200, steps=1000, batch_size=6, lora=True),
    4: StageConfig(lr=1e-5, min_lr=8e-5, warmup=1000, steps=50000, batch_size=3, lora=True),
}
# The demo's stand-ins train in minutes, so its stages take fewer steps at higher learning rates,
# and no dropout: a few hundred steps over 5,000 scenes leave little to regularize. Stage 4, whose
# scores rise the longest, gets most of the steps (docs/LOG.md has the measurements behind them).
DEMO_STAGES = {
    1: StageConfig(lr=2e-3, min_lr=2e-4, warmup=20, steps=200, batch_size=32, lora=False, dropout=0.0),
    2: StageConfig(lr=2e-3, min_lr=2e-4, warmup=20, steps=170, batch_size=32, lora=True, dropout=0.0),
    3: StageConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=100, batch_size=16, lora=True, dropout=0.0),
    4: StageConfig(lr=4e-3, min_lr=1e-4, warmup=30, steps=1200, batch_size=32, lora=True, dropout=0.0),
}


def warmup_cosine(step, steps, peak, warmup, end=0.0, start=0.0):
    """The learning rate at `step`: linear warm-up from `start` to `peak`, then a cosine from `peak`
    to `end` at `steps`, stepped per iteration as the official configs do (docs/PAPER.md section 7)."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def lr_at(step, sc: StageConfig):
    return warmup_cosine(step, sc.steps, sc.lr, sc.warmup, end=sc.min_lr, start=sc.warmup_start_lr)


def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def log(*a):
    if world()[0] == 0:
        print(*a, flush=True)


# -----------------------------------------------------------------------------
# The model and the data of a stage


def stage_path(args, stage):
    return os.path.join(args.out, f"stage{stage}.safetensors")


def build_model(args, stage, report=True):
    """Backbones + the previous stage's checkpoint + LoRA from stage 2 on (stage 1 starts the stabilizer
    norms at 1: said unless report=False). Real projections are 4096 wide (the paper's), or the file's."""
    report = report and stage == 1
    if args.phi2:  # the paper's sizes: frozen weights in the device's compute dtype, 2 bytes each where bf16
        proj_dim = tg.config_from_checkpoint(stage_path(args, stage - 1))[0].proj_dim if stage > 1 else tg.TinyGPTVConfig.proj_dim
        model, _ = load_model(args.phi2, args.blip2, args.qformer, report=report, proj_dim=proj_dim,
                              dtype=fastpaths.compute_dtype(args.device, args.amp, real=True))
        tok = tg.load_tokenizer(args.phi2)
    else:
        model, tok = demo.load_backbones(args.out, report=report)
    if args.stages[stage].lora:
        model.add_lora()
    if stage > 1:  # a stage-1 file has no LoRA: stage 2's adapters then start fresh (B = 0)
        tg.load_checkpoint(model, stage_path(args, stage - 1))
    model.llama_model.grad_checkpointing = args.grad_checkpoint == "on" or (  # as the official stage 4 config
        args.grad_checkpoint == "auto" and stage == 4 and args.phi2 is not None)
    dropout = args.dropout if args.dropout is not None else args.stages[stage].dropout
    if dropout is not None:  # Phi-2's residual dropout (0.1) and LoRA's (0.05) otherwise
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
    mark_trainable(model, tg.is_trainable)
    for name, p in model.named_parameters():  # what trains, and AdamW's state with it, in fp32; vectors too,
        if p.requires_grad or p.dim() == 1:  # as a norm's weight (trained) and bias (frozen) share a dtype
            p.data = p.data.float()
    if stage == 1 and args.init_proj:  # the paper's start: MiniGPT-4's llama_proj, a Gaussian llama_proj2
        init_projections(model, args.init_proj)
    return model.to(args.device), tok


def stage_data(args, stage):
    """The stage's training samples, and order(step) -> the samples of that step: a user's files
    (--data: one, or a mixture drawn by weight) or the demo's."""
    sources = [data.load_dataset(path, args.image_root, decode=False) for path, _ in args.data] if args.data \
        else [demo.stage_samples(args.split, stage)]
    for (path, _), found in zip(args.data or [], sources):
        if not found:
            raise ValueError(f"--data {path}: no training samples in it")
    samples, bs, seed = [s for found in sources for s in found], args.stages[stage].batch_size, args.seed + stage
    if len(sources) == 1:
        return samples, lambda step: batch_indices(step, len(samples), bs, seed)
    sizes, weights = [len(found) for found in sources], [w for _, w in args.data]
    return samples, lambda step: loader.mixture_indices(step, sizes, weights, bs, seed)


def batch_indices(step, n, batch_size, seed):
    """The samples of global step `step`: a fresh seeded permutation per epoch, so that the data
    order is a pure function of the step and resuming needs only the step to continue it."""
    batch_size = min(batch_size, n)
    epoch, k = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def param_groups(model, weight_decay):
    """Weight decay on matrices only (nanoGPT, BLIP-2): decay toward zero regularizes a matrix, but a norm's
    weight at zero would switch its feature off and a bias has no scale to keep small."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def autocast(args):
    """The autocast every forward of a run takes, steps and tables alike (fastpaths.mixed_precision)."""
    return fastpaths.autocast(args.device, args.amp, real=args.phi2 is not None)


# -----------------------------------------------------------------------------
# One stage


def train_stage(args, stage):
    """Train one stage; returns (the loss of each step run here, whether the stage finished)."""
    sc = args.stages[stage]
    rank, nproc = world()
    if sc.batch_size // nproc < args.grad_accum:
        raise ValueError(f"--grad-accum {args.grad_accum}: more micro-batches than the {sc.batch_size // nproc} samples "
                         f"each of {nproc} process(es) gets per step; lower it or raise --batch-size")
    state_path = os.path.join(args.out, f"stage{stage}.state.pt")
    st = runs.saved_state(state_path, stage, runs.settings(args, stage), args.resume, args.restart)
    torch.manual_seed(args.seed + stage)
    model, tok = build_model(args, stage, report=st is None)
    samples, order = stage_data(args, stage)  # (a source without samples is refused there)
    held_out = data.load_dataset(args.eval_data, args.image_root) if args.eval_data else None  # bad files fail now
    examples = [tg.make_example(tok, stage, tg.stage_instruction(stage, s), s.answer) for s in samples]
    lengths = [len(e.before) + len(e.after) + len(e.answer) for e in examples]  # text tokens
    _, scaler = fastpaths.mixed_precision(args.device, args.amp, real=args.phi2 is not None)
    with autocast(args):
        queries, image_row = demo.encode_all(model, samples, stage, args.device) if args.cache_features else (None, None)
    trained = [p for p in model.parameters() if p.requires_grad]
    log(f"stage {stage} | {len(samples)} samples | training {sum(p.numel() for p in trained):,} parameters in "
        f"{len(trained)} tensors ({'projections, norms, LoRA' if sc.lora else 'projections, norms'})")

    table = args.eval and not args.data and not args.eval_data and rank == 0  # the demo's table, before and after
    with autocast(args):  # (measured before a resume loads the stage's later weights)
        before = demo.table_before(model, tok, args.out, stage, args.split, args.eval_samples) if table else {}
    opt = torch.optim.AdamW(param_groups(model, sc.weight_decay), lr=sc.lr, betas=(0.9, 0.999))
    net = nn.parallel.DistributedDataParallel(model) if nproc > 1 else model  # DDP all-reduces the gradients
    step = 0 if st is None else runs.restore(st, state_path, model, opt, scaler)
    if st is not None:
        log(f"stage {stage} | resumed at step {step} from {state_path}")

    def save_state():
        if rank == 0:
            runs.save_state(state_path, model, opt, scaler, step, asdict(sc), runs.settings(args, stage))

    model.train()
    batches = None if args.cache_features else iter(loader.stream(  # pictures decoded ahead, in workers
        samples, model.image_size(stage), order, step, sc.steps, rank, nproc, args.workers, args.device.startswith("cuda")))
    t0, done_here, seen, losses, waited, skipped = time.time(), 0, 0, [], 0.0, 0
    while step < sc.steps:
        # -- one optimizer step: this rank's share of the batch, in micro-batches, then AdamW --
        for group in opt.param_groups:
            group["lr"] = lr = lr_at(step, sc)
        if batches is None:  # this rank's share of the step's samples (and below, positions in it)
            idx, pixels = order(step)[rank::nproc], None
        else:
            t = time.time()
            idx, pixels, failed = next(batches)  # (the pictures that failed to decode are left out)
            waited, skipped = waited + time.time() - t, skipped + failed
        micro, weight = [list(range(len(idx)))[i::args.grad_accum] for i in range(args.grad_accum)], 1.0
        if nproc > 1 and not all(micro):  # a DDP rank left with fewer pictures than parts joins every backward
            idx, micro, weight = order(step)[rank::nproc][:1], [[0]] * args.grad_accum, 0.0  # on a black stand-in
            pixels = torch.zeros(1, 3, model.image_size(stage), model.image_size(stage), dtype=torch.uint8)  # counted 0
        n_answer = torch.tensor(float(sum(len(examples[i].answer) for i in idx)) * weight)
        if nproc > 1:  # normalize by the whole global batch's answer tokens, as one process would
            dist.all_reduce(n_answer)
        if nproc == 1:  # (every DDP rank must run as many backward passes as the others); none if all failed
            micro = [part for m in micro for part in loader.split_by_length(m, [lengths[i] for i in idx]) if part]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in micro:
            ex = [examples[idx[p]] for p in m]
            with autocast(args):
                if queries is not None:
                    logits, targets = net(ex, queries=queries[image_row[[idx[p] for p in m]]])
                else:
                    px = tg.normalize(pixels[m].to(args.device)).to(model.llama_proj.weight.dtype)
                    logits, targets = net(ex, pixel_values=px)
                # sum over tokens / global count: DDP averages over ranks, so scale by nproc
                loss = tg.lm_loss(logits, targets, reduction="sum") / n_answer.clamp(min=1) * nproc * weight
            scaler.scale(loss).backward()
            total += loss.item() / nproc
        if not math.isfinite(total):
            raise ValueError(f"stage {stage}: loss is {total} at step {step}; stopped without saving, the "
                             f"last good checkpoint ({state_path if os.path.isfile(state_path) else 'none yet'}) is intact")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trained, sc.grad_clip)
        scaler.step(opt)
        scaler.update()
        step += 1
        # -- the step's bookkeeping --
        losses.append(total)
        done_here += 1
        seen += len(idx) * nproc
        if step % args.log_every == 0 or step == sc.steps:
            dt = time.time() - t0
            fed = "" if batches is None else f" | data wait {100 * waited / dt:.0f}% | skipped {skipped} pictures"
            log(f"stage {stage} | step {step:5d}/{sc.steps} | loss {total:.4f} | lr {lr:.2e} | "
                f"{seen / dt:.1f} samples/s | ETA {dt / done_here * (sc.steps - step):.0f}s{fed}")
        if step % args.ckpt_every == 0 or step == sc.steps:
            save_state()
        if args.stop_after and done_here >= args.stop_after and step < sc.steps:
            save_state()
            log(f"stage {stage} | stopped after {done_here} steps as asked; `--resume` continues")
            return losses, False
    if rank == 0:
        tg.save_checkpoint(model, stage_path(args, stage), stage, {"tokenizer": tg.tokenizer_digest(tok)})
        log(f"stage {stage} | wrote {stage_path(args, stage)}")
        if held_out is not None or table:  # the user's held-out file, or the demo's scenes
            with autocast(args):
                demo.table_after(model, tok, args.out, stage, args.split, args.eval_samples, before, held_out, args.eval_data)
    return losses, True


def evaluate_stage(args, stage):
    """`--evaluate N`: the held-out table of stage N's finished checkpoint, nothing trained."""
    path = stage_path(args, stage)
    if args.data:
        raise ValueError(f"--evaluate {stage}: the held-out scenes are the demo's; it does not take --data")
    if not os.path.isfile(path):
        raise ValueError(f"--evaluate {stage}: no checkpoint {path}; train it first: python train.py --stage {stage}")
    demo.check_held_out(args.out, args.split)
    model, tok = build_model(args, stage, report=False)
    tg.load_checkpoint(model, path)
    with autocast(args):
        scoring.print_table(demo.table_title(stage), demo.evaluate(model, tok, args.split, stage, args.eval_samples), {})


# -----------------------------------------------------------------------------
# The stages in order, and the command line (runs.py keeps the run directory whole)


def train_stages(args):
    if args.stage == 0:  # regenerate the demo's shipped stand-in backbones
        return demo.retrain_shipped(args.split, warmup_cosine, args.lm_steps, args.vision_steps, args.eval, args.force)
    if not args.phi2 and world()[0] == 0:
        demo.prepare_backbones(args.out, args.split, warmup_cosine, not args.data, args.eval, args.lm_steps,
                               args.vision_steps)
    if dist.is_initialized():
        dist.barrier()
    wanted = [args.stage] if args.stage else [1, 2, 3, 4]
    for stage in range(1, max(wanted) + 1):
        finished = os.path.isfile(stage_path(args, stage))
        if finished and (stage not in wanted or not args.stage):
            log(f"stage {stage} | already finished: {stage_path(args, stage)}")
            continue
        if finished and not args.restart:
            raise ValueError(f"stage {stage} is finished ({stage_path(args, stage)}); --restart trains it again")
        if stage not in wanted:
            log(f"stage {stage} | needed by stage {args.stage} and missing: building it first")
        _, finished = train_stage(args, stage)
        args.resume = args.restart = False  # they speak of the interrupted stage; the next ones start fresh
        if not finished:  # stopped early on purpose (--stop-after)
            return
    if not args.data and world()[0] == 0:
        demo.write_example(args.out, args.split)
    if dist.is_initialized():  # no rank leaves (and tears the process group down) while another still works
        dist.barrier()


def parse_args(argv=None):
    count = at_least(1)
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3, 4), help="run only this stage (default: all; "
                   "0 trains the demo's stand-in backbones again, into demo_backbones/, with --force)")
    p.add_argument("--force", action="store_true", help="--stage 0: replace the shipped stand-in backbones")
    p.add_argument("--resume", action="store_true", help="continue the interrupted stage from its last step checkpoint")
    p.add_argument("--restart", action="store_true", help="start the interrupted stage over, discarding its steps")
    p.add_argument("--out", default=demo.DEMO_RUN)
    p.add_argument("--data", nargs="+", type=mixture_item, help="real data for the stage: caption pairs, "
                   "LLaVA, VQA or refexp JSON, or webdataset shards (a.tar, 'laion/{00000..00099}.tar'); several, "
                   "each FILE:WEIGHT, make a mixture drawn by weight (gqa.json:50 refcoco.json:25)")
    p.add_argument("--workers", type=at_least(0), default=2, help="processes that decode --data's pictures")
    p.add_argument("--image-root", help="folder the data file's image names are relative to")
    p.add_argument("--eval-data", help="a held-out file in any --data format, scored after the stage")
    p.add_argument("--phi2", help="a real Phi-2 directory (with tokenizer.json)")
    p.add_argument("--blip2", help="a real BLIP-2 directory or converted LAVIS file (ViT, ln_vision, Q-Former)")
    p.add_argument("--qformer", help="the Q-Former, if it is not in the --blip2 path")
    p.add_argument("--init-proj", help="stage 1: start llama_proj from MiniGPT-4's (converted) projection")
    p.add_argument("--recipe", choices=("paper", "demo"), help="the stage table: the paper's (the default with "
                   "--phi2/--blip2) or the demo's (the default on its stand-ins: fewer steps, higher rates)")
    p.add_argument("--paper", dest="recipe", action="store_const", const="paper", help="= --recipe paper")
    p.add_argument("--steps", type=count, help="override the stage's number of steps")
    p.add_argument("--batch-size", type=count, help="override the stage's global batch size")
    p.add_argument("--grad-accum", type=count, default=1, help="split each batch into this many micro-batches")
    p.add_argument("--ckpt-every", type=count, default=100)
    p.add_argument("--log-every", type=count, default=25)
    p.add_argument("--stop-after", type=count, help="stop after this many steps (resume later with --resume)")
    p.add_argument("--no-eval", dest="eval", action="store_false")
    p.add_argument("--eval-samples", type=count, default=300, help="held-out samples per task in each table")
    p.add_argument("--evaluate", type=int, choices=(1, 2, 3, 4), help="only score this finished stage")
    p.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dropout", type=dropout_rate, help="set every dropout (Phi-2 residual, LoRA) to this (the demo's "
                   "stages use 0, the paper's the model's own); 0 makes runs with different process counts comparable")
    p.add_argument("--grad-checkpoint", choices=("auto", "on", "off"), default="auto", help="recompute Phi-2's "
                   "activations in backward instead of storing them (auto: stage 4 on real weights, as the paper)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision "
                   "(auto: bf16 where the device computes in it at full speed, else fp16 on a GPU, fp32 on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo-train", type=count, default=560, help="demo scenes for training")
    p.add_argument("--demo-eval", type=count, default=300, help="demo scenes for validation and test, each")
    p.add_argument("--lm-steps", type=count, default=2500, help="stage 0: language-model steps")
    p.add_argument("--vision-steps", type=count, default=3000, help="stage 0: vision pretraining steps")
    a = p.parse_args(argv)
    check_real_weights(a)
    if a.stage == 0 and a.phi2:
        p.error("--stage 0 trains the demo's stand-ins; real runs start from --phi2 and --blip2 instead")
    if a.resume and a.restart:
        p.error("--resume and --restart exclude each other: continue the stage, or start it over")
    a.recipe = a.recipe or ("paper" if a.phi2 else "demo")  # real weights train as the paper did
    stages = PAPER_STAGES if a.recipe == "paper" else DEMO_STAGES
    a.stages = {k: replace(v, **({"steps": a.steps} if a.steps else {}), **({"batch_size": a.batch_size} if a.batch_size else {}))
                for k, v in stages.items()}
    a.split = demo.Split(a.seed, a.demo_train, a.demo_eval)
    a.cache_features = a.data is None  # the demo's images fit in memory; real data is streamed
    return a


def run(args):
    if "RANK" in os.environ and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if args.evaluate:
        return evaluate_stage(args, args.evaluate)
    os.makedirs(args.out, exist_ok=True)
    lock = runs.take_lock(args.out) if world()[0] == 0 else None
    try:
        train_stages(args)
    finally:
        if lock:
            os.remove(lock)


def main(argv=None):
    with runs.torchrun_exit():  # a torchrun worker's process group torn down, the process ended
        run_cli(lambda: run(parse_args(argv)),
                interrupted="interrupted: finished stages and the last step checkpoint are intact; `--resume` continues")


if __name__ == "__main__":
    main()
