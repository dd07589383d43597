"""What training, evaluation and embedding need from `torch.distributed`, each a no-op in one process.

* `init_distributed(device)` joins the process group that `torchrun` / `accelerate launch` describe in
  the environment, after selecting the CUDA device (NCCL collectives and barriers can hang without it).
* `gather_features(x)` returns every rank's rows, gradients flowing back to the rank that owns them, so
  a contrastive loss over a global batch of N sees N-1 negatives however many processes share it;
  `roll_global_rows` gives image-text matching one derangement of the global batch, sending each rank
  only the rows it needs.
* `any_rank(flag)` and `broadcast_object(obj)` make stop decisions once for all ranks: a NaN on one
  rank stops every rank (instead of hanging the others in the next all-reduce), and early stopping is
  decided on rank 0 and followed everywhere.
* `all_gather_object(obj)` collects one picklable object per rank: RNG states for a checkpoint.
* `ShardedBatchSampler` + `gather_inference`: each rank scores whole evaluation batches, every rank
  gets the whole split's outputs back (so metrics and decisions agree).
* `make_accelerator(...)`: Hugging Face Accelerate for what it does well, wrapping the model in DDP and
  running experiment trackers; created only when there are several processes or trackers.
* `launch_engine(cfg)` + `shard_model(...)`: an Accelerate config with FSDP on (`accelerate launch
  --config_file ...`) shards the model with FSDP2 through Accelerate's plugin instead of DDP;
  `gathered_weights` / `loading_whole_weights` / `full_optimizer_state` / `load_optimizer_state` keep
  checkpoints single whole files. A DeepSpeed config is refused before any work.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError

log = logging.getLogger("fusionkit.training")

TRACKERS = ("tensorboard", "wandb", "mlflow")  # run.report_to: Accelerate's experiment trackers


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_distributed(device: torch.device | str = "cpu", timeout_s: float = 1800) -> tuple[int, int]:
    """Join the group the launcher describes (WORLD_SIZE > 1) and return (rank, world size).

    On CUDA the process's device is set first and bound to the group, so barriers and NCCL
    collectives run on the right GPU; CPU runs use gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        device = torch.device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return rank_and_world()


def barrier() -> None:
    """Wait for every rank (on the process's own GPU under NCCL)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _row_counts(x: torch.Tensor) -> list[int]:
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    return [int(c) for c in counts]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts); backward sums every rank's
    gradient for a row and hands it to the rank that owns the row."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop], None


def gathering() -> bool:
    """True where tasks see the global batch: several processes and autograd on (training).

    In evaluation ranks score their own batches, and may hold different numbers of them, so a
    collective there could hang: tasks then work on the local batch, as one process would.
    """
    return is_distributed() and torch.is_grad_enabled()


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` from every rank, in rank order ([sum of local rows, ...]); `x` itself when not distributed.

    Gradients flow to each rank's own rows, summed over the ranks that used them (open_clip's
    `gather_with_grad`). So when every rank computes the same global loss from gathered features,
    DDP's gradient average equals the gradient one process would get for the whole batch. With
    autograd off (evaluation) `x` is returned as is (see `gathering`).
    """
    return _GatherRows.apply(x, _row_counts(x)) if gathering() else x


