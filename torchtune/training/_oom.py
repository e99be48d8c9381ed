# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Out-of-memory recovery: a step that runs out of memory is retried with each loaded batch
split in two, twice the micro-batches, the same samples.

What counts as out of memory: ``torch.OutOfMemoryError`` (CUDA, MPS, XPU), and on CPU the
``RuntimeError`` of torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory", what
a ``ulimit -v`` or ``vm.overcommit_memory=2`` machine raises). Python's ``MemoryError`` is not:
it comes from interpreter objects, which a smaller micro-batch does not shrink, and on a
default Linux (overcommit on) a process that is out of RAM is killed, not told.

Which out-of-memory errors a run survives:

- one device: any raised in a micro-batch's forward, loss or backward. One raised in the
  optimizer's update is re-raised (some parameters may already be updated; the micro-batch
  does not size that memory anyway).
- N ranks (FSDP2): the ranks agree once per micro-batch, with a one-number all-reduce between
  its forward (loss included) and its backward, so an error is survivable on any subset of
  ranks only where no FSDP collective is pending: after the model's forward has issued its
  last all-gather, i.e. in the final norm, the output projection and the loss (the
  ``[n, vocab]`` logits, often the largest transient). Tested on 2 gloo ranks: rank 1 raising
  in the final norm (inside the root module's forward) and after the loss (the test hook).
  Not survivable: an error inside a decoder layer's forward on some ranks only (they enter
  the flag all-reduce while the others wait in the next layer's all-gather, until the
  10-minute collective timeout ends the run; the same error on every rank at the same layer
  should agree, untested), and any error in backward, where the reduce-scatters interleave
  with compute: it is re-raised at once with a message naming ``tune plan``, so torchrun
  stops the run rather than leave it hanging. The agreement is per micro-batch, not per
  step, because it must come before each backward's reduce-scatters.

After an error every rank drops the step's gradients (``zero_grad``), the tensors the
exception's frames held, FSDP2's per-iteration state (``reset_iter_state`` on the root) and,
on CUDA, the allocator's cached blocks, then retries the step from its first micro-batch.
Splitting loaded batches (not rebuilding the loader) keeps the data order: the union of a
step's micro-batches is the same samples, and the step's loss is normalised by the step's
total of scored tokens (or pairs), so the gradient is the same up to float order. The agreement
costs nothing on one device and one small all-reduce (a sync point) per micro-batch on N.
"""

import gc
import logging
import os
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

import torch

from torchtune import utils
from torchtune.modules.attention import DocumentMask

log = logging.getLogger(__name__)

T = TypeVar("T")

# Test hook: raise the out-of-memory error at this 1-based global step (as the metric logger
# numbers steps), after the first micro-batch's loss returns, on this rank (default: all), in
# that many tries of the step (default 1; more exhaust the halvings).
OOM_AT_STEP_ENV = "TUNE_TEST_OOM_AT_STEP"
OOM_RANK_ENV = "TUNE_TEST_OOM_RANK"
OOM_TIMES_ENV = "TUNE_TEST_OOM_TIMES"

_CPU_ALLOCATOR_OOM = "DefaultCPUAllocator: can't allocate memory"

_PLAN_HINT = (
    "`tune plan --config <config> --memory <SIZE>` predicts the peak memory and recommends "
    "overrides that fit"
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device's out-of-memory error (see the module docstring)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and _CPU_ALLOCATOR_OOM in str(exc)


class StepOutOfMemory(Exception):
    """Raised by a step whose micro-batch ran out of memory (on any rank): nothing was applied
    to the parameters, and every rank raises it for the same micro-batch."""

    def __init__(self, message: str, ranks: int) -> None:
        super().__init__(message)
        self.ranks = ranks  # how many ranks ran out of memory


def split_batch(batch: Mapping[str, Any], parts: int, paired: bool = False) -> List[Dict[str, Any]]:
    """Split a collated batch along its rows into ``parts`` batches (sizes differing by at most
    one, the larger first), in order.

    Args:
        batch: ``tokens`` ``[b, s]`` and other tensors with ``b`` rows (``labels``,
            ``input_pos``, a dense ``mask`` ``[b, s, s]``), and optionally ``mask``, a
            ``DocumentMask`` over the ``b * s`` tokens (packed rows), split at row ends.
        parts: how many batches; at most the number of samples.
        paired: rows are preference pairs (``padded_collate_pairs``: ``b / 2`` chosen rows,
            then their rejected rows); each part keeps its pairs' chosen rows first.

    Returns:
        ``parts`` batches with the same keys.

    Raises:
        ValueError: if ``parts`` is not in ``[1, samples]``, a tensor does not have ``b``
            rows, a ``DocumentMask`` has a document that crosses a row end, or a value is
            neither a tensor nor a ``DocumentMask`` (named).
    """
    tokens = batch["tokens"]
    rows, seq_len = tokens.shape
    samples = rows // 2 if paired else rows
    if paired and rows % 2:
        raise ValueError(f"a batch of pairs must have an even number of rows, got {rows}")
    if not 1 <= parts <= samples:
        raise ValueError(f"cannot split a batch of {samples} samples into {parts} parts")
    if parts == 1:
        return [dict(batch)]
    row_docs = None
    for key, value in batch.items():
        if isinstance(value, DocumentMask):
            row_docs = _row_documents(value, rows, seq_len, key)
        elif not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != rows:
            what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"cannot split batch key '{key}' ({what}) along its {rows} rows: expected a "
                "tensor with one row per sample, or a DocumentMask"
            )
    out = []
    for chunk in torch.arange(samples).tensor_split(parts):
        idx = torch.cat([chunk, chunk + samples]) if paired else chunk
        part: Dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, DocumentMask):
                part[key] = DocumentMask(tuple(n for r in idx.tolist() for n in row_docs[r]))
            else:
                part[key] = value[idx.to(value.device)]
        out.append(part)
    return out


def _row_documents(mask: DocumentMask, rows: int, seq_len: int, key: str) -> List[List[int]]:
    """Each row's document lengths."""
    per_row: List[List[int]] = [[] for _ in range(rows)]
    start = 0
    for n in mask.lengths:
        row = start // seq_len
        if row >= rows or (start + n - 1) // seq_len != row:
            raise ValueError(
                f"batch key '{key}': a document of {n} tokens at token {start} crosses a row end "
                f"of the [{rows}, {seq_len}] batch"
            )
        per_row[row].append(n)
        start += n
    return per_row


