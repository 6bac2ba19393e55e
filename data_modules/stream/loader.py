"""``StreamLoader``: a DataLoader over a ``CellStream`` whose state is the stream's cursor."""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.utils.data

from data_modules.batch import Batch
from data_modules.stream.dataset import CellStream, LoaderOptions
from data_modules.stream.plan import RankSchedule


# ------------------------------------------------------------------------------------------
# the loader: a DataLoader whose state is the stream's cursor (Lightning saves it)
# ------------------------------------------------------------------------------------------
def pin_batch(batch: Batch) -> Batch:
    """The batch with every tensor in page-locked memory (fast, asynchronous copies to the GPU)."""
    pinned = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            v = v.pin_memory()
        elif isinstance(v, dict):
            v = {k: t.pin_memory() for k, t in v.items()}
        pinned[f.name] = v
    return Batch(**pinned)


class StreamLoader(torch.utils.data.DataLoader):
    """DataLoader over a ``CellStream`` with ``state_dict``/``load_state_dict``.

    Lightning's fit loop saves ``state_dict()`` of stateful train dataloaders in checkpoints
    and calls ``load_state_dict`` before the first ``iter()`` on resume. ``consumer_lookahead``
    is the number of batches the consumer fetches ahead of the step it trains on; the state
    counts consumed batches, not fetched ones. Lightning 2.6 does not prefetch from loaders
    with a length (ours has one), so it is 0 there. A new ``iter()`` continues where the
    previous iteration stopped: the next epoch once an epoch has been consumed.
    """

    def __init__(
        self,
        stream: CellStream,
        num_workers: int = 0,
        consumer_lookahead: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ):
        kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
        # workers send compact EncodedCells (pickled, ~6 bytes a token) and this process pads them:
        # a third of the bytes of a padded batch and no shared-memory segment or fd per tensor
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=False, persistent_workers=False, **kwargs
        )
        self.pin_batches = bool(pin_memory) and torch.cuda.is_available()
        self.consumer_lookahead = int(consumer_lookahead)
        self._sched: RankSchedule | None = None
        self._yielded = 0
        self._exhausted = False

    def __iter__(self):
        stream: CellStream = self.dataset
        if self._sched is not None:  # continue where the previous iteration stopped (next epoch if it ended)
            stream.cursor = self._sched.cursor_after(self.consumed())
        stream.loader_options = LoaderOptions()  # resolve rank/world afresh below
        # workers may not see torch.distributed: pin rank/world now; workers send compact EncodedCells
        stream.loader_options = LoaderOptions(rank_world=stream.rank_world(), emit_encoded=True)
        self._sched = stream.schedule()
        self._yielded, self._exhausted = 0, False
        try:
            for encoded in super().__iter__():
                batch = stream.to_batch(encoded)  # padded or packed, as the stream says
                self._yielded += 1
                yield pin_batch(batch) if self.pin_batches else batch
        finally:
            stream.loader_options = LoaderOptions(rank_world=stream.loader_options.rank_world)
        self._exhausted = True

    def consumed(self) -> int:
        if self._sched is None:
            return 0
        return self._yielded if self._exhausted else max(self._yielded - self.consumer_lookahead, 0)

    def state_dict(self) -> dict:
        stream: CellStream = self.dataset
        if self._sched is None:
            return stream.state_dict()
        return stream.state_dict(self._sched.cursor_after(self.consumed()))

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._sched = None
