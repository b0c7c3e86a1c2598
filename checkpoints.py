"""Reading and writing files strictly and safely: the leaf every other module reads weights through.

A reader of the paper may skip this file. Its jobs:
- `regular_file`: a path that is a readable file, or a one-line error saying what it is instead;
- `open_safetensors`: open a checkpoint lazily (one file, a directory, or a sharded directory as
  transformers writes real downloads), so a loader can check names and shapes before reading data;
- `StrictReader`: hand out a checkpoint's tensors one at a time, checking each name, shape and
  dtype, and refuse whatever is left over, so a renamed or missing key is an error naming it and
  never a silently random weight (the official code's users met that: docs/PAPER.md section 10).
  Its `load` fills a model built on the meta device module by module and can convert each module
  as it arrives (layouts.quantizer turns Phi-2's Linear layers into int8 that way). It is the one strictness check:
  downloads, stage checkpoints and a resumed run's saved weights all go through it;
- `config_file`, `read_json`: a checkpoint's config, a data file or JSON lines, with one-line
  errors naming the file;
- `free_promptly`, `reuse_freed_memory`: glibc's malloc set for loading (large freed blocks handed
  back) and then for answering (freed blocks reused);
- `output_file`: the one refusal rule for what a command writes (nothing replaced without --force);
- `save_aligned`: a safetensors file whose tensors a memory map hands out aligned;
- `write_atomically`, `write_folder_atomically`, `write_json`: a write that an interruption or a full
  disk never leaves half done, with the same permissions for every file.
"""

import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open

# safetensors' names of the dtypes it stores -> torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def regular_file(path, what="file"):
    """`path`, if it is a file that can be read; else a one-line error that says what it is instead
    (a directory, a FIFO or a device would block, or fail deep inside whatever reads it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a {what}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: is not a regular file (a FIFO or a device?), not a {what}")
    return path


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
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: its weight_map should map each tensor name to a shard file name")
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError(f"{path}: holds neither model.safetensors nor model.safetensors.index.json")
    else:
        files = [path]
    tensors = {}
    for file in files:
        regular_file(file, "checkpoint file")
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


def config_file(path):
    """A checkpoint's config.json: in its directory, which must have one, or beside a single file (None
    if there is none there). A missing path is a FileNotFoundError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    file = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.isfile(file):
        return file
    if os.path.isdir(path):
        raise FileNotFoundError(f"{file} not found: a checkpoint directory needs its config.json")
    return None


@functools.cache  # once per process
def free_promptly():
    """Have glibc's malloc hand every block of 4 MB or more straight to the OS when it is freed. By
    default it keeps freed blocks of up to 32 MB in its heap for reuse, and loading tensor by tensor
    frees thousands of them between the ones it keeps, so the heap fragments: after Phi-2 loaded in
    int8 (2.9 GB of weights) the process held 5.5 GB, 2.3 GB of it freed memory never returned, and
    peaked at 7.2 GB on the way (measured). int8.py's packing calls it too."""
    mallopt(M_MMAP_THRESHOLD=4 << 20)  # fixed at 4 MB


def reuse_freed_memory():
    """Once a model is loaded, for answering: have glibc's malloc keep freed blocks of up to 32 MB in
    its heap and not hand the heap's top back, so each forward's activations take the memory the last
    one freed instead of fresh pages from the kernel. At 448 px the vision tower's GELU took 22 ms a
    block on fresh pages against 0.9 ms, the whole tower 4.1-4.5 s against 3.6-3.8 s, on the 2-core
    EPYC VM (docs/LOG.md, 2026-12-05). free_promptly sets its own once per process, so a load after
    this one runs with these settings."""
    mallopt(M_MMAP_THRESHOLD=32 << 20, M_TRIM_THRESHOLD=1 << 30)  # up to 1 GB free at the heap's top kept


