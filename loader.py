"""Feeding a stage real data: pictures decoded in worker processes, in an order set by the step.

A reader of the paper may skip this file: train.py takes each step's batch from it when it trains
on a user's files (the demo's pictures are few and encoded once, up front). What it does:
- `Pictures`: sample i -> its picture as (3, H, W) pixels at the stage's size, decoded and resized
  in a worker; a picture that fails to decode (a truncated JPEG) is skipped where it is met and
  counted, never decoded up front;
- `mixture_indices`: the samples of a step drawn from several sources by weight (the official stage 4
  samples its ~20 datasets by ratio), a pure function of the step like train.batch_indices, so a
  resumed run reads what the interrupted one would have, with any number of workers;
- `stream`: a DataLoader over the steps from `start` on, this rank's share of each batch only,
  prefetched by the workers, in pinned memory for a GPU;
- `split_by_length`: a batch cut in two micro-batches that pad less than the whole.
"""

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

import data
import tinygptv as tg


class Pictures(Dataset):
    def __init__(self, samples, size):
        self.samples, self.size = samples, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        """-> (i, (3, size, size) uint8 pixels: tg.normalize makes them the model's), or (i, None) for a
        picture that cannot be read."""
        try:
            return i, tg.resized(data.load_image(self.samples[i].image), self.size)
        except (ValueError, OSError):
            return i, None


def mixture_indices(step, sizes, weights, batch_size, seed):
    """The samples of step `step` from sources of `sizes` (concatenated, in order) with `weights`: each
    draws its source by weight, then a sample of it at random, from a generator seeded by the step."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    source = torch.multinomial(torch.tensor(weights, dtype=torch.float64), batch_size, replacement=True, generator=g)
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    within = (torch.rand(batch_size, generator=g, dtype=torch.float64) * torch.tensor(sizes)[source]).long()
    return (starts[source] + within).tolist()


class StepBatches(Sampler):
    """The indices of each step from `start` to `steps`, this rank's share: order(step)[rank::nproc]."""

    def __init__(self, order, start, steps, rank=0, nproc=1):
        self.order, self.start, self.steps, self.rank, self.nproc = order, start, steps, rank, nproc

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield self.order(step)[self.rank::self.nproc]


def collate(items):
    """-> (the batch's sample indices whose pictures decoded, their uint8 pixels (b, 3, H, W) or None,
    how many failed)."""
    kept = [(i, x) for i, x in items if x is not None]
    pixels = default_collate([x for _, x in kept]) if kept else None  # in a worker: stacked into shared memory
    return [i for i, _ in kept], pixels, len(items) - len(kept)


def stream(samples, size, order, start, steps, rank=0, nproc=1, workers=2, pin=False):
    """Each step's (indices, pixels, failed) from `start` on; `workers` processes decode ahead of the
    training process (0: it decodes them itself)."""
    return DataLoader(Pictures(samples, size), batch_sampler=StepBatches(order, start, steps, rank, nproc),
                      num_workers=workers, collate_fn=collate, pin_memory=pin, prefetch_factor=4 if workers else None,
                      generator=torch.Generator())  # its own: the global one is dropout's, which a resume restores


def split_by_length(idx, lengths):
    """Two micro-batches that together are the batch idx, sorted by token length and cut where the
    padding is least: the loss is a sum over answer tokens, so the update is the batch's own, only
    cheaper (stage 4's few ~100-token [grounding] samples padded its ~71-token batches to 1.39x the
    real tokens; split, 1.06x)."""
    if len(idx) < 2:
        return [idx]
    idx = sorted(idx, key=lambda i: lengths[i])
    n, L = len(idx), [lengths[i] for i in idx]
    cut = min(range(1, n), key=lambda c: c * L[c - 1] + (n - c) * L[-1])  # padded tokens of the two parts
    return [idx[:cut], idx[cut:]]