class OomRetry:
    """Retries a step that ran out of memory with each loaded batch split in two, for up to
    ``max_oom_retries`` halvings; later steps keep the split. Build it at the end of a
    recipe's setup and pass it to ``optimizer_step`` / ``preference_step`` as ``oom``.

    Args:
        device: the training device (emptied of cached blocks after an error on CUDA).
        max_oom_retries: how many times the micro-batch may be halved over the whole run.
        global_step: steps already taken (a resumed run's), for the test hook.
        world_size: ranks (the agreement is an all-reduce when above 1).
        rank: this rank.
    """

    def __init__(
        self,
        device: torch.device,
        max_oom_retries: int = 3,
        *,
        global_step: int = 0,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if max_oom_retries < 0:
            raise ValueError(f"Config key 'max_oom_retries' must be >= 0, got {max_oom_retries}")
        self.device = device
        self.max_oom_retries = max_oom_retries
        self.world_size = world_size
        self.rank = rank
        self.splits = 1  # parts each loaded batch is split into
        self.halvings = 0
        self._step = global_step  # the step being run, 1-based, once run() starts it
        self._try = 0  # of that step
        self._test_step = _env_int(OOM_AT_STEP_ENV)
        test_rank = _env_int(OOM_RANK_ENV)
        armed = self._test_step is not None and test_rank in (None, rank)
        self._test_left = (_env_int(OOM_TIMES_ENV) or 1) if armed else 0
        self._test_try = -1  # the try of the step the hook last fired in

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], device: torch.device, global_step: int = 0
    ) -> "OomRetry":
        """From the config's optional ``max_oom_retries`` (default 3); world size and rank
        from the process group when there is one."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return cls(
            device,
            int(cfg.get("max_oom_retries", 3)),
            global_step=global_step,
            world_size=torch.distributed.get_world_size() if distributed else 1,
            rank=torch.distributed.get_rank() if distributed else 0,
        )

    def run(
        self,
        step: Callable[[List[Dict[str, Any]]], T],
        micro_batches: List[Dict[str, Any]],
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        paired: bool = False,
    ) -> T:
        """Run ``step`` over the micro-batches (each split into ``splits``); on
        :class:`StepOutOfMemory`, free what the step held (the gradients, the exception's
        frames, FSDP's per-iteration state, CUDA's cached blocks), halve and retry the step.

        Args:
            step: runs one optimizer step over a list of micro-batches, calling
                :meth:`forward` and :meth:`backward` for each.
            micro_batches: the step's loaded batches.
            model: the model (an FSDP root's ``reset_iter_state`` runs after an error).
            optimizer: its gradients are zeroed after an error.
            paired: the batches are preference pairs (see :func:`split_batch`).

        Returns:
            What ``step`` returns.

        Raises:
            torch.OutOfMemoryError: once the micro-batch cannot be halved again (the
                ``max_oom_retries``-th halving is spent, or it is 1); names ``tune plan``.
        """
        self._step += 1
        self._try = 0
        while True:
            parts = [
                part
                for mb in micro_batches
                # An epoch's last batch may hold fewer samples than there are splits.
                for part in split_batch(mb, min(self.splits, _samples(mb, paired)), paired)
            ]
            try:
                return step(parts)
            except StepOutOfMemory as e:
                error, ranks = e, e.ranks
                _release(e)
                del e
            optimizer.zero_grad(set_to_none=True)
            if hasattr(model, "reset_iter_state"):  # FSDP2: the aborted iteration is lost
                model.reset_iter_state()
            gc.collect()  # whatever else of the aborted step sits in reference cycles
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._halve(micro_batches, paired, error, ranks)
            del error
            self._try += 1

    def _halve(
        self, micro_batches: List[Dict[str, Any]], paired: bool, error: Exception, ranks: int
    ) -> None:
        samples = max(_samples(mb, paired) for mb in micro_batches)
        size = -(-samples // self.splits)  # the largest micro-batch now
        where = f"on {ranks} of {self.world_size} ranks " if self.world_size > 1 else ""
        if self.halvings >= self.max_oom_retries or size <= 1:
            why = "it is 1" if size <= 1 else f"max_oom_retries={self.max_oom_retries} reached"
            raise torch.OutOfMemoryError(
                f"Out of memory at step {self._step} {where}with a micro-batch of {size}, which "
                f"cannot be halved again ({why}). {_PLAN_HINT}. The error: {error}"
            )
        accumulation = len(micro_batches) * self.splits
        self.splits *= 2
        self.halvings += 1
        log.warning(
            "Out of memory at step %d %s(%s): micro-batch %d -> %d, micro-batches per step "
            "%d -> %d, same effective batch; retrying the step",
            self._step,
            where,
            str(error).splitlines()[0][:200],
            size,
            -(-samples // self.splits),
            accumulation,
            2 * accumulation,
        )

    def forward(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``: a micro-batch's forward and loss; if any rank ran out of memory
        there, raise :class:`StepOutOfMemory` on every rank (one all-reduce on N ranks)."""
        error: Optional[BaseException] = None
        out = None
        try:
            out = fn(*args)
            if self._test_left and self._step == self._test_step and self._test_try != self._try:
                self._test_left -= 1
                self._test_try = self._try  # once per try: its first micro-batch
                raise torch.OutOfMemoryError(f"{OOM_AT_STEP_ENV}={self._test_step}")
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            error = e
        failed = error is not None
        if self.world_size > 1:
            # A sync point: every rank must agree before any of them starts the backward.
            failed_ranks = int(utils.all_reduce_sum([float(failed)], self.device)[0])
        else:
            failed_ranks = int(failed)
        if failed_ranks:
            del out
            message = str(error) if error is not None else "another rank ran out of memory"
            raise StepOutOfMemory(message, failed_ranks) from error
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; out of memory there is retried on one device, re-raised on N
        ranks (their reduce-scatters are already under way)."""
        try:
            loss.backward()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if self.world_size > 1:
                raise torch.OutOfMemoryError(
                    f"Out of memory in backward at step {self._step} on rank {self.rank}; on "
                    f"N ranks only an out-of-memory error before backward is survivable. "
                    f"{_PLAN_HINT}. The error: {e}"
                ) from e
            raise StepOutOfMemory(str(e), 1) from e


class _Unguarded:
    """What a step does without an :class:`OomRetry`: no catching, no collective."""

    @staticmethod
    def forward(fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()


UNGUARDED = _Unguarded()


def _samples(batch: Mapping[str, Any], paired: bool) -> int:
    rows = batch["tokens"].shape[0]
    return rows // 2 if paired else rows


def _release(exc: BaseException) -> None:
    """Drop the tensors an exception's frames hold (activations, the graph), through its
    cause and context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"Environment variable {name} must be an integer, got {raw!r}") from None