def mallopt(**settings):
    """glibc's mallopt for each setting, by its name in malloc.h; elsewhere than glibc, nothing."""
    codes = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}
    try:
        libc = ctypes.CDLL("libc.so.6")
        for name, value in settings.items():
            libc.mallopt(codes[name], value)
    except (OSError, AttributeError):
        pass


class StrictReader:
    """Tensors read one by one: `take(key, shape)` returns one, converted to `dtype` (None: as
    stored) on `device`, and removes it from the pool; `finish()` then refuses any tensor nobody
    took. The pool is an opened checkpoint ({key: (handle, file)}, as open_safetensors returns) or
    tensors already in memory ({key: tensor}); `path` names it in errors.

    A file's bytes are read with plain file reads, not through safetensors' memory map: the pages of
    a mapped file count in the process's resident set for as long as the file stays open, so every
    shard read through the map would add its whole size to the peak memory (1.0 GB for a 1 GB file,
    measured), on top of the weights it was read into."""

    def __init__(self, tensors, path, dtype=None, device="cpu", integers=False):
        self.tensors, self.path, self.dtype, self.device = dict(tensors), path, dtype, device
        self.integers = integers  # int8 weights are expected (a quantized model's file)
        self.headers = {}  # file -> (where its data starts, its JSON header)

    def __contains__(self, key):
        return key in self.tensors

    def take(self, key, shape, hint=""):
        if key not in self.tensors:
            raise ValueError(f"{self.path}: missing tensor '{key}'{hint}")
        source = self.tensors.pop(key)
        if isinstance(source, torch.Tensor):
            t, where = source, self.path
        else:
            handle, where = source
            try:
                t = self.read(where, key)
            except (SafetensorError, OSError, KeyError) as e:
                raise ValueError(f"{where}: cannot read tensor '{key}' ({str(e).splitlines()[0]})") from None
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point() and not self.integers:  # weights are floats: an integer tensor is some other file's
            raise ValueError(f"{where}: tensor '{key}' is {t.dtype}, not a floating-point tensor")
        return t.to(device=self.device, dtype=self.dtype or t.dtype)

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
        returns the tensor for parameter or buffer `name` (as model.state_dict() names it; p is its
        meta placeholder). convert(name, module), if given, sees each module as soon as its own tensors
        are in and returns what takes its place: itself, or a replacement such as int8.py's
        Int8Linear, so at most one layer's weights are ever held at full precision."""
        free_promptly()
        for prefix in [name for name, _ in model.named_modules()]:  # names only: a replaced module is freed
            module = model.get_submodule(prefix)
            for name, p in list(module.named_parameters(recurse=False)):
                t = read(f"{prefix}.{name}" if prefix else name, p)
                setattr(module, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):  # (int8.Int8Linear's weights)
                if name not in module._non_persistent_buffers_set:
                    setattr(module, name, read(f"{prefix}.{name}" if prefix else name, b))
            new = module if convert is None or not prefix else convert(prefix, module)  # the root stays
            if new is not module:
                parent, _, child = prefix.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
        self.finish()
        return model

    def finish(self):
        if self.tensors:
            names = sorted(self.tensors)
            first = self.tensors[names[0]]
            where = self.path if isinstance(first, torch.Tensor) else first[1]
            raise ValueError(f"{where}: unexpected tensor '{names[0]}' ({len(names)} unexpected "
                             f"in all: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")


def check_overrides(overrides, config_class):
    """from_pretrained's keyword overrides must be fields of the component's config dataclass."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} fields in overrides: {', '.join(sorted(unknown))}")


def read_json(path, kind=dict):
    """The `kind` (dict or list; None: either) a JSON file holds, or, for JSON lines (a .jsonl file,
    or several lines of which the first is a whole object), a list of (line number, record). One-line
    errors name the file, and the line of bad JSON."""
    regular_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    filled = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if str(path).endswith(".jsonl") or (len(filled) > 1 and _is_json_object(filled[0][1])):
        if kind is dict:
            raise ValueError(f"{path}: expected a JSON object, found JSON lines")
        records = []
        for n, line in filled:
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: bad JSON ({e.msg}, column {e.colno})") from None
        return records
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: bad JSON ({e.msg}, column {e.colno})") from None
    if kind is not None and not isinstance(obj, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}, found {type(obj).__name__}")
    return obj


def _is_json_object(line):
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def file_digest(path):
    """The SHA-256 of a file's bytes, hex: what ties a derived file (a stage's table) to its source."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(d, file):
    with open(file, "w") as f:
        json.dump(d, f, indent=2)


