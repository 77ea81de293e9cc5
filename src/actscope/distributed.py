"""Many processes: who this process is among the ones torchrun started, which batches are its
share, and how every process's accumulators become the one result a single process computes.

* :func:`launched` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
  :func:`session` joins the process group it describes (gloo for a model on the CPU, NCCL for one
  on CUDA, one GPU per process by ``LOCAL_RANK``) once per process; :func:`end` (or the process's
  exit) destroys it. A group the caller started is used as it is and left alone.
* :func:`shard`: process ``r`` of ``N`` takes batches ``r, r + N, r + 2N, …`` of the one batch
  stream a single process forms. The batches, their padding and so every activation are bit for
  bit those of a single process, and ``--max-tokens`` stays a property of that stream.
* :func:`gather` / :func:`merge_states`: the accumulators' state dicts gathered on rank 0 (object
  collectives) and merged in rank order. Counts, histograms, minima and maxima merge exactly,
  means and variances to rounding (Chan's formula in float64); the top-k examples are ordered by
  value and then global token id (``example << 20 | position``, the example being the corpus
  document number), a total order, so the merged top-k are those of one pass.
* :func:`agree`: a check every process passes or fails together (no process left waiting in a
  collective for one that gave up).
* :func:`launch`: ``--processes N``: torchrun started for the user (``python -m
  torch.distributed.run --standalone``), its exit code passed through.
"""
from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch

from .errors import InputError

T = TypeVar("T")
# A process waiting for a slower one (e.g. one resumed from an earlier checkpoint) must not time
# out; a process that dies is noticed by torchrun, which stops the others.
TIMEOUT = timedelta(days=7)
STATUS_ENV = "ACTSCOPE_LAUNCH_STATUS"  # where ranks started by launch() leave their exit codes
_STARTED: list[bool] = []  # [True] once this process started the group (so it ends it)


@dataclass(frozen=True)
class Context:
    """This process among the job's: ``rank`` of ``world``, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes and prints."""
        return self.rank == 0


SINGLE = Context()


def launched() -> Context:
    """The context torchrun's environment (or an already started process group) describes,
    without starting anything."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    rank = _env_int("RANK", -1)
    if not 0 <= rank < world:
        raise InputError(f"WORLD_SIZE is {world} but RANK is {os.environ.get('RANK')!r}; launch with torchrun, which sets both")
    return Context(rank, world, _env_int("LOCAL_RANK", rank))


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"the environment variable {name}={text!r} is not a whole number; launch with torchrun, which sets it") from None


def rank_device(device: str | None, context: Context | None = None) -> str | None:
    """The device a model should load on in this process: ``cuda`` and ``auto`` become this
    process's own GPU, ``cuda:LOCAL_RANK``, when there are several processes."""
    context = context or launched()
    if not context.distributed or device not in ("cuda", "auto") or not torch.cuda.is_available():
        return device
    return f"cuda:{context.local_rank}"


@contextmanager
def session(device: torch.device | str | None = None) -> Iterator[Context]:
    """The process group of this job, joined on first use (and kept: torch cannot join the same
    group twice in one process); a single process gets :data:`SINGLE` and starts nothing."""
    import torch.distributed as dist

    context = launched()
    if not context.distributed:
        yield SINGLE
        return
    if not dist.is_initialized():
        _start(context, torch.device(device) if device is not None else torch.device("cpu"))
    yield replace(context, backend=dist.get_backend())


def _start(context: Context, device: torch.device) -> None:
    import torch.distributed as dist

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise InputError(f"WORLD_SIZE is {context.world} but {' and '.join(missing)} not set; "
                         "launch with torchrun (torchrun --nproc_per_node N -m actscope …) or actscope … --processes N")
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", context.local_rank))
        backend = "nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)
    if not _STARTED:
        atexit.register(end)
    _STARTED[:] = [True]


def end() -> None:
    """Destroy the process group this process started (nothing otherwise)."""
    import torch.distributed as dist

    if _STARTED and _STARTED[0] and dist.is_initialized():
        dist.destroy_process_group()
    _STARTED[:] = [False] if _STARTED else []


# -- the batches of one process ------------------------------------------------------
def shard(batches: Iterable[T], context: Context, start: int = 0,
          rows: Callable[[T], int] | None = None) -> Iterator[tuple[int, int, T]]:
    """``(index, first example, batch)`` for this process's batches of the stream from batch
    ``start`` on: indices ``≡ rank (mod world)``. The first example counts the rows of every
    earlier batch (``rows(batch)``, 0 without it), so example numbers are global where the data
    does not carry its own."""
    first = 0
    for index, batch in enumerate(batches):
        if index >= start and index % context.world == context.rank:
            yield index, first, batch
        if rows is not None:
            first += rows(batch)


def batch_rows(batch: Any) -> int:
    """The rows (examples) of a batch as the tracer counts them: a Batch's documents, else the
    first axis of the first tensor of a model-input dict (1 when there is none)."""
    from .data import Batch

    if isinstance(batch, Batch):
        return len(batch.doc_ids)
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return int(value.shape[0])
    return 1


