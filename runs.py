"""A training run's directory kept whole: one writer at a time, leftovers of a killed run cleared,
and an interrupted stage continued only as the run it was.

A reader of the paper may skip this file: train.py calls it around the stages. Its jobs:
- `take_lock`: one train.py per run directory, its PID in `.lock`; a dead holder's lock is taken
  over, and so are the temporaries its killed writes left behind;
- `settings`, `saved_state`, `restore`, `save_state`: the step checkpoint of an interrupted stage (weights,
  optimizer, step, RNG), written atomically and read weights-only, never as code, and refused when
  the settings it was trained with differ from the resumed run's;
- `torchrun_exit`: how a torchrun worker ends, once every file is written.
"""

import os
import re
import sys
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist

import tinygptv as tg
from checkpoints import pid_alive, write_atomically


def take_lock(folder, name=".lock"):
    """One writer per run directory: two train.py processes on one --out would each overwrite the
    other's checkpoints. The lock file holds the writer's PID and its process's start time; a lock
    whose process is gone, or is another process under the same PID (a container's PID 1 after a
    restart, or this very process), is taken over, and so are the temporaries its killed writes left
    behind (for the run directory's own lock). -> the lock's path, to remove."""
    path, mine = os.path.join(folder, name), os.path.join(folder, f"{name}.tmp{os.getpid()}")
    with open(mine, "w") as f:  # written whole first, then linked in: a lock is never seen empty
        f.write(f"{os.getpid()} {process_start(os.getpid())}")
    try:
        while True:
            try:
                os.link(mine, path)  # fails if a lock is there, as creating it exclusively would
                break
            except FileExistsError:
                try:
                    with open(path, errors="replace") as f:
                        text = f.read().split()
                except FileNotFoundError:  # its holder just let go
                    continue
                if holder_alive(text):
                    raise ValueError(f"{folder} is in use by another train.py (pid {text[0]}); wait for it to finish, "
                                     f"or train into another --out (if no train.py is running, delete {path})") from None
                os.remove(path)  # its process is gone
    finally:
        os.remove(mine)
    if name == ".lock":
        for tmp in remove_stale_temporaries(folder, pid_alive):
            print(f"removed {tmp}, left by an interrupted write", flush=True)
    return path


def holder_alive(words):
    """Whether a lock's words [pid, start time] name a live process other than this one. The start
    time tells a PID's process from a later one under the same number (a restarted container's PID
    1); a lock of PID alone (an older train.py's) counts only while that PID runs a train.py."""
    if not words or not words[0].isdigit() or int(words[0]) == os.getpid() or not pid_alive(int(words[0])):
        return False
    pid = int(words[0])
    if len(words) >= 2:
        started = process_start(pid)
        return started is None or started == words[1]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"train.py" in f.read()
    except OSError:  # no /proc to ask: alive
        return True


def process_start(pid):
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's 22nd field), or None
    where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def remove_stale_temporaries(folder, alive):
    """Delete the temporaries a killed write left: write_atomically's (their names end in the
    writer's PID, whose process `alive(pid)` says is gone) and safetensors' own `.tmpXXXXXX`, which
    save_file writes beside its target. Call it holding the folder's lock. -> the paths removed."""
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            m = re.fullmatch(r"\..+\.tmp(\d+)", name)
            ours = m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1)))
            if ours or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name):  # the second: safetensors' own temporary
                os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed


def settings(args, stage):
    """What a resumed run must share with the interrupted one: every option that changes what the rest
    of the stage trains, or it would silently become a third run."""
    sc = args.stages[stage]
    return {"--seed": args.seed, "--data": args.data, "--image-root": args.image_root, "--recipe": args.recipe,
            "--steps": sc.steps, "--batch-size": sc.batch_size, "--grad-accum": args.grad_accum,
            "--dropout": args.dropout if args.dropout is not None else sc.dropout, "--amp": args.amp,
            "--phi2": args.phi2, "--blip2": args.blip2, "--qformer": args.qformer, "--init-proj": args.init_proj,
            "--demo-train": args.demo_train, "--demo-eval": args.demo_eval}


