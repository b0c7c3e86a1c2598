"""Reading and writing safetensors checkpoints, shared by phi2.py, vit.py and qformer.py.

The three components import nothing of each other; each imports this leaf module instead of keeping
its own copy of the same loader. Two jobs:
- `open_safetensors`: open a checkpoint lazily (one file, a directory, or a sharded directory as
  transformers writes real downloads), so a loader can check names and shapes before reading data;
- `write_atomically`: write a file so that an interruption never leaves a half-written checkpoint.
"""

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