# -- collectives ---------------------------------------------------------------------
def all_gather(value: Any, context: Context) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    if not context.distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * context.world
    dist.all_gather_object(values, value)
    return values


def gather(value: Any, context: Context) -> list[Any] | None:
    """Every process's ``value`` in rank order on rank 0; None on the others."""
    if not context.distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] | None = [None] * context.world if context.main else None
    dist.gather_object(value, values, dst=0)
    return values


def broadcast(value: Any, context: Context) -> Any:
    """Rank 0's ``value`` on every process."""
    if not context.distributed:
        return value
    import torch.distributed as dist

    box = [value if context.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(problem: BaseException | None, context: Context) -> None:
    """Raise the first process's problem (by rank) on every process, or return on all. Processes
    other than rank 0 raise it marked ``quiet`` (rank 0 tells the user)."""
    if not context.distributed:
        if problem is not None:
            raise problem
        return
    problems = all_gather(_portable(problem), context)
    first = next((p for p in problems if p is not None), None)
    if first is None:
        return
    chosen = problem if problem is not None and type(problem) is type(first) and str(problem) == str(first) else first
    if not context.main:
        chosen.quiet = True
    raise chosen


def _portable(problem: BaseException | None) -> BaseException | None:
    """``problem`` as something every process can unpickle: an InputError keeps its class,
    anything else becomes an InputError naming it."""
    if problem is None or isinstance(problem, InputError):
        return problem
    return InputError(f"{type(problem).__name__}: {problem}")


def is_quiet(error: BaseException) -> bool:
    """Whether rank 0 reports ``error`` and this process should only exit."""
    return bool(getattr(error, "quiet", False))


# -- merging accumulators --------------------------------------------------------------
def merge_states(per_rank: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Accumulators rebuilt from each process's state dicts (``{site label: state}``, in rank
    order) and merged in that order; a site a process never saw is simply absent there."""
    merged: dict[str, Any] = {}
    for states in per_rank:
        for label, state in states.items():
            accumulator = from_state(state)
            if label in merged:
                merged[label].merge(accumulator)
            else:
                merged[label] = accumulator
    return merged


def from_state(state: Mapping[str, Any]) -> Any:
    """The accumulator (SiteStats or HeadSink) a state dict describes."""
    from .stats import HeadSink, SiteStats

    kinds = {SiteStats.KIND: SiteStats, HeadSink.KIND: HeadSink}
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in kinds:
        raise InputError(f"a state dict of kind {kind!r} cannot be merged; expected one of {', '.join(kinds)}")
    return kinds[kind].from_state_dict(state)


# -- torchrun for the user --------------------------------------------------------------
# torchrun's own log lines (and the failure report that follows them), e.g.
# "E1207 13:33:48.922000 7524 torch/distributed/elastic/multiprocessing/api.py:1002] failed …"
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")


def launch(arguments: list[str], processes: int) -> int:
    """Run ``python -m actscope ARGUMENTS`` in ``processes`` processes through torchrun
    (``--standalone``: this machine) and return its exit code, or the code a process exited
    with when it said why (2 for bad input). Each process gets ``OMP_NUM_THREADS`` = cores /
    processes unless it is set. torchrun's own failure report is shown only when no process
    said why it stopped (a crash, a kill); an error every process printed is shown once."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "actscope", *arguments]
    with tempfile.TemporaryDirectory(prefix="actscope-launch-") as status:
        env[STATUS_ENV] = status
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
        held = _relay(process.stderr, dedupe=not os.environ.get("ACTSCOPE_DEBUG"))
        code = _wait(process)
        said = _recorded(Path(status))
    if code != 0 and said:
        return said[0]
    sys.stderr.writelines(held)
    sys.stderr.flush()
    return code


def _relay(stream: Any, dedupe: bool) -> list[str]:
    """Copy the processes' stderr to ours as it comes (an identical line once), holding back
    torchrun's own log and report; return what was held back."""
    seen: set[str] = set()
    held: list[str] = []
    while True:
        try:
            line = stream.readline()
        except KeyboardInterrupt:  # torchrun and the processes got it too; let them finish
            continue
        if not line:
            return held
        if held or _TORCHRUN_LOG.match(line):
            held.append(line)
            continue
        if dedupe and line.strip() and line in seen:
            continue
        seen.add(line)
        sys.stderr.write(line)
        sys.stderr.flush()


def _wait(process: subprocess.Popen) -> int:
    while True:
        try:
            code = process.wait()
        except KeyboardInterrupt:
            continue
        return code if code >= 0 else 128 - code


def _recorded(status: Path) -> list[int]:
    """The non-zero exit codes processes recorded, by rank."""
    codes = []
    for file in sorted(status.glob("rank-*"), key=lambda p: int(p.name.split("-")[1])):
        try:
            code = int(file.read_text().strip())
        except (OSError, ValueError):
            continue
        if code:
            codes.append(code)
    return codes


def record_exit(code: int) -> None:
    """Leave this process's exit code where :func:`launch` reads it (when it started us)."""
    status = os.environ.get(STATUS_ENV)
    if not status or not code:
        return
    try:
        (Path(status) / f"rank-{_env_int('RANK', 0)}").write_text(str(code))
    except OSError:
        pass
