"""The training run: DDP over torchrun ranks (or one plain process), AMP on GPU, gradient
accumulation, atomic checkpoints with everything needed to resume exactly, metrics and a
loss curve. Logs and progress come from rank 0 only.

One optimiser step = `accum_steps` micro-batches of `batch_size` tiles on each of the
`world` ranks; an epoch = the tile stream cut into whole steps (the rest is dropped, so
every rank runs the same number of steps). lr follows a cosine from `lr * global batch /
256` (linear warm-up first, if asked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine import distributed as D
from engine.encoder import IMAGENET_MEAN, IMAGENET_STD
from engine.errors import ConfigError, HistoseekError
from engine.files import atomic_write_text
from pretrain.augment import augment_config
from pretrain.ccl import CCL
from pretrain.checkpoint import RUN_FORMAT, atomic_save, checkpoint_path, rng_state, set_rng_state
from pretrain.config import TrainConfig, resolve_config
from pretrain.data import TwoViewBatches, make_loader, open_source, sample_seed
from pretrain.plots import plot_loss_curve

LOG = logging.getLogger(__name__)


def _normalise(views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 B x 3 x H x W -> ImageNet-normalised float, as the engine's encoder sees tiles."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = views.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def lr_at(cfg: TrainConfig, step: int, total_steps: int, global_batch: int) -> float:
    base = cfg.lr * global_batch / 256
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    cfg: TrainConfig, *, resume: bool = False, explicit: set[str] = frozenset(), progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) CCL pretraining; returns the run summary (also in RUN_DIR/run.json)."""
    cfg.validate()
    ctx = D.init_training(cfg.device)
    try:
        with StopRequest() as stop:
            return _train(cfg, ctx, resume, set(explicit), progress, stop)
    finally:
        D.shutdown()


class StopRequest:
    """SIGTERM (a scheduler preempting the job, torchrun shutting down) or Ctrl-C asks the
    run to stop after the current step with a checkpoint, so `--resume` loses nothing. A
    second Ctrl-C stops at once. Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.asked = False
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True
        LOG.warning("%s received: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (every rank must call this at the same step)."""
        if D.dist_info()[1] == 1:
            return self.asked
        return bool(D.all_reduce_(torch.tensor([int(self.asked)], device=device), op="max").item())


