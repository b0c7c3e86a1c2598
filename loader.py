"""Feeding a stage real data: pictures decoded in worker processes, in an order set by the step.

A reader of the paper may skip this file: train.py takes each step's batch from it when it trains
on a user's files (the demo's pictures are few and encoded once, up front). What it does:
- `Pictures`: sample i -> its picture as (H, W, 3) pixels at the stage's size, decoded and resized
  in a worker; a picture that fails to decode (a truncated JPEG) is skipped where it is met and
  counted, never decoded up front;
- `mixture_indices`: the samples of a step drawn from several sources by weight (the official stage 4
  samples its ~20 datasets by ratio), a pure function of the step like train.batch_indices, so a
  resumed run reads what the interrupted one would have, with any number of workers;
- `Collate`: a batch stacked into a ring of buffers shared with the training process once, not into
  new shared memory each time;
- `stream`: a DataLoader over the steps from `start` on, this rank's share of each batch only,
  prefetched by the workers, as (b, 3, H, W), in pinned memory for a GPU;
- `split_by_length`: a batch cut in two micro-batches that pad less than the whole.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

import data
import tinygptv as tg


class Pictures(Dataset):
    def __init__(self, samples, size):
        self.samples, self.size = samples, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """(step, i) -> (step, i, (size, size, 3) uint8 pixels as Pillow holds them), or (step, i, None) for
        a picture that cannot be read."""
        step, i = key
        try:
            return step, i, tg.resized(data.load_image(self.samples[i].image), self.size).permute(1, 2, 0)
        except (ValueError, OSError):
            return step, i, None


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
            yield [(step, i) for i in self.order(step)[self.rank::self.nproc]]


class Collate:
    """A batch's pictures stacked (b, H, W, 3). In a worker they go into the step's slot of `slots`, a
    ring of batch buffers in memory shared with the training process before the workers start: a
    batch in new shared memory (what a DataLoader does by default) makes the kernel supply every
    page twice, once to the worker and once to the training process, and on a virtual machine that
    can cost a third of the decoding (bench.py section 7 measures it)."""

    def __init__(self, slots=None):
        self.slots = slots

    def __call__(self, items):
        """-> (step, the sample indices whose pictures decoded, their pixels or None where they are in
        the step's slot, how many failed)."""
        step = items[0][0]
        kept = [(i, x) for _, i, x in items if x is not None]
        if not kept:
            return step, [], None, len(items)
        slot = self.slots is not None and get_worker_info() is not None and len(kept) <= self.slots.shape[1]
        out = self.slots[step % len(self.slots), :len(kept)].numpy() if slot else None
        pixels = torch.from_numpy(np.stack([x.numpy() for _, x in kept], out=out))  # numpy: see stream
        return step, [i for i, _ in kept], None if slot else pixels, len(items) - len(kept)


def stream(samples, size, order, start, steps, rank=0, nproc=1, workers=2, pin=False, prefetch=4):
    """Each step's (indices, uint8 pixels (b, 3, H, W) or None, how many failed) from `start` on;
    `workers` processes decode `prefetch` batches each ahead of the training process (0: it decodes
    them itself), in pinned memory for a GPU with `pin`."""
    slots = None
    if workers and start < steps:  # at most workers * prefetch batches are out at once, so one more
        # slot than that is never written while the training process copies a batch out of it
        share = len(order(start)[rank::nproc])
        slots = torch.empty(workers * prefetch + 1, share, size, size, 3, dtype=torch.uint8).share_memory_()
    batches = DataLoader(Pictures(samples, size), batch_sampler=StepBatches(order, start, steps, rank, nproc),
                         num_workers=workers, collate_fn=Collate(slots), prefetch_factor=prefetch if workers else None,
                         generator=torch.Generator())  # its own: the global one is dropout's, which a resume restores
    for step, idx, pixels, failed in batches:
        if pixels is None and idx:  # copied out of its slot before the DataLoader is asked for more, by
            # numpy: one thread, where torch's copy wakes OpenMP threads that then spin for a while on
            # the cores the workers decode on (2 workers reached 1.3x one process instead of 1.8x)
            pixels = torch.from_numpy(slots[step % len(slots), :len(idx)].numpy().copy())
        if pixels is not None:
            pixels = (pixels.pin_memory() if pin else pixels).permute(0, 3, 1, 2)
        yield idx, pixels, failed


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