def saved_state(path, stage, settings, resume, restart):
    """The interrupted stage's saved state to continue from, or None to start the stage fresh. A
    state file is never discarded without --restart, nor a fresh start taken for a resume, and it
    continues only a run with the same `settings` ({option: value})."""
    if not os.path.isfile(path):
        if resume:
            raise ValueError(f"--resume: nothing to resume for stage {stage} ({path} does not exist); "
                             "run without --resume")
        return None
    if not (resume or restart):
        raise ValueError(f"stage {stage} has an interrupted run's state ({path}): pass --resume to continue it "
                         "or --restart to start the stage over")
    return None if restart else read_state(path, settings)


def read_state(path, settings):
    """A training state file (torch.save of tensors and plain containers, read weights-only, never
    code), checked: its fields are there and the settings it was trained with ({option: value})
    equal `settings`. -> the state dict, or a one-line ValueError naming the file or the option."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)  # (RNG states must stay on the CPU)
    except Exception as e:  # truncated, garbage, or not a state file at all
        raise ValueError(f"{path}: cannot read the saved state ({str(e).splitlines()[0][:120]}); "
                         "--restart starts the stage over") from None
    keys = ("model", "optimizer", "scaler", "rng", "step")
    if not isinstance(st, dict) or any(k not in st for k in keys) or not isinstance(st["model"], dict):
        raise ValueError(f"{path}: not a train.py state file (expected {', '.join(keys)}); "
                         "--restart starts the stage over")
    for option, value in settings.items():
        was = st.get("settings", {}).get(option, value)
        if was != value:
            raise ValueError(f"--resume: {option} is {value} now but was {was} in the interrupted run; "
                             f"resume with the same {option}, or --restart")
    return st


def restore(st, path, model, opt, scaler):
    """Put a saved state back: the trained weights (as strictly as any checkpoint), the optimizer,
    the gradient scaler and the RNG, so dropout continues as if never stopped. -> the step reached."""
    tg.load_trained(model, st["model"], path)
    try:
        opt.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng"])
        if st.get("cuda_rng") and torch.cuda.is_available():  # dropout on a GPU draws from CUDA's generators
            torch.cuda.set_rng_state_all(st["cuda_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: its optimizer state does not fit this model ({e}); "
                         "--restart starts the stage over") from None
    return st["step"]


def save_state(path, model, opt, scaler, step, stage_config, settings):
    """The step checkpoint: what trains, the optimizer, the scaler, the RNG, the step and the settings
    a resume must share, written atomically (an interruption leaves the previous file whole)."""
    state = {"model": tg.trainable_state_dict(model), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "step": step, "stage_config": stage_config, "settings": settings}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


@contextmanager
def torchrun_exit():
    """Around train.py's main: a torchrun worker's process group torn down, its output flushed, then the
    process ended at once (os._exit, with the exit code it had) rather than by Python's own exit. There
    a gloo worker thread can still be dropping the last barrier's work while the interpreter finalizes;
    the drop takes the GIL, which a finalizing interpreter answers by ending the thread, and that unwind
    through a C++ destructor aborts a finished run (SIGABRT; 2 runs in 84 on a loaded 2-core CPU,
    docs/LOG.md 2026-12-05). A bug's traceback is printed as Python would, and the exit code is 1."""
    try:
        yield
        code = 0
    except BaseException as e:
        if not dist.is_initialized():
            raise
        if isinstance(e, SystemExit) and (e.code is None or isinstance(e.code, int)):
            code = e.code or 0  # run_cli's one-line failures (2), Ctrl-C (130), --help (0)
        else:
            traceback.print_exc()
            code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # (a closed pipe must not keep the process from ending)
                pass
        os._exit(code)