def _train(
    cfg: TrainConfig, ctx: D.DistContext, resume: bool, explicit: set[str], progress: bool, stop: StopRequest
) -> dict[str, Any]:
    run_dir = Path(cfg.out)
    cfg, state = ctx.on_main(resolve_config, cfg, explicit, resume)
    amp = ctx.device.type == "cuda" if cfg.amp is None else cfg.amp
    if amp and ctx.device.type != "cuda":
        raise ConfigError("mixed precision (amp) needs a CUDA device; CPU training runs in fp32")
    if cfg.sync_bn and ctx.device.type != "cuda":
        raise ConfigError(
            "synchronised batch norm (sync_bn) needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); without it, keys use MoCo's shuffle-BN across ranks"
        )
    world, rank = ctx.world_size, ctx.rank

    source = open_source(cfg.data, tile_px=cfg.tile_px, slide_root=Path(cfg.slide_root) if cfg.slide_root else None)
    n_items = ctx.on_main(source.count)
    batches_per_epoch = n_items // (world * cfg.batch_size)
    steps_per_epoch = batches_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data}: {n_items} tiles make no full step of {world} ranks x {cfg.batch_size} tiles x {cfg.accum_steps} accumulation steps; lower the batch size or add tiles"
        )
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    global_batch = world * cfg.batch_size * cfg.accum_steps

    if cfg.queue_size < world * cfg.batch_size:
        raise ConfigError(
            f"the queue size {cfg.queue_size} is smaller than one global batch ({world * cfg.batch_size}); raise it"
        )
    model, optimizer, scaler = _build(cfg, ctx.device, amp)
    step, images_seen = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, images_seen = int(state["step"]), int(state["images_seen"])
        if state["world_size"] == world and len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        else:
            LOG.warning(
                "resuming a %d-rank run on %d ranks: data order and RNG streams differ from the original run",
                state["world_size"],
                world,
            )
            torch.manual_seed(cfg.seed + rank)
        if state["n_items"] != n_items:
            LOG.warning(
                "the data changed since the checkpoint (%d tiles then, %d now): the resumed run will not repeat the original exactly",
                state["n_items"],
                n_items,
            )
        LOG.info("resumed %s at step %d of %d", run_dir, step, total_steps)
    else:
        torch.manual_seed(cfg.seed + rank)  # per-rank streams from here on
    state = None
    query_net = (
        DistributedDataParallel(model.encoder_q, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if world > 1
        else model.encoder_q
    )
    model.shuffle_bn = not cfg.sync_bn

    metrics_path = run_dir / "metrics.jsonl"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, step)
        LOG.info(
            "CCL %s on %d rank(s), %s, %d tiles, %d steps/epoch, %d steps, global batch %d, AMP %s",
            cfg.arch,
            world,
            ctx.device,
            n_items,
            steps_per_epoch,
            total_steps,
            global_batch,
            "on" if amp else "off",
        )

    augment = augment_config(cfg.crop_px, cfg.min_crop_scale, cfg.jitter)
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="pretrain", disable=not (progress and ctx.is_main))
    sums: dict[str, float] = {}
    window_start, window_images, window_steps = time.perf_counter(), 0, 0
    throughput: list[float] = []
    stopping = False
    while step < total_steps and not stopping:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        dataset = TwoViewBatches(
            source,
            epoch=epoch,
            seed=cfg.seed,
            rank=rank,
            world=world,
            batch_size=cfg.batch_size,
            num_batches=steps_per_epoch * cfg.accum_steps,
            skip_batches=in_epoch * cfg.accum_steps,
            augment=augment,
            shuffle_block=cfg.shuffle_block,
        )
        model.train()
        expected = in_epoch * cfg.accum_steps
        for batch_index, views_q, views_k in make_loader(dataset, cfg.workers, pin_memory=ctx.device.type == "cuda"):
            if batch_index != expected:
                raise RuntimeError(f"data loader delivered batch {batch_index}, expected {expected}")
            expected += 1
            last_micro = (batch_index + 1) % cfg.accum_steps == 0
            sync = contextlib.nullcontext() if last_micro or world == 1 else query_net.no_sync()
            with sync:
                with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=amp):
                    seed = sample_seed(cfg.seed, epoch, batch_index, salt=2)
                    loss, stats = model(
                        _normalise(views_q, ctx.device), _normalise(views_k, ctx.device), seed=seed, encoder_q=query_net
                    )
                if not torch.isfinite(loss):
                    raise HistoseekError(
                        f"loss became {float(loss)} at step {step}; lower the learning rate or check the data"
                    )
                scaler.scale(loss / cfg.accum_steps).backward()
            for key in ("loss", "loss_instance", "loss_group", "acc_instance"):
                sums[key] = sums.get(key, 0.0) + float(stats[key]) / cfg.accum_steps
            if not last_micro:
                continue
            lr = lr_at(cfg, step, total_steps, global_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            model.momentum_update()
            step += 1
            images_seen += global_batch
            window_images += global_batch
            window_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                img_per_s = window_images / max(now - window_start, 1e-9)
                throughput.append(img_per_s)
                row = _reduce_stats(sums, ctx.device, window_steps)
                window_start, window_images, window_steps = now, 0, 0
                row.update(step=step, epoch=epoch, lr=lr, img_per_s=img_per_s, images_seen=images_seen)
                sums = {}
                if ctx.is_main:
                    with open(metrics_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}")
            stopping = stop.agreed(ctx.device)
            if stopping or step % cfg.checkpoint_every == 0 or step == total_steps:
                _save(cfg, ctx, run_dir, model, optimizer, scaler, step, steps_per_epoch, images_seen, n_items)
            if stopping or step >= total_steps or step % steps_per_epoch == 0:
                break
    bar.close()
    # the first window includes start-up (workers, first allocations); leave it out when there are more
    steady = throughput[1:] or throughput
    summary = {
        "run_dir": str(run_dir),
        "arch": cfg.arch,
        "steps": step,
        "stopped_early": stopping,
        "images_seen": images_seen,
        "world_size": world,
        "device": str(ctx.device),
        "amp": amp,
        "global_batch": global_batch,
        "img_per_s": sum(steady) / len(steady) if steady else None,
    }
    if ctx.is_main:
        summary["img_per_s_per_rank"] = summary["img_per_s"] / world if summary["img_per_s"] else None
        atomic_write_text(run_dir / "run.json", json.dumps(summary, indent=1))
        if stopping:
            LOG.warning("stopped at step %d of %d on request; resume the run to continue", step, total_steps)
        else:
            LOG.info(
                "done: %d steps, %d images; checkpoint %s, loss curve %s",
                step,
                images_seen,
                checkpoint_path(run_dir),
                run_dir / "loss.png",
            )
    return summary


def _build(
    cfg: TrainConfig, device: torch.device, amp: bool
) -> tuple[CCL, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = CCL(
        cfg.arch,
        cfg.proj_dim,
        cfg.queue_size,
        cfg.key_momentum,
        cfg.temperature,
        cfg.num_clusters,
        cfg.kmeans_iters,
        cfg.group_temperature,
        cfg.group_weight,
        cfg.same_cluster_weight,
    )
    if cfg.sync_bn:
        model.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
        model.encoder_k = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_k)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay
    )
    return model, optimizer, torch.amp.GradScaler("cuda", enabled=amp)


def _reduce_stats(sums: dict[str, float], device: torch.device, steps: int) -> dict[str, float]:
    """Mean of the logged statistics over the window's steps and over all ranks."""
    keys = sorted(sums)
    vec = torch.tensor([sums[k] / steps for k in keys], dtype=torch.float64, device=device)
    vec = D.all_reduce_(vec) / D.dist_info()[1]
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


def _save(cfg, ctx, run_dir, model, optimizer, scaler, step, steps_per_epoch, images_seen, n_items) -> None:
    rngs = ctx.all_gather(rng_state())  # every rank takes part; rank 0 writes
    if not ctx.is_main:
        return
    atomic_save(
        {
            "format": RUN_FORMAT,
            "config": dataclasses.asdict(cfg),
            "step": step,
            "epoch": step // steps_per_epoch,
            "images_seen": images_seen,
            "world_size": ctx.world_size,
            "n_items": n_items,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
        },
        checkpoint_path(run_dir),
    )
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows after `step` (written by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
