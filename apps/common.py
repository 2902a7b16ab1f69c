"""Training plumbing shared by the apps: device and distributed setup, worker processes for
independent solves (:func:`worker_pool`, :func:`map_calls`), atomic checkpoints, metrics (JSON
and CSV), training-curve plots, the output folder, the dataset cache, ROC AUC, and the apps'
weight network.

Nothing here knows an app: ``apps.harness.fit`` and the apps' tasks call these.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`setup_distributed`
joins the process group (gloo on CPU, nccl on CUDA); each rank then trains on its shard
(:func:`shard`), the model is wrapped in ``DistributedDataParallel`` (:func:`wrap_model`), sums are
combined with :func:`all_reduce_sum`, and only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from core.threads import add_busy

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT = "checkpoint.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"


# ------------------------------------------------------------------------------------------
# device, threads, distributed
# ------------------------------------------------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise ``name`` (``cuda`` raises when CUDA is
    missing rather than silently running on the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return device


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by ``torchrun`` with several processes (gloo on CPU,
    nccl on CUDA; each rank on ``cuda:LOCAL_RANK``); a single process returns ``Dist()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and local >= torch.cuda.device_count():
        raise RuntimeError(
            f"torchrun started local rank {local}, but this node has "
            f"{torch.cuda.device_count()} CUDA device(s) and nccl needs one per rank: use "
            "--nproc_per_node <= the GPU count, or device=cpu (gloo)"
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank, world, local)


def rank_device(device: torch.device, d: Dist) -> torch.device:
    """The device this rank uses (``cuda:LOCAL_RANK`` under a multi-GPU launch)."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def teardown_distributed(d: Dist, finished: bool) -> None:
    """Leave the process group. After a ``finished`` run every rank first waits for the others:
    a rank that destroyed its group and exited while another still worked was aborted by gloo
    ("terminate called without an active exception", 2-3 times in about 25 runs here). After an
    error there is no barrier (the other ranks may be inside a collective; torchrun stops them)."""
    if d.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def shard(items: Sequence[T], d: Dist) -> list[T]:
    """This rank's share of ``items`` (round robin)."""
    return list(items[d.rank :: d.world_size])


def roc_auc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``score (N,)`` for the labels ``positive (N,)`` (ties count
    half), by ranks (Mann-Whitney U); NaN when a class is empty."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(score.double().cpu(), return_inverse=True,
                                      return_counts=True)
    first = counts.cumsum(0) - counts  # 0-based rank of each distinct value's first element
    mid_rank = (first + (counts - 1) / 2.0 + 1)[inverse]  # average rank, 1-based
    u = float(mid_rank[positive.cpu()].sum()) - pos * (pos + 1) / 2
    return u / (pos * neg)


