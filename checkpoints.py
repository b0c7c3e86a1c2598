"""Reading and writing safetensors checkpoints, shared by phi2.py, vit.py and qformer.py.

The three components import nothing of each other; each imports this leaf module instead of keeping
its own copy of the same loader. Its jobs:
- `open_safetensors`: open a checkpoint lazily (one file, a directory, or a sharded directory as
  transformers writes real downloads), so a loader can check names and shapes before reading data;
- `StrictReader`: hand out a checkpoint's tensors one at a time, checking each name and shape, and
  refuse whatever is left over, so a renamed or missing key is an error naming it and never a
  silently random weight (the official code's users met that: docs/PAPER.md section 10);
- `read_json` and `check_overrides`: the config side of the same strictness;
- `write_atomically`: write a file so that an interruption never leaves a half-written checkpoint.
"""

import dataclasses
import json
import os

from safetensors import SafetensorError, safe_open


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


class StrictReader:
    """The tensors of an opened checkpoint ({key: (handle, file)}, as open_safetensors returns),
    read one by one: `take(key, shape)` reads one tensor, converted to `dtype` on `device`, and
    removes it from the pool; `finish()` then refuses any tensor nobody took. Reading tensor by
    tensor into a model built on the meta device means no second copy of the weights is held."""

    def __init__(self, tensors, path, dtype, device):
        self.tensors, self.path, self.dtype, self.device = dict(tensors), path, dtype, device

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
            return handle.get_tensor(key).to(device=self.device, dtype=self.dtype)
        except SafetensorError as e:
            raise ValueError(f"{file}: cannot read tensor '{key}' ({str(e).splitlines()[0]})") from None

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


def write_json(d, file):
    with open(file, "w") as f:
        json.dump(d, f, indent=2)


def write_atomically(final, write):
    """write(tmp) into a temporary file beside `final`, then rename it over `final` in one step."""
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