def output_file(path, force, what="the output"):
    """The one rule for a file a command is asked to write: into a folder that exists, not over a
    folder, and not over a file that exists unless `force` (--force) says so: nothing a user has is
    replaced by accident. -> path, or a one-line error naming it."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; give {what} a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such directory for {what} {os.path.basename(path)}")
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} exists; pass --force to replace it with {what}")
    return path


def save_aligned(tensors, path, metadata, align=64):
    """A safetensors file whose tensors start on `align`-byte boundaries, where their sizes allow, so
    that a memory map hands torch's kernels aligned tensors (_weight_int8pack_mm crashed on an int8
    weight 1 byte off). The format lets the header end in spaces, and the data may come in any
    order: the header is padded to a multiple of `align`, tensors whose bytes are a multiple of it
    come first, the rest after, larger elements first (each still aligned to its element size)."""
    size = lambda k: tensors[k].numel() * tensors[k].element_size()
    order = sorted(tensors, key=lambda k: (size(k) % align != 0, -tensors[k].element_size(), k))
    names = {dtype: name for name, dtype in DTYPES.items()}
    for k, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{path}: tensor '{k}' is {t.dtype}, which this writer does not store")
    header, offset = {"__metadata__": metadata}, 0
    for k in order:
        header[k] = {"dtype": names[tensors[k].dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + size(k)]}
        offset += size(k)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in order:
            f.write(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_atomically(final, write):
    """write(tmp) into a temporary file beside `final`, then rename it over `final` in one step, so
    an interruption or a full disk leaves `final` as it was. The file gets the permissions any new
    file gets here (the umask's), whatever the writer used; a failed write is one OSError naming
    `final` (torch and safetensors report a full disk in their own exception types)."""
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise cannot_write(final, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cannot_write(final, e, more=""):
    """A failed write (OSError; torch's RuntimeError or safetensors' own error for a full disk) as
    one OSError naming `final`."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
    return OSError(f"{final}: cannot write it ({reason}){more}")


def write_folder_atomically(final, write):
    """write(tmp) into a temporary folder beside `final`, then put it in `final`'s place, so that a
    folder of files that belong together (a set of backbones) is never left half old, half new. An
    older `final` is kept aside until the new one is in place, and put back if the process was
    stopped between the two renames (`recover_folder`)."""
    tmp, old = f"{final}.tmp{os.getpid()}", f"{final}.old{os.getpid()}"
    recover_folder(final)
    parent, name = os.path.split(os.path.abspath(final))
    for left in os.listdir(parent) if os.path.isdir(parent) else []:  # a killed writer's folders
        m = re.fullmatch(re.escape(name) + r"\.(?:tmp|old)(\d+)", left)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, left), ignore_errors=True)
    try:
        write(tmp)
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise cannot_write(final, e, "; it is as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(final)  # stopped between the renames: the old one goes back
        shutil.rmtree(old, ignore_errors=True)  # (only there when the new one is in place)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def recover_folder(final):
    """Put back a folder that write_folder_atomically moved aside and was stopped before replacing."""
    parent, name = os.path.split(os.path.abspath(final))
    if os.path.exists(final) or not os.path.isdir(parent):
        return
    for aside in sorted(os.listdir(parent)):
        if re.fullmatch(re.escape(name) + r"\.old\d+", aside):
            os.rename(os.path.join(parent, aside), final)
            return