def all_reduce_sum(values: Sequence[float], d: Dist) -> list[float]:
    """Sum ``values`` over ranks (identity when not distributed)."""
    if not d.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def saved_bytes(root: Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``root`` (the ``_saved_*``
    tensors of every node of its graph and the ``saved_tensors`` of custom Functions, each
    distinct tensor once): the memory a backward mode
    needs, which grows with the unrolled iterations and stays flat for the implicit backward.
    Read it before ``root.backward()`` frees them."""
    seen_nodes, seen_tensors, total = set(), set(), 0
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for name in dir(node):
            if not name.startswith("_saved_") and name != "saved_tensors":  # custom Functions'
                continue
            try:
                saved = getattr(node, name)
            except RuntimeError:  # already freed
                continue
            for t in saved if isinstance(saved, tuple | list) else (saved,):
                if isinstance(t, Tensor) and t.layout == torch.strided:
                    key = (t.data_ptr(), t.numel(), t.dtype)
                    if key not in seen_tensors:
                        seen_tensors.add(key)
                        total += t.numel() * t.element_size()
        stack += [f for f, _ in node.next_functions if f is not None]
    return total


def gather_items(values: Sequence[float] | Tensor, mine: Sequence[int], total: int, d: Dist
                 ) -> list[float]:
    """The per-item values of every rank in one list of ``total``: this rank's ``values`` go to
    its item indices ``mine`` (zeros elsewhere) and the lists are summed over ranks (statistics
    such as medians need every item, not sums)."""
    values = values.tolist() if isinstance(values, Tensor) else list(values)
    full = [0.0] * total
    for k, v in zip(mine, values):
        full[k] = float(v)
    return all_reduce_sum(full, d)


# ------------------------------------------------------------------------------------------
# worker processes for independent computations (the apps' reference baselines)
# ------------------------------------------------------------------------------------------

#: one process pool per size, made on first use and shut down at interpreter exit
_POOLS: dict[int, ProcessPoolExecutor] = {}
#: ``(function, args)``: one call of :func:`map_calls`
Call = tuple[Callable[..., Any], tuple]


def _worker_init() -> None:
    """A worker starts with one torch thread and one compiled-kernel thread: the calling
    process keeps the other cores (``core.parallel``'s rule sees both processes' load)."""
    os.environ["ARIADNE_KERNEL_THREADS"] = "1"
    torch.set_num_threads(1)


def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def release_pools() -> None:
    """Let the workers of :func:`worker_pool` go now, without waiting for them (the harness
    calls it once a run's baselines are done): a worker tears itself down (~1 s) on the second
    core while training runs, instead of at exit, where the interpreter waits for it; a later
    :func:`worker_pool` starts a new one."""
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


def worker_pool(workers: int, device: torch.device) -> ProcessPoolExecutor | None:
    """A pool of ``workers`` spawned processes for :func:`map_calls` (made once per size and
    kept until exit or :func:`release_pools`, its processes started at once: a worker's
    start-up, importing torch and the app, is paid once, beside the caller's work); None for
    ``workers == 0``, under torchrun (the ranks already share the cores) and off the CPU."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if workers == 0 or distributed or torch.device(device).type != "cpu":
        return None
    if workers not in _POOLS:
        if not _POOLS:
            atexit.register(_shutdown_pools)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)
        for _ in range(workers):  # start them now (a start-up, ~3 s of imports, overlaps the
            pool.submit(os.getpid)  # caller's work until the first map_calls)
        _POOLS[workers] = pool
    return _POOLS[workers]


def map_calls(calls: Sequence[Call], pool: Executor | None) -> list[Any]:
    """``[fn(*args) for fn, args in calls]``, each call independent of the others (a pure
    function of its arguments: the result is the same wherever it runs). With a ``pool``, its
    processes take the calls from the back while this process takes them from the front (a
    call the pool has not started yet is cancelled there and run here), so both stay busy
    until the last call; arguments and results are pickled (module-level functions only).
    A pool that breaks (a worker killed) leaves its calls to this process. The workers' busy
    seconds count as this process's own load (``core.threads.add_busy``): without that, the
    load average they leave behind (a minute's decay) made ``core``'s kernels run on one
    thread for the training that follows (bundle adjustment's steps 16.6 -> 25.4 s)."""
    if pool is None:
        return [fn(*args) for fn, args in calls]
    plain: dict[int, DictConfig] = {}  # a config's enums pickle by a name they were not made
    futures: list[Future | None] = [None] * len(calls)  # under: plain values, converted once
    try:
        for k in reversed(range(len(calls))):
            args = tuple(_picklable(a, plain) for a in calls[k][1])
            futures[k] = pool.submit(_pickled_call, pickle.dumps((calls[k][0], args)))
    except BrokenExecutor:
        log.warning("worker pool broken: running its calls here")
    results: list[Any] = [None] * len(calls)
    done = [False] * len(calls)
    for k, (fn, args) in enumerate(calls):
        f = futures[k]
        if f is None or f.cancel():
            results[k], done[k] = fn(*args), True
    for k, f in enumerate(futures):
        if not done[k]:
            try:
                busy, results[k] = pickle.loads(f.result())  # type: ignore[union-attr]
                add_busy(busy)
            except BrokenExecutor:
                log.warning("worker pool broken: running call %d here", k)
                results[k] = calls[k][0](*calls[k][1])
    return results


def _pickled_call(call: bytes) -> bytes:
    """A worker's side of :func:`map_calls`: ``fn(*args)`` of the pickled ``(fn, args)``,
    pickled. Plain pickle both ways, as bytes: the pool's own pickler (torch's reductions for
    multiprocessing) would move each tensor argument's storage into shared memory in place,
    under the feet of this process's kernels still reading it (a segfault, seen)."""
    fn, args = pickle.loads(call)
    start = time.perf_counter()
    result = fn(*args)
    return pickle.dumps((time.perf_counter() - start, result))


def _picklable(arg: Any, plain: dict[int, DictConfig]) -> Any:
    """``arg``, or a config (``DictConfig``) as a schema-free one of plain values."""
    if not isinstance(arg, DictConfig):
        return arg
    if id(arg) not in plain:
        plain[id(arg)] = OmegaConf.create(OmegaConf.to_container(arg, resolve=True,
                                                                 enum_to_str=True))
    return plain[id(arg)]


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {threads}")
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------


def output_dir(configured: str | None = None) -> Path:
    """``configured`` when given, else Hydra's run folder when Hydra is running, else the
    current folder; created if missing."""
    if configured is not None:
        path = Path(configured)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except (ImportError, ValueError):
            path = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path`` (same folder, so the rename is atomic). The
    file gets the permissions of a plainly created file (``0666`` less the umask; ``mkstemp``'s
    own are ``0600``). A temp file left by a killed writer is named ``.<name>.<random>``:
    :func:`remove_stale_temps` removes those."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files :func:`atomic_write` left next to ``path`` when a writer was killed
    (``.<name>.<random>``); returns them."""
    stale = [p for p in path.parent.glob(f".{path.name}.*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d temp file(s) of an interrupted write of %s", len(stale), path)
    return stale


def cached(
    cache_dir: str | Path | None,
    name: str,
    key: Mapping[str, Any],
    make: Callable[[], list[T]],
    save: Callable[[T], dict],
    load: Callable[[dict], T],
) -> list[T]:
    """``make()``, or its result stored in ``cache_dir`` (None: no cache) under ``name`` and a
    hash of ``key`` (sorted JSON); items are stored as ``save(item)`` dicts and read back with
    ``load``. Written atomically: several processes (torchrun ranks) may write the same file. A
    file that cannot be read back raises ``ValueError`` naming it (delete it to regenerate)."""
    if cache_dir is None:
        return make()
    digest = hashlib.sha1(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}_{digest}.pt"
    if path.is_file():
        try:
            return [load(d) for d in torch.load(path, weights_only=True)]
        except Exception as exc:  # a truncated or foreign file: say which, lose nothing
            raise ValueError(f"{path}: cannot read the cached data set ({type(exc).__name__}: "
                             f"{exc}); delete the file to generate it again") from exc
    items = make()
    atomic_write(path, lambda tmp: torch.save([save(x) for x in items], tmp))
    return items


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` atomically: a reader sees the old file or the new one, never half."""
    atomic_write(Path(path), lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file: say which
        raise ValueError(f"{path}: cannot read checkpoint ({exc})") from exc


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and CUDA) generator states, for an exact resume."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _clean(x: Any) -> Any:
    """JSON-safe: tensors to numbers, non-finite floats to None."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def json_line(doc: Any) -> str:
    """``doc`` as one line of valid JSON: tensors as numbers, non-finite floats as ``null``."""
    return json.dumps(_clean(doc), allow_nan=False)


def exit_if_failed(prog: str, summary: Mapping[str, Any], as_json: bool) -> None:
    """End a solve CLI with exit status 1 and one line on stderr when its solve failed (status
    ``failed`` or a non-finite final cost), after printing the JSON summary when ``as_json``."""
    cost = summary.get("final_cost", float("nan"))
    if summary.get("status") != "failed" and math.isfinite(cost):
        return
    if as_json:
        print(json_line(summary), flush=True)
    raise SystemExit(f"{prog}: error: the solve failed (status {summary.get('status')}, final "
                     f"cost {cost}): the problem has non-finite values or no decrease was "
                     "possible")


def write_metrics(
    folder: str | Path,
    app: str,
    epochs: int,
    train_time_s: float,
    val: Mapping[str, float],
    history: Sequence[Mapping[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """``metrics.json`` (APPS.md schema, plus ``extra`` top-level keys) and ``metrics.csv`` (one
    row per ``history`` entry), both atomically. Returns the JSON object."""
    folder = Path(folder)
    doc = _clean({"app": app, "epochs": epochs, "train_time_s": train_time_s, "val": dict(val),
                  "history": [dict(h) for h in history], **extra})
    text = json.dumps(doc, indent=2)
    atomic_write(folder / METRICS_JSON, lambda tmp: tmp.write_text(text + "\n"))
    write_csv(folder / METRICS_CSV, history)
    return doc


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rows to CSV (columns: the union of keys, in first-seen order), atomically."""
    rows = [dict(r) for r in rows]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow(_clean(r))

    atomic_write(Path(path), write)


def plot_curves(
    path: str | Path,
    history: Sequence[Mapping[str, Any]],
    panels: Sequence[Sequence[str]],
    baselines: Mapping[str, float] | None = None,
    title: str = "",
    references: Sequence[tuple[str, str, float]] = (),
) -> None:
    """One panel per group of ``history`` keys, against ``epoch``. Horizontal reference lines:
    ``baselines`` (key -> value) draws one labelled ``"<key> baseline"`` in the panel holding
    that key; each ``(key, label, value)`` of ``references`` draws one labelled ``label``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = [(k, f"{k} baseline", v) for k, v in (baselines or {}).items()] + list(
        references)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    epochs = [h["epoch"] for h in history]
    styles = ["--", ":", "-."]
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            values = [h.get(key, float("nan")) for h in history]
            values = [float("nan") if v is None else v for v in values]
            ax.plot(epochs, values, marker="o", label=key)
        mine = [r for r in references if r[0] in keys]
        for (_, label, level), style in zip(mine, styles * len(mine)):
            ax.axhline(level, ls=style, color="gray", label=label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


class WeightNet(nn.Module):
    """``features (N, F) -> (weights (N,), scale ())``: the apps' perception head.

    Features are standardized with statistics fixed from the training set
    (:meth:`fit_normalization`); an MLP with ``hidden`` units per layer gives one logit per item
    (edge, observation), ``weight = sigmoid(logit)``; the robust-loss scale is ``exp(log_scale)``
    (always > 0). ``bias`` sets the initial logit; ``zero_head`` also zeroes the head's weights
    so every item starts at ``sigmoid(bias)``.
    """

    def __init__(self, num_features: int, hidden: int = 32, layers: int = 2, scale: float = 1.0,
                 bias: float = 2.0, zero_head: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        if num_features < 1 or hidden < 1 or layers < 0 or not scale > 0:
            raise ValueError(f"{name}: bad sizes features={num_features}, hidden={hidden}, "
                             f"layers={layers} or scale={scale}")
        dims = [num_features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        head = nn.Linear(dims[-1], 1)
        if zero_head:
            nn.init.zeros_(head.weight)
        head.bias.data.fill_(bias)
        self.mlp = nn.Sequential(*blocks, head)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def _check(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"{type(self).__name__}: features must be (N, {self.mean.shape[0]}), "
                             f"got {tuple(features.shape)}")

    @classmethod
    def from_config(cls, model: Any, features: Tensor) -> WeightNet:
        """The network of a ``model`` config (``hidden``, ``layers``, ``init_scale``,
        ``init_bias``, ``learn_scale``) in float64 on the device of the training ``features
        (N, F)``, its normalization fitted to them."""
        net = cls(features.shape[1], model.hidden, model.layers, model.init_scale,
                  model.init_bias).double().to(features.device)
        net.log_scale.requires_grad_(model.learn_scale)
        net.fit_normalization(features)
        return net

    @torch.no_grad()
    def fit_normalization(self, features: Tensor) -> None:
        """Set the standardization from training features ``(N, F)``."""
        self._check(features)
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        self._check(features)
        x = (features - self.mean) / self.std
        logit = self.mlp(x.to(self.log_scale.dtype))[:, 0]
        return torch.sigmoid(logit), self.log_scale.exp()


def weights_per_item(model: nn.Module, features: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """A :class:`WeightNet` (possibly wrapped in DistributedDataParallel) over the items' features
    ``[(N_k, F)]`` in one forward (DDP's contract: one forward per step, also on a rank with no
    item): the weights split back per item ``[(N_k,)]`` and the scale ``()``."""
    net = unwrap_model(model)
    x = torch.cat(list(features)) if features else net.mean.new_zeros(0, net.mean.shape[0])
    weights, scale = model(x)
    return list(torch.split(weights, [f.shape[0] for f in features])), scale


def solve_items(solve: Callable[[list[int], Sequence[Tensor]], tuple[list[Any], Any]],
                items: Sequence[int], weights: Sequence[Tensor], ragged: bool) -> list[Any]:
    """Each item's solution: ``solve(items, weights) -> (solutions, info)`` called once for all
    of them (``ragged``: one ``OptimizationLayer.ragged`` call) or once per item, item ``k``
    with its weights ``weights[i]``."""
    if ragged:
        return solve(list(items), weights)[0]
    return [solve([k], [w])[0][0] for k, w in zip(items, weights)]
