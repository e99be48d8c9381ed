# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Process groups, FSDP2 sharding and full <-> sharded state dicts for the distributed recipes.

The recipes run under torchrun (``tune --nproc_per_node N <recipe> ...``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Weights travel
as *full* state dicts only on rank 0 (read from, or written to, the checkpoint files) and are
broadcast or gathered one tensor at a time, so no rank holds more than one full copy of the
model in CPU memory and none ever holds one on a GPU.
"""

import functools
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn

# torch.distributed.checkpoint and FSDP are imported where used: together they add over a
# second to `import torchtune.utils`, which every recipe and `tune` command pays.

log = logging.getLogger(__name__)

# Long enough for rank 0 to read a 70B checkpoint while the others wait in a broadcast, short
# enough that a rank stuck in a collective with a dead peer gives up within minutes.
DEFAULT_PG_TIMEOUT = timedelta(minutes=10)


def is_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        dist.is_available() and dist.is_initialized()
    )


def init_distributed(
    device: torch.device, timeout: timedelta = DEFAULT_PG_TIMEOUT
) -> Tuple[int, int]:
    """Join the default process group described by torchrun's environment variables.

    The backend is NCCL for CUDA devices and gloo otherwise. On CUDA the process is pinned to
    ``cuda:LOCAL_RANK`` first, so NCCL and every later ``"cuda"`` refer to this rank's GPU.
    A second call is a no-op.

    Args:
        device: the training device (``get_device(cfg.device)``); only its type is used.
        timeout: how long a collective may wait for the other ranks before it raises.

    Returns:
        ``(world_size, rank)``.

    Raises:
        ValueError: if torchrun's environment variables are missing or the device is not
            CUDA or CPU.
    """
    if dist.is_initialized():
        return get_world_size_and_rank()
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in required if k not in os.environ]
    if missing:
        raise ValueError(
            f"Environment variables {missing} are not set: launch distributed recipes with "
            "torchrun options, e.g. `tune --nnodes 1 --nproc_per_node 2 <recipe> --config ...`"
        )
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        # Binding the group to this GPU lets NCCL connect eagerly and barrier() use it.
        kwargs = dict(backend="nccl", device_id=torch.device("cuda", local_rank))
    elif device.type == "cpu":
        kwargs = dict(backend="gloo")
    else:
        raise ValueError(f"Distributed training runs on cuda or cpu, not device='{device}'")
    dist.init_process_group(timeout=timeout, **kwargs)
    return get_world_size_and_rank()


def get_world_size_and_rank() -> Tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard_model(
    model: nn.Module,
    device: torch.device,
    *,
    layer_types: Tuple[Type[nn.Module], ...],
    param_dtype: Optional[torch.dtype] = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` with FSDP2: every ``layer_types`` submodule, then the root.

    Each sharded layer all-gathers its parameters just before its forward (and again in
    backward) and frees them after, so a GPU holds one layer's full weights at a time. Call
    this on a model built on the meta device, then ``model.to_empty(device=device)`` and load
    the weights with :func:`load_from_full_state_dict`.

    Args:
        model: the model (on the meta device, or already on ``device``).
        device: the training device; its type picks the device mesh.
        layer_types: submodule classes that become their own FSDP units
            (e.g. ``TransformerDecoderLayer``).
        param_dtype: when set (bf16), parameters are all-gathered and computed in this dtype
            while the sharded master weights, gradient reduction and optimizer stay fp32.
        reshard_after_forward: free gathered weights after forward (ZeRO-3); False keeps them
            until backward (ZeRO-2: faster, more memory).

    Returns:
        ``model``, sharded in place (its class now also derives from ``FSDPModule``).
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

    world_size, _ = get_world_size_and_rank()
    mesh = init_device_mesh(device.type, (world_size,))
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mesh=mesh, mp_policy=mp_policy)
    for module in model.modules():
        if isinstance(module, layer_types):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root keeps embeddings, final norm and output; nothing runs after it, so it stays
    # gathered after forward (backward needs it first).
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def load_from_full_state_dict(
    model: nn.Module, full_sd: Optional[Dict[str, torch.Tensor]], strict: bool = True
) -> None:
    """Fill a sharded model from a full state dict that only rank 0 holds.

    Rank 0 broadcasts one tensor at a time; every rank keeps only its shard of it. A state
    dict key that is no parameter or buffer (a layer that stores its weight in another form,
    e.g. NF4 codes, and reads and writes ``weight`` through its state-dict hooks) is
    broadcast whole and loaded into its layer on every rank, one at a time.

    Args:
        model: sharded by :func:`shard_model` and materialised (``to_empty``).
        full_sd: the full state dict (native keys) on rank 0; ignored (pass None) elsewhere.
            Consumed: its values are replaced by this rank's shards, so once the caller drops
            its other references the full tensors are freed.
        strict: every model key must be in ``full_sd`` and nothing else.

    Raises:
        ValueError: (on every rank) if rank 0's keys do not fit the model when ``strict``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _, rank = get_world_size_and_rank()
    problem = [None]
    expected = set(model.state_dict())
    if rank == 0 and strict:
        missing, unexpected = sorted(expected - set(full_sd)), sorted(set(full_sd) - expected)
        if missing or unexpected:
            problem[0] = f"missing {missing}, unexpected {unexpected}"
    dist.broadcast_object_list(problem, src=0)  # all ranks raise together, none waits
    if problem[0] is not None:
        raise ValueError(f"Checkpoint does not fit the model: {problem[0]}")
    # Every name of a tied parameter counts as stored (``output.weight`` is the embedding).
    stored = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    stored |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    derived = sorted(expected - stored)  # the same on every rank: the same model
    derived_sd = {k: full_sd.pop(k) for k in derived if k in full_sd} if rank == 0 else {}
    # Strict was checked above; the derived keys load below, so the rest alone is partial.
    options = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=strict and not derived
    )
    set_model_state_dict(model, full_sd if rank == 0 else {}, options=options)
    device = next(iter(model.parameters())).device
    for key in derived:
        meta = broadcast_object(
            (tuple(derived_sd[key].shape), derived_sd[key].dtype) if key in derived_sd else None
        )
        if meta is None:  # not in rank 0's (non-strict) state dict
            continue
        value = (
            derived_sd.pop(key).to(device)
            if rank == 0
            else torch.empty(meta[0], dtype=meta[1], device=device)
        )
        dist.broadcast(value, src=0)
        owner, _, leaf = key.rpartition(".")
        model.get_submodule(owner).load_state_dict({leaf: value}, strict=False)
        del value


