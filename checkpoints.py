"""Reading and writing safetensors checkpoints, shared by phi2.py, vit.py and qformer.py.

The three components import nothing of each other; each imports this leaf module instead of keeping
its own copy of the same loader. Its jobs:
- `open_safetensors`: open a checkpoint lazily (one file, a directory, or a sharded directory as
  transformers writes real downloads), so a loader can check names and shapes before reading data;
- `StrictReader`: hand out a checkpoint's tensors one at a time, checking each name and shape, and
  refuse whatever is left over, so a renamed or missing key is an error naming it and never a
  silently random weight (the official code's users met that: docs/PAPER.md section 10); its
  `load` fills a model module by module and can convert each one as it arrives (int8.py quantizes
  Phi-2's Linear layers that way, so no full-precision copy of them is ever held);
- `read_json` and `check_overrides`: the config side of the same strictness;
- `write_atomically`: write a file so that an interruption never leaves a half-written checkpoint.
"""

import ctypes
import dataclasses
import functools
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

# safetensors' names of the dtypes it stores -> torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def open_safetensors(path):
    """Open a checkpoint lazily: a directory holding model.safetensors, or shards listed in
    model.safetensors.index.json, or a single .safetensors file. Returns {key: (open file, path)};
    tensors are read only when asked for. Missing paths raise FileNotFoundError, a corrupt file or
    index ValueError, each with a one-line message naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if os.path.isdir(path):
        single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: its weight_map should map each tensor name to a shard file name")
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError(f"{path}: holds neither model.safetensors nor model.safetensors.index.json")
    else:
        files = [path]
    tensors = {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: checkpoint shard not found")
        try:
            handle = safe_open(file, framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:  # truncated or not safetensors at all
            raise ValueError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        for key in keys:
            if key in tensors:
                raise ValueError(f"{file}: tensor '{key}' is also in {tensors[key][1]}")
            tensors[key] = (handle, file)
    return tensors


@functools.cache  # once per process
def free_promptly():
    """Have glibc's malloc hand every block of 4 MB or more straight to the OS when it is freed. By
    default it keeps freed blocks of up to 32 MB in its heap for reuse, and loading tensor by tensor
    frees thousands of them between the ones it keeps, so the heap fragments: after Phi-2 loaded in
    int8 (2.9 GB of weights) the process held 5.5 GB, 2.3 GB of it freed memory never returned, and
    peaked at 7.2 GB on the way (measured). int8.py's packing calls it too. Elsewhere than glibc
    this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD: fixed at 4 MB
    except (OSError, AttributeError):
        pass


class StrictReader:
    """The tensors of an opened checkpoint ({key: (handle, file)}, as open_safetensors returns),
    read one by one: `take(key, shape)` reads one tensor, converted to `dtype` on `device`, and
    removes it from the pool; `finish()` then refuses any tensor nobody took. Reading tensor by
    tensor into a model built on the meta device means no second copy of the weights is held.

    The bytes are read with plain file reads, not through safetensors' memory map: the pages of a
    mapped file count in the process's resident set for as long as the file stays open, so every
    shard read through the map would add its whole size to the peak memory (1.0 GB for a 1 GB file,
    measured), on top of the weights it was read into."""

    def __init__(self, tensors, path, dtype, device):
        self.tensors, self.path, self.dtype, self.device = dict(tensors), path, dtype, device
        self.headers = {}  # file -> (where its data starts, its JSON header)

    def __contains__(self, key):
        return key in self.tensors

    def keys(self):
        return list(self.tensors)

    def drop(self, keys):
        """Leave these tensors unread (another part of the model reads them, or nothing does)."""
        for k in keys:
            del self.tensors[k]

    def shape(self, key):
        return tuple(self.tensors[key][0].get_slice(key).get_shape())

    def take(self, key, shape, hint=""):
        if key not in self.tensors:
            raise ValueError(f"{self.path}: missing tensor '{key}'{hint}")
        handle, file = self.tensors.pop(key)
        try:
            found = tuple(handle.get_slice(key).get_shape())
            if found != tuple(shape):
                raise ValueError(f"{file}: tensor '{key}' has shape {found}, expected {tuple(shape)}")
            return self.read(file, key).to(device=self.device, dtype=self.dtype)
        except (SafetensorError, OSError, KeyError) as e:
            raise ValueError(f"{file}: cannot read tensor '{key}' ({str(e).splitlines()[0]})") from None

    def read(self, file, key):
        """One tensor as stored: the safetensors layout is 8 bytes of header length, a JSON header
        giving each tensor's dtype, shape and byte range, then the bytes."""
        if file not in self.headers:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                self.headers[file] = (8 + n, json.loads(f.read(n)))
        start, header = self.headers[file]
        entry = header[key]
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        with open(file, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory, no copy
        if got != end - begin:
            raise ValueError(f"{file}: cannot read tensor '{key}' (the file ends {end - begin - got} bytes early)")
        return t

    def load(self, model, read, convert=None):
        """Fill `model`, built on the meta device, module by module, then finish(). read(name, p)
        returns the tensor for parameter `name` (as model.state_dict() names it; p is its meta
        placeholder). convert(name, module), if given, sees each module as soon as its own tensors
        are in and returns what takes its place: itself, or a replacement such as int8.py's
        Int8Linear, so at most one layer's weights are ever held at full precision."""
        free_promptly()
        for prefix in [name for name, _ in model.named_modules()]:  # names only: a replaced module is freed
            module = model.get_submodule(prefix)
            for name, p in list(module.named_parameters(recurse=False)):
                t = read(f"{prefix}.{name}" if prefix else name, p)
                setattr(module, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
            new = module if convert is None or not prefix else convert(prefix, module)  # the root stays
            if new is not module:
                parent, _, child = prefix.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
        self.finish()

    def finish(self):
        if self.tensors:
            names = sorted(self.tensors)
            raise ValueError(f"{self.tensors[names[0]][1]}: unexpected tensor '{names[0]}' ({len(names)} unexpected "
                             f"in all: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")


def read_json(file):
    """A config file as a dict, or a one-line ValueError naming the file."""
    try:
        with open(file) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return d


def check_overrides(overrides, config_class):
    """from_pretrained's keyword overrides must be fields of the component's config dataclass."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} fields in overrides: {', '.join(sorted(unknown))}")


def read_state(path, settings, device="cpu"):
    """A training state file (torch.save of tensors and plain containers, read weights-only, never
    code), checked: its fields are there and the settings it was trained with ({option: value})
    equal `settings`. -> the state dict, or a one-line ValueError naming the file or the option."""
    try:
        st = torch.load(path, map_location=device, weights_only=True)
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


def write_json(d, file):
    with open(file, "w") as f:
        json.dump(d, f, indent=2)


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


def write_atomically(final, write):
    """write(tmp) into a temporary file beside `final`, then rename it over `final` in one step."""
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def take_lock(out):
    """One writer per run directory: two train.py processes on one --out would each overwrite the
    other's checkpoints. The lock file `.lock` holds the PID; a lock whose process is gone is taken
    over, and so are the temporaries its killed writes left behind. -> the lock's path, to remove."""
    path = os.path.join(out, ".lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and pid_alive(int(text)):
                raise ValueError(f"{out} is in use by another train.py (pid {text}); wait for it to finish, "
                                    "or train into another --out") from None
            os.remove(path)  # its process is gone
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    for tmp in remove_stale_temporaries(out, pid_alive):
        print(f"removed {tmp}, left by an interrupted write", flush=True)
    return path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
