"""Batches of tokenised examples: dynamic padding, the training order (seeded, shardable, resumable), dev order."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from squat_cli.data import Encoded
from squat_cli.errors import DataError


class EncodedDataset(Dataset):
    def __init__(self, enc: Encoded):
        self.enc = enc

    def __len__(self) -> int:
        return len(self.enc)

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.enc.offsets[i]), int(self.enc.offsets[i + 1])
        item = {"input_ids": self.enc.ids[a:b], "labels": self.enc.labels[i]}
        if self.enc.type_ids is not None:
            item["token_type_ids"] = self.enc.type_ids[a:b]
        return item


class Collator:
    """Pads a list of examples to the longest one in the batch (dynamic padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        n = len(items)
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((n, width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((n, width), dtype=torch.int64)
        has_types = "token_type_ids" in items[0]
        types_ = torch.zeros((n, width), dtype=torch.int64) if has_types else None
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            ids[r, :k] = it["input_ids"]
            mask[r, :k] = 1
            if has_types:
                types_[r, :k] = it["token_type_ids"]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([it["labels"] for it in items])}
        if has_types:
            batch["token_type_ids"] = types_
        return batch


class EpochSampler(Sampler[int]):
    """Data order as a pure function of ``seed + epoch``, shared by every process.

    The global order is cut into global batches of ``batch_size``; process
    ``rank`` of ``world`` takes its contiguous slice of each (so N processes see
    exactly the batches one process would). With several processes the last
    global batch is filled up from the start of the order, so every process
    runs the same number of steps. ``start_batch`` skips batches already done
    (resuming mid-epoch). With ``lengths`` given, global batches group examples
    of similar length (less padding).
    """

    def __init__(self, n: int, seed: int, batch_size: int, lengths: Optional[list[int]] = None,
                 rank: int = 0, world: int = 1):
        if batch_size % world:
            raise DataError(f"train.batch_size {batch_size} is not divisible by the {world} processes")
        self.n, self.seed, self.batch_size, self.lengths = n, seed, batch_size, lengths
        self.rank, self.world = rank, world
        self.epoch = 0
        self.start_batch = 0

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is not None:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return list(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=g))
        return torch.randperm(self.n, generator=g).tolist()

    def local_order(self) -> list[int]:
        order = self.global_order()
        if self.world == 1:
            return order
        short = -len(order) % self.batch_size
        order = order + (order * (short // max(len(order), 1) + 1))[:short]
        lb = self.local_batch
        return [i for c in range(0, len(order), self.batch_size)
                for i in order[c + self.rank * lb: c + (self.rank + 1) * lb]]

    def __len__(self) -> int:
        return len(self.local_order()) - self.start_batch * self.local_batch

    def __iter__(self) -> Iterator[int]:
        return iter(self.local_order()[self.start_batch * self.local_batch:])


def train_loader(enc: Encoded, batch_size: int, seed: int, pad_id: int, group_by_length: bool = False,
                 rank: int = 0, world: int = 1) -> DataLoader:
    """Training batches; ``batch_size`` is the global batch, each of ``world`` processes gets its share."""
    lengths = enc.lengths.tolist() if group_by_length else None
    sampler = EpochSampler(len(enc), seed, batch_size, lengths, rank, world)
    # a private generator: creating an iterator must not draw from the global RNG (exact resume)
    return DataLoader(EncodedDataset(enc), batch_size=sampler.local_batch, sampler=sampler,
                      collate_fn=Collator(pad_id), generator=torch.Generator())


def eval_loader(enc: Encoded, batch_size: int, pad_id: int) -> tuple[DataLoader, torch.Tensor]:
    """Dev batches sorted by length (less padding) and the order used: batch row j is example ``order[j]``."""
    order = torch.argsort(enc.lengths, descending=True, stable=True)
    return DataLoader(
        EncodedDataset(enc.select(order.numpy())), batch_size=batch_size, shuffle=False, collate_fn=Collator(pad_id)
    ), order