def gather_full_state_dict(
    model: nn.Module, dtype: Optional[torch.dtype] = None
) -> Dict[str, torch.Tensor]:
    """The full state dict of a sharded model, on rank 0's CPU; ``{}`` on other ranks.

    Every rank must call this (it all-gathers one tensor at a time).

    Args:
        model: a model sharded by :func:`shard_model`.
        dtype: cast floating-point tensors to it (the checkpoint's dtype); None keeps them.

    Returns:
        ``{native key: CPU tensor}`` on rank 0, ``{}`` elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=options)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the optimizer's parameters in the order ``optimizer.state_dict()`` numbers
    them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict:
    """The full optimizer state of a sharded model on rank 0's CPU (``{}`` elsewhere).

    It is laid out as the unsharded model's ``optimizer.state_dict()`` (state keyed by the
    parameter's index over the groups), so single-device and distributed recipes resume from
    each other's ``recipe_state.pt``. Every rank must call this.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by name
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_param_names(model, optimizer))}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [
            {**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]
        ],
    }


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, full_osd: Optional[Dict]
) -> None:
    """Load a full optimizer state that rank 0 holds into a sharded model's optimizer.

    Args:
        model: the sharded model.
        optimizer: its optimizer, with the same parameter groups as the saved one.
        full_osd: an unsharded ``optimizer.state_dict()`` (from :func:`gather_optimizer_state_dict`
            or a single-device run) on rank 0; None elsewhere.

    Raises:
        ValueError: (on every rank) if the groups or parameter counts do not match.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    _, rank = get_world_size_and_rank()
    names = _optimizer_param_names(model, optimizer)
    problem, groups, by_name = None, None, {}
    if rank == 0:
        saved_sizes = [len(g["params"]) for g in full_osd["param_groups"]]
        our_sizes = [len(g["params"]) for g in optimizer.param_groups]
        if saved_sizes != our_sizes:
            problem = f"parameters per group: saved {saved_sizes}, optimizer {our_sizes}"
        else:
            saved_ids = [i for g in full_osd["param_groups"] for i in g["params"]]
            name_of = dict(zip(saved_ids, names))
            by_name = {
                "state": {name_of[i]: st for i, st in full_osd["state"].items()},
                "param_groups": [
                    {**g, "params": [name_of[i] for i in g["params"]]}
                    for g in full_osd["param_groups"]
                ],
            }
            # Group settings the fresh optimizer lacks (an lr scheduler's "initial_lr")
            # would reach only rank 0 through set_optimizer_state_dict: sent here.
            groups = [
                {k: v for k, v in g.items() if k != "params"} for g in full_osd["param_groups"]
            ]
    problem, groups = broadcast_object((problem, groups))
    if problem is not None:
        raise ValueError(f"The optimizer state does not fit the optimizer: {problem}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=options)
    for ours, saved in zip(optimizer.param_groups, groups):
        ours.update(saved)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for small recipe state only)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Element-wise sum over ranks of a few numbers, as a float64 tensor on ``device``."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def record_rank_on_failure(fn: Callable) -> Callable:
    """Wrap a recipe's entry point so an exception names the rank it came from.

    Under torchrun (``RANK`` set) the exception is logged with the rank and re-raised as a
    ``RuntimeError`` whose message starts with ``"rank N: "``; the worker then exits non-zero
    and torchrun stops the other workers on its node. Peers elsewhere that are blocked in a
    collective with this rank see its connections close (gloo) or, at worst, reach the
    process-group timeout (NCCL). Without ``RANK`` exceptions pass through unchanged, and so do
    bad inputs (a missing file, an absent device, ...): ``config.parse`` reports those once.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            from torchtune.config._report import debug_enabled, user_message

            rank = os.environ.get("RANK")
            if rank is None:  # not launched by torchrun: nothing to add
                raise
            code = getattr(fn, "__code__", None)
            recipe_file = code.co_filename if code is not None else None
            if not debug_enabled() and user_message(e, recipe_file=recipe_file) is not None:
                raise  # a bad input, not a crash: config.parse prints one paragraph
            log.error("rank %s failed: %s: %s", rank, type(e).__name__, e)
            raise RuntimeError(f"rank {rank}: {type(e).__name__}: {e}") from e

    return wrapper
