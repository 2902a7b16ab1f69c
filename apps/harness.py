"""The one training harness of the apps: ``fit(task, cfg)``.

An app supplies a :class:`Task`: a frozen dataclass of plain functions (its datasets, model,
batch loss, held-out evaluation, baselines, report and pictures). The harness owns everything
else, once for every app: threads, device, torchrun/DDP set-up and teardown, seeding, the dataset
seeds and cache folder, resume from the checkpoint, the epoch loop (shard, step, all-reduce), the
tqdm bar and the one-line epoch summary, atomic checkpoints, ``metrics.json``/``metrics.csv``, the
training curves, the baseline and untrained-model evaluation (computed once, kept in the
checkpoint), and the app's pictures on rank 0.

Data flow of one run::

    samples = task.dataset(cfg, seeds, cache, held_out) # train and held-out, seeded
    prepared = task.prepare(cfg, samples, device)       # problems and layers, built once
    net = task.model(cfg, prepared_train)               # after torch.manual_seed(cfg.seed)
    reference = task.baseline(run) + untrained scores   # once; kept in the checkpoint
    per epoch: task.loss(cfg, model, prepared, batch) -> backward -> Adam step
               task.evaluate(cfg, net, val) -> sums, all-reduced -> history row
    task.report(run, metrics, outputs, net) -> metrics.json; task.pictures(run, outputs, net)

Seeds: training sample ``k`` has seed ``1_000_003 * cfg.seed + k``, held-out sample ``k`` seed
``1_000_003 * cfg.seed + 500_000 + k``; the training order of epoch ``e`` is a permutation drawn
from a generator seeded with ``cfg.seed * 7919 + e``, so a resumed run takes the same batches.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from apps import common
from apps.config import check_keys, check_solver, conf_dir, value

log = logging.getLogger(__name__)


class Scores(Protocol):
    """Sums over held-out samples (a dataclass of floats: summed across ranks field by field),
    turned into metrics by :meth:`metrics`."""

    def metrics(self, suffix: str = "") -> dict[str, float]: ...


@dataclass
class Run:
    """The context the harness hands to a task's hooks.

    Attributes:
        cfg: the app's config; out: the output folder; device, dist: where this rank runs.
        cache: the dataset cache folder (``cfg.cache_dir``, else ``out/cache``).
        train_seeds, val_seeds: the seeds of the training / held-out samples.
        train_samples, val_samples: all training / held-out samples (on the CPU, as generated).
        mine: indices of the held-out samples this rank evaluates.
        train, val: ``task.prepare`` of all training samples / of this rank's held-out ones.
        reference: the baselines' results (``task.baseline``) plus ``untrained`` and ``time_s``.
    """

    cfg: Any
    out: Path
    device: torch.device
    dist: common.Dist
    cache: Path
    train_seeds: list[int]
    val_seeds: list[int]
    train_samples: list[Any]
    val_samples: list[Any]
    mine: list[int]
    train: Any
    val: Any
    reference: dict[str, Any] = field(default_factory=dict)


def _no_check(cfg: Any) -> None:
    return None


def _no_extras(net: nn.Module) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Task:
    """What an app gives :func:`fit`.

    Attributes:
        name: the app's name: its module ``apps.<name>`` and config ``conf/<name>.yaml``.
        metric: the headline held-out metric (lower is better); metrics.json's ``val`` holds it
            and ``<metric>_baseline``.
        title: what the app learns, one line (``python -m apps``, the curves' title).
        schema: the app's config dataclass (unknown keys are rejected against it).
        dataset: ``(cfg, seeds, cache_dir, held_out) -> samples``, one per seed, generated or
            read; ``held_out`` says whether they are the held-out samples (an app may draw
            those from other images, shapes or directions).
        prepare: ``(cfg, samples, device) -> prepared``: objectives and layers, built once.
        model: ``(cfg, prepared_train) -> net`` on the device (normalization fitted).
        loss: ``(cfg, model, prepared, batch) -> [loss per item]``: call ``model`` exactly once
            (it may be DistributedDataParallel), even for an empty ``batch``.
        evaluate: ``(cfg, net, prepared) -> (scores, outputs)``: summed :class:`Scores` and one
            output per sample (for the report and pictures); no gradient needed.
        baseline: ``run -> reference``: the unlearned baselines on this rank's held-out samples
            (reduced across ranks), computed once.
        report: ``(run, metrics, outputs, net) -> (val, extra)``: the final ``val`` metrics and
            extra top-level ``metrics.json`` keys.
        curves: panels of ``curves.png`` (history keys; ``val_<metric>`` etc.).
        curve_lines: ``reference -> [(history key, label, value)]`` horizontal reference lines.
        pictures: ``(run, outputs, net) -> None``: the app's pictures (rank 0, when ``cfg.viz``).
        check: ``cfg -> None``: raise ``ValueError`` for values the schema's types allow but the
            app cannot use.
        extras: ``net -> {key: value}`` added to each history row (e.g. a learned scale).
        keys: the held-out metric keys the app promises in ``metrics.json``'s ``val`` (the
            contract tests check them).
    """

    name: str
    metric: str
    title: str
    schema: type
    dataset: Callable[[Any, Sequence[int], Path | None, bool], list[Any]]
    prepare: Callable[[Any, Sequence[Any], torch.device], Any]
    model: Callable[[Any, Any], nn.Module]
    loss: Callable[[Any, nn.Module, Any, Sequence[int]], list[Tensor]]
    evaluate: Callable[[Any, nn.Module, Any], tuple[Scores, list[Any]]]
    baseline: Callable[[Run], dict[str, Any]]
    report: Callable[[Run, dict[str, float], list[Any], nn.Module],
                     tuple[dict[str, float], dict[str, Any]]]
    curves: tuple[tuple[str, ...], ...] = (("train_loss", "val_loss"),)
    curve_lines: Callable[[dict[str, Any]], list[tuple[str, str, float]]] = lambda ref: []
    pictures: Callable[[Run, list[Any], nn.Module], None] | None = None
    check: Callable[[Any], None] = _no_check
    extras: Callable[[nn.Module], dict[str, float]] = _no_extras
    keys: tuple[str, ...] = ()


def reduce_scores(scores: Any, d: common.Dist) -> Any:
    """``scores`` (a dataclass of float sums) summed over ranks, field by field."""
    names = [f.name for f in fields(scores)]
    summed = common.all_reduce_sum([getattr(scores, n) for n in names], d)
    return replace(scores, **dict(zip(names, summed)))


def check_config(task: Task, cfg: Any) -> None:
    """Raise ``ValueError`` on unknown keys and on values the schema's types cannot rule out."""
    if isinstance(cfg, DictConfig):
        check_keys(cfg, task.schema)
    checks = [
        (cfg.epochs >= 0, f"epochs must be >= 0, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.num_train >= 1, f"num_train must be >= 1, got {cfg.num_train}"),
        (cfg.num_val >= 1, f"num_val must be >= 1, got {cfg.num_val}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.show:
        from apps.viewer import check_display

        try:
            check_display()
        except RuntimeError as exc:
            raise ValueError(f"show=true opens an Open3D window, but {exc}; the pictures are "
                             "written as PNG files anyway (viz=true)") from None
    task.check(cfg)


@dataclass
class _State:
    """What a checkpoint restores."""

    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    train_time_s: float = 0.0
    reference: dict[str, Any] | None = None


def fit(task: Task, cfg: Any) -> dict[str, Any]:
    """Train and evaluate ``task`` as ``cfg`` says; returns the ``metrics.json`` object (rank 0)
    or the held-out metrics (other ranks)."""
    check_config(task, cfg)
    common.set_threads(cfg.threads)
    device = common.select_device(cfg.device)
    check_solver(cfg, device)
    d = common.setup_distributed(device)
    device = common.rank_device(device, d)
    if not d.is_main:
        logging.getLogger("apps").setLevel(logging.WARNING)  # one rank reports
    finished = False
    try:
        result = _fit(task, cfg, device, d)
        finished = True
        return result
    finally:
        common.teardown_distributed(d, finished)


def _fit(task: Task, cfg: Any, device: torch.device, d: common.Dist) -> dict[str, Any]:
    out = common.output_dir(cfg.out_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    base = 1_000_003 * cfg.seed
    train_seeds = [base + k for k in range(cfg.num_train)]
    val_seeds = [base + 500_000 + k for k in range(cfg.num_val)]
    train_samples = task.dataset(cfg, train_seeds, cache, False)
    val_samples = task.dataset(cfg, val_seeds, cache, True)
    mine = common.shard(list(range(len(val_samples))), d)
    train = task.prepare(cfg, train_samples, device)
    val = task.prepare(cfg, [val_samples[k] for k in mine], device)

    torch.manual_seed(cfg.seed)
    net = task.model(cfg, train)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    state = _resume(cfg, out, net, opt, d)
    model = common.wrap_model(net, d)
    run = Run(cfg, out, device, d, cache, train_seeds, val_seeds, train_samples, val_samples,
              mine, train, val)
    if state.reference is None:
        state.reference = _reference(task, run, net)
    run.reference = state.reference

    bar = tqdm(range(state.epoch, cfg.epochs), initial=state.epoch, total=cfg.epochs,
               desc=task.name, disable=not d.is_main, dynamic_ncols=True)
    key = f"val_{task.metric}"
    last = None  # the last epoch's held-out evaluation: the final one, unless none ran here
    for epoch in bar:
        row, last = _epoch(task, run, epoch, model, net, opt)
        state.history.append(row)
        state.epoch, state.train_time_s = epoch + 1, state.train_time_s + row["epoch_time_s"]
        if d.is_main:
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": state.epoch,
                "history": state.history, "train_time_s": state.train_time_s,
                "reference": state.reference, "rng": common.rng_state(),
                "config": _plain(cfg)})
        bar.set_postfix(loss=f"{row['train_loss']:.4g}", **{task.metric: f"{row[key]:.4g}"})
        extras = "".join(f"  {k} {v:.3g}" for k, v in task.extras(net).items())
        log.info("epoch %d/%d  train_loss %.4f  %s %.4f (baseline %.4f)%s  %.1f s", epoch + 1,
                 cfg.epochs, row["train_loss"], key, row[key],
                 state.reference[f"{task.metric}_baseline"], extras, row["epoch_time_s"])
    return _finish(task, run, net, state, last)


def _plain(cfg: Any) -> Any:
    """The config as plain containers (enums as strings), for the checkpoint."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def _resume(cfg: Any, out: Path, net: nn.Module, opt: torch.optim.Optimizer,
            d: common.Dist) -> _State:
    """The state to start from: the checkpoint's with ``resume=true``, else a fresh one. Temp
    files of an interrupted checkpoint write are removed (rank 0)."""
    if d.is_main:
        common.remove_stale_temps(out / common.CHECKPOINT)
    saved = common.load_checkpoint(out / common.CHECKPOINT) if cfg.resume else None
    if saved is None:
        if cfg.resume:
            log.warning("resume=true but %s has no checkpoint: starting afresh", out)
        return _State()
    try:
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        common.set_rng_state(saved["rng"])
        state = _State(list(saved["history"]), int(saved["epoch"]),
                       float(saved["train_time_s"]), saved["reference"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{out / common.CHECKPOINT}: not a checkpoint of this run's model and "
                         f"settings ({type(exc).__name__}: {exc})") from exc
    log.info("resumed from %s at epoch %d", out / common.CHECKPOINT, state.epoch)
    return state


def _reference(task: Task, run: Run, net: nn.Module) -> dict[str, Any]:
    """The baselines and the untrained network's held-out scores, once."""
    t = time.perf_counter()
    try:
        ref = task.baseline(run)
    finally:  # the baselines are the last use of the apps' worker processes in a run
        common.release_pools()
    untrained, _ = task.evaluate(run.cfg, net, run.val)
    ref["untrained"] = {f"val_{k}": v
                        for k, v in reduce_scores(untrained, run.dist).metrics().items()}
    ref["time_s"] = time.perf_counter() - t
    key = f"{task.metric}_baseline"
    if key not in ref:
        raise KeyError(f"{task.name}: task.baseline must return {key!r}")
    log.info("baseline: %s %.4f, untrained %.4f [%.1f s]", key, ref[key],
             ref["untrained"][f"val_{task.metric}"], ref["time_s"])
    return ref


def learning_rate(cfg: Any, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under ``cfg.lr_schedule``."""
    if value(cfg.lr_schedule) == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    return cfg.lr


def _epoch(task: Task, run: Run, epoch: int, model: nn.Module, net: nn.Module,
           opt: torch.optim.Optimizer) -> tuple[dict[str, float], tuple[Scores, list[Any]]]:
    """One pass over the training samples, then the held-out scores: the epoch's history row
    (with ``step_time_s``, the mean time of an optimizer step on this rank, and ``saved_mb``, the
    most memory a step's forward kept for its backward: ``common.saved_bytes``) and
    ``task.evaluate``'s result."""
    cfg, d = run.cfg, run.dist
    t = time.perf_counter()
    num = len(run.train_samples)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, epoch)
    loss_sum, step_times, saved = 0.0, [], []
    for b in range(0, num, cfg.batch_size):
        batch = order[b : b + cfg.batch_size].tolist()
        start = time.perf_counter()
        loss, kept = _step(task, run, model, batch[d.rank :: d.world_size], len(batch), opt)
        step_times.append(time.perf_counter() - start)
        loss_sum += loss
        saved.append(kept)
    (loss_sum,) = common.all_reduce_sum([loss_sum], d)
    evaluated = task.evaluate(cfg, net, run.val)
    metrics = reduce_scores(evaluated[0], d).metrics()
    return {"epoch": epoch + 1, "train_loss": loss_sum / num,
            **{f"val_{k}": v for k, v in metrics.items()}, **task.extras(net),
            "saved_mb": max(saved) / 2**20, "step_time_s": sum(step_times) / len(step_times),
            "epoch_time_s": time.perf_counter() - t}, evaluated


def _step(task: Task, run: Run, model: nn.Module, batch: list[int], batch_size: int,
          opt: torch.optim.Optimizer) -> tuple[float, int]:
    """One optimizer step on this rank's items ``batch`` of a global batch of ``batch_size``;
    returns the sum of their losses and the bytes kept for the backward. Gradients are averaged
    over the global batch (DDP sums the ranks' means, hence ``world / batch_size``)."""
    losses = task.loss(run.cfg, model, run.train, batch)
    if len(losses) != len(batch):
        raise ValueError(f"{task.name}: task.loss returned {len(losses)} losses for a batch of "
                         f"{len(batch)}")
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.sum() for p in params) * 0  # every parameter in the graph, even with no item
    for loss in losses:
        total = total + loss * run.dist.world_size / batch_size
    kept = common.saved_bytes(total)
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return sum(float(loss.detach()) for loss in losses), kept


def _finish(task: Task, run: Run, net: nn.Module, state: _State,
            last: tuple[Scores, list[Any]] | None = None) -> dict[str, Any]:
    """Final held-out metrics; on rank 0 also ``metrics.json``/``.csv``, the curves and the
    pictures."""
    cfg, d, ref = run.cfg, run.dist, run.reference
    # the network has not changed since the last epoch's evaluation (``last``): no re-solve
    scores, outputs = last if last is not None else task.evaluate(cfg, net, run.val)
    metrics = reduce_scores(scores, d).metrics()
    val, extra = task.report(run, metrics, outputs, net)
    log.info("val: %s", {k: round(v, 4) for k, v in val.items()})
    if not d.is_main:
        return val
    doc = common.write_metrics(
        run.out, task.name, cfg.epochs, state.train_time_s, val, state.history,
        **extra, untrained=ref["untrained"], baseline_time_s=ref["time_s"],
        backward=str(value(cfg.optimizer.backward)),
        implicit_hessian=str(value(cfg.optimizer.implicit_hessian)))
    if state.history:
        common.plot_curves(run.out / "curves.png", [{"epoch": 0, **ref["untrained"]},
                                                    *state.history],
                           [list(p) for p in task.curves], references=task.curve_lines(ref),
                           title=f"{task.title} ({cfg.num_train} training samples)")
    if cfg.viz and task.pictures is not None:
        try:
            task.pictures(run, outputs, net)
        except Exception:  # a picture never fails a run
            log.exception("%s: could not draw the pictures", task.name)
    return doc


def main_for(task: Task) -> Callable[[], None]:
    """The Hydra entry point of ``task`` (``python -m apps.<name> [overrides]``). A
    ``ValueError`` (a bad setting or input, which names the problem) ends the run with that one
    line on stderr and exit status 1 (``HYDRA_FULL_ERROR=1``: the traceback instead)."""
    import hydra

    @hydra.main(config_path=str(conf_dir()), config_name=task.name, version_base=None)
    def main(cfg: DictConfig) -> None:
        try:
            doc = fit(task, cfg)
        except ValueError as exc:  # a bad setting or input: one line, exit status 1
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise SystemExit(f"python -m apps.{task.name}: error: {exc}") from None
        val = doc.get("val", doc)
        if not math.isfinite(val.get(task.metric, float("nan"))):
            raise RuntimeError(f"non-finite held-out {task.metric}: {val}")

    return main