class _ExchangeRows(torch.autograd.Function):
    """All-to-all along dim 0: the first `send[0]` rows to rank 0, the next `send[1]` to rank 1, ...;
    the result holds `recv[r]` rows from each rank r in rank order. Backward sends gradients back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        ctx.send, ctx.recv = send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv)
        return out, None, None


def roll_global_rows(x: torch.Tensor) -> torch.Tensor | None:
    """This rank's rows of the global batch rolled by one random non-zero offset; None below 2 rows.

    The global batch is every rank's `x` in rank order while `gathering()`, else `x`. The offset is
    `torch.randint(1, n)` as one process draws it, rank 0's draw on every rank (`shared_randint`).
    Only the rows a rank needs cross the wire (an all-to-all of its own row count, not an all-gather
    of the global batch), and gradients go back to the rank that owns each row.
    """
    counts = _row_counts(x) if gathering() else [x.shape[0]]
    n = sum(counts)
    if n < 2:
        return None
    shift = shared_randint(1, n, x.device)
    source = (torch.arange(n, device=x.device) - shift) % n  # global row j reads row source[j]
    if not gathering():
        return x[source]
    rank, world = dist.get_rank(), dist.get_world_size()
    ends = torch.tensor(counts, device=x.device).cumsum(0)
    start, stop = int(ends[rank]) - counts[rank], int(ends[rank])
    owner = torch.bucketize(torch.arange(n, device=x.device), ends, right=True)  # the rank holding row j
    mine = (source >= start) & (source < stop)  # rows read from this rank, grouped by the reader's rank
    send = torch.bincount(owner[mine], minlength=world).tolist()
    wanted_from = owner[source[start:stop]]  # the rank that holds each row this rank reads
    arrival = torch.sort(wanted_from, stable=True).indices  # rows arrive grouped by sender, in order
    received = _ExchangeRows.apply(
        x[source[mine] - start], send, torch.bincount(wanted_from, minlength=world).tolist()
    )
    return received[torch.argsort(arrival)]


def shared_randint(low: int, high: int, device: torch.device | str = "cpu") -> int:
    """`torch.randint(low, high)` drawn on every rank, rank 0's value used by all while `gathering()`.

    Each rank advances its own generator exactly as one process would, so a single-process run (and its
    bitwise resume) is unchanged, and ranks agree on a random choice about the global batch.
    """
    value = torch.randint(low, high, (1,))
    if gathering():
        value = value.to(device)
        dist.broadcast(value, src=0)
    return int(value)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when `flag` is True on at least one (decide a stop once, for all)."""
    if not is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` across ranks (e.g. the logged train loss of the global batch)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` across ranks (e.g. an accumulation window's loss normalisers over the global batch)."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (e.g. rank 0's early-stopping decision)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object per rank, in rank order (`[obj]` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_error(message: str | None, device: torch.device | str = "cpu") -> str | None:
    """On every rank: the first rank's error message ("rank 1: ...") when any rank has one, else None.

    Costs one small all-reduce when all is well; the messages are gathered only when something failed.
    """
    if not is_distributed():
        return message
    if not any_rank(message is not None, device):
        return None
    return next(f"rank {r}: {m}" for r, m in enumerate(all_gather_object(message)) if m is not None)


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """In-order batches of `batch_size` over `n` items, whole batches split into contiguous runs per rank.

    Every batch is the one a single process would see (a contrastive task's in-batch retrieval scores
    the same), and concatenating the ranks' outputs in rank order restores the data order.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        n_batches = -(-n // batch_size)
        per, extra = divmod(n_batches, world)
        first = rank * per + min(rank, extra)
        self.batches = range(first, first + per + (rank < extra))
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches:
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = dict.fromkeys(k for p in parts for k in p)
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in names}


def gather_inference(
    result: dict[str, Any], combine: Callable[[dict[str, list[float]]], float | None] | None = None
) -> dict[str, Any]:
    """Merge the ranks' `run_inference` results (from `ShardedBatchSampler` shards) into the whole split's.

    Every rank gets the merged result, so metrics, early stopping and best-checkpoint choices agree.
    `combine(loss_terms)`: the loss from the merged per-task (loss sum, rows) terms (`inference.split_loss`);
    without it, the example-weighted mean of the ranks' losses.
    """
    if not is_distributed():
        return result
    parts = all_gather_object(result)
    merged = {
        "ids": [i for p in parts for i in p["ids"]],
        **{key: _cat([p.get(key, {}) for p in parts]) for key in ("outputs", "labels", "label_mask", "present")},
    }
    if combine is not None and "loss_terms" in result:
        terms: dict[str, list[float]] = {}
        for p in parts:
            for name, (total, n) in p["loss_terms"].items():
                term = terms.setdefault(name, [0.0, 0])
                term[0], term[1] = term[0] + total, term[1] + n
        merged["loss_terms"], merged["loss"] = terms, combine(terms)
    else:  # the example-weighted mean of the ranks' losses
        weights = [len(p["ids"]) if p["loss"] is not None else 0 for p in parts]
        total = sum(weights)
        merged["loss"] = sum(p["loss"] * w for p, w in zip(parts, weights) if w) / total if total else None
    return merged


def make_accelerator(device: torch.device, report_to: Sequence[str], logging_dir: Path) -> Any:
    """An `accelerate.Accelerator` where one is needed (several processes or experiment trackers), else None.

    Accelerate wraps the model in DDP (`prepare_model`) and runs the trackers; precision stays with
    `fusionkit.precision` (mixed_precision="no" here), so the dtype chosen and logged is the one used.
    One process with no trackers runs plain PyTorch and does not need Accelerate installed.
    """
    if not is_distributed() and not report_to:
        return None
    import accelerate  # a core dependency: several processes and run.report_to train through it
    import accelerate.utils as accelerate_utils

    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(f"run.report_to: unknown tracker {name!r}; use any of {TRACKERS}")
        if not getattr(accelerate_utils, f"is_{name}_available")():
            raise ConfigError(
                f"run.report_to {name!r}: the {name} package is not installed (pip install {name})"
            )
    return accelerate.Accelerator(cpu=device.type == "cpu", mixed_precision="no",
                                  log_with=list(report_to) or None, project_dir=str(logging_dir))  # fmt: skip


# ---------------------------------------------------------------------------------------- FSDP


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launch_engine(cfg: Any, world: int) -> str:
    """`"fsdp"` when the Accelerate config the run was launched with turns FSDP on (and there are several
    processes to shard over), else `"ddp"` (one process: plain PyTorch).

    Refused before any work: DeepSpeed, and what FSDP does not run with (see the messages).
    """
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(
            "this run was launched with an Accelerate DeepSpeed config (distributed_type: DEEPSPEED); fusionkit "
            "does not train with DeepSpeed yet. To shard encoders too large for one GPU use FSDP "
            "(distributed_type: FSDP, fsdp_version: 2; see configs/accelerate/fsdp.yaml), else plain DDP "
            "(torchrun, or accelerate launch without that config)"
        )
    if not _env_flag("ACCELERATE_USE_FSDP") or world < 2:
        return "ddp"
    if os.environ.get("FSDP_VERSION", "1") != "2":  # Accelerate's default is FSDP1
        raise ConfigError(f"the Accelerate config asks for fsdp_version {os.environ.get('FSDP_VERSION', '1')}; "
                          "fusionkit shards with FSDP2: set fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")  # fmt: skip
    refused = {
        "optim.ema_decay (EMA of sharded weights)": cfg.optim.ema_decay,
        "run.precision fp16 (its GradScaler does not unscale sharded gradients; use bf16)": (
            cfg.run.precision == "fp16"
        ),
        "run.compile": cfg.run.compile,
        # a rank whose batch lacks a whole modality skips that encoder, and with it the encoder's
        # all-gathers that the other ranks wait in: a hang
        "model.fusion.modality_dropout > 0": cfg.model.fusion.modality_dropout > 0,
        "data.missing_text / data.missing_image 'keep'": "keep"
        in (cfg.data.missing_text, cfg.data.missing_image),
        "fsdp_activation_checkpointing (not wired yet)": _env_flag("FSDP_ACTIVATION_CHECKPOINTING"),
        "fsdp_offload_params (not tested yet)": _env_flag("FSDP_OFFLOAD_PARAMS"),
    }
    on = [name for name, value in refused.items() if value]
    if on:
        raise ConfigError(f"FSDP (the Accelerate config's distributed_type) does not run with {'; '.join(on)}: "
                          "turn these off, or train with DDP (launch without the FSDP config)")  # fmt: skip
    return "fsdp"


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 as Accelerate's plugin configures it (the launcher's fsdp_* settings).

    Each transformer layer becomes its own unit: the classes named by fsdp_transformer_layer_cls_to_wrap,
    else the layer classes the Hugging Face encoders declare (`_no_split_modules`). Accelerate 1.15 turns
    FSDP on for accelerators only (on CPU it hands back DDP without a word), so on CPU the plugin is
    built here from the same settings; PyTorch's FSDP2 itself runs on gloo.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        plugin = accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if plugin.transformer_cls_names_to_wrap is None:
        present = {type(m).__name__ for m in model.modules()}
        declared = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or ()}
        plugin.transformer_cls_names_to_wrap = sorted(declared & present)
    # FSDP2 shards no 0-d parameter (a contrastive head's temperature): their modules stay whole on every
    # rank, and their gradients are averaged over ranks as DDP would
    scalar_owners = [m for m in model.modules() if any(p.ndim == 0 for p in m.parameters(recurse=False))]
    plugin.ignored_modules = [*(plugin.ignored_modules or []), *scalar_owners]
    for module in scalar_owners:
        for param in module.parameters():
            if param.requires_grad:
                param.register_hook(_average_over_ranks)
    model = fsdp2_prepare_model(accelerator, model)
    if dist.get_rank() == 0:
        units = sum(is_sharded(m) for m in model.modules())
        log.info("FSDP2 (Accelerate config): %d units sharded over %d processes; layers wrapped: %s", units,
                 dist.get_world_size(), ", ".join(plugin.transformer_cls_names_to_wrap) or "none")  # fmt: skip
    return model


def _average_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def _resharded(model: torch.nn.Module) -> bool:
    """True for an FSDP model, after putting its parameters back into shards: the root unit keeps
    them whole after a forward that no backward followed (evaluation)."""
    if not is_sharded(model):
        return False
    model.reshard()  # type: ignore[operator]
    return True


def _state_dict_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


@contextlib.contextmanager
def gathered_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside: `model.state_dict()` is the whole model on rank 0 (CPU tensors), so `save_pretrained` writes
    one ordinary safetensors file. Under FSDP every rank must enter: the shards are gathered on entry.
    A no-op for an unsharded model."""
    if not _resharded(model):
        yield
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    whole = get_model_state_dict(model, options=_state_dict_options(cpu_offload=True))
    model.state_dict = lambda *args, **kwargs: whole  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.state_dict


@contextlib.contextmanager
def loading_whole_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside: `model.load_state_dict(whole)` keeps each rank's shard of a whole state dict (every rank
    reads the file), so `load_weights` reads a checkpoint written through `gathered_weights`.
    A no-op for an unsharded model."""
    if not _resharded(model):
        yield
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    def load(state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:
        own = torch.nn.Module.state_dict(model)
        shards = {
            k: distribute_tensor(v.to(own[k].device, own[k].dtype), own[k].device_mesh, own[k].placements,
                                 src_data_rank=None)  # every rank holds the whole tensor: no communication
            if isinstance(own.get(k), DTensor) else v
            for k, v in state.items()
        }  # fmt: skip
        return torch.nn.Module.load_state_dict(model, shards, strict=strict)

    model.load_state_dict = load  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.load_state_dict


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Under FSDP: the optimizer's whole state (keyed by parameter name) on rank 0, gathered from every
    rank, which must all call this; None for an unsharded model (its `optimizer.state_dict()` is whole)."""
    if not _resharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a saved optimizer state: each rank keeps its shard of a whole one under FSDP."""
    if not _resharded(model):
        from .checkpoint import check_optimizer_state

        check_optimizer_state(optimizer, state)  # an older fusionkit's model had other parameters: say so
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_state_dict_options())
