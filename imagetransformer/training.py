"""Training and evaluation (SPEC.md section 3): Adam, noam schedule, clipping, exact bits/dim.

A run lives in one folder (DESIGN.md 4). Resuming is exact: the data order of every epoch is a
pure function of (seed, epoch), and the checkpoint holds the weights, the optimizer, the step
and the torch RNG state (dropout), so a resumed run takes the same steps as an unbroken one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    atomic_write_text,
    load_checkpoint,
    load_state_checked,
    save_checkpoint,
    save_pretrained,
)
from .config import ImageTransformerConfig, TrainConfig
from .data import ImageDataset
from .errors import UserError
from .grid import save_grid
from .model import ImageTransformer, sub_pixel_nll
from .precision import autocast, grad_scaler

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = 1
# Settings a resumed run may change: they steer the loop, not the function being learned.
RESUMABLE_OVERRIDES = (
    "max_steps",
    "eval_every",
    "eval_images",
    "checkpoint_every",
    "sample_every",
    "sample_count",
    "log_every",
    "precision",
    "compile",
)


def learning_rate(step: int, cfg: TrainConfig, d_model: int) -> float:
    """SPEC.md 3: noam, `base*10*d^-0.5*min((s+1)*w^-1.5, (s+1)^-0.5)`, peak at s = w.

    `cosine` warms up linearly to the same peak, then decays to zero at `max_steps`: for short
    CPU runs that end long before noam's slow decay has done its work.
    """
    s, w = step + 1, cfg.warmup_steps
    scale = cfg.learning_rate * 10 * d_model**-0.5
    if cfg.lr_schedule == "noam":
        return scale * min(s * w**-1.5, s**-0.5)
    peak = scale * w**-0.5
    if s <= w:
        return peak * s / w
    progress = min(1.0, (s - w) / max(1, cfg.max_steps - w))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Adam:
    """Adam with the paper's betas (0.9, 0.98) and eps 1e-9, no weight decay."""
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example indices of training step `step`: a fixed function of (seed, epoch)."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if batch_size > n:
        return perm[torch.arange(batch_size) % n]
    return perm[offset * batch_size : (offset + 1) * batch_size]


@torch.no_grad()
def evaluate(
    model: ImageTransformer,
    dataset: ImageDataset,
    batch_size: int = 64,
    max_images: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    context: distributed.Context = distributed.SINGLE,
) -> dict[str, Any]:
    """Exact bits/dim over the split (or its first `max_images`), plus per-channel bits/dim.

    The network may run in bf16/fp16 (`precision`); the log-softmax is taken in float32 and
    sums are accumulated in float64, so the figure does not depend on the batch size.
    """
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    conditional = model.config.num_classes > 0
    channels = model.config.image_shape[0]
    per_channel = torch.zeros(channels, dtype=torch.float64)
    mine = torch.arange(context.rank, n, context.world_size)  # each process its own share
    bar = tqdm(range(0, len(mine), batch_size), desc="eval", disable=not progress, leave=False)
    for start in bar:
        images, labels = dataset.batch(mine[start : start + batch_size])
        images = images.to(device)
        labels = labels.to(device) if conditional and labels is not None else None
        with autocast(device, precision):
            logits = model(images, labels)
        nll = sub_pixel_nll(logits, images)  # [B, C, H, W] nats, float32
        per_channel += nll.double().sum(dim=(0, 2, 3)).cpu()
    model.train(was_training)
    per_channel = distributed.all_reduce_sum(per_channel.to(device), context).cpu()
    dims = n * math.prod(model.config.image_shape[1:])
    per_channel_bpd = (per_channel / dims / math.log(2)).tolist()
    return {
        "bits_per_dim": float(per_channel.sum() / (dims * channels) / math.log(2)),
        "bits_per_dim_per_channel": per_channel_bpd,
        "images": n,
    }


@dataclass
class RunInfo:
    """What a run folder records besides the model config: the data and the recipe."""

    train: TrainConfig
    data: str = "mnist5k"
    preset: str | None = None
    image_size: int | None = None
    channels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "train": self.train.to_dict(),
                "data": self.data,
                "preset": self.preset,
                "image_size": self.image_size,
                "channels": self.channels,
                **self.extra,
            },
            indent=2,
        )

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        path = run_dir / RUN_FILE
        if not path.is_file():
            raise UserError(f"{path} not found: {run_dir} is not a run folder of this tool")
        data = json.loads(path.read_text())
        return cls(
            train=TrainConfig.from_dict(data.pop("train")),
            data=data.pop("data"),
            preset=data.pop("preset", None),
            image_size=data.pop("image_size", None),
            channels=data.pop("channels", None),
            extra=data,
        )


class _Logger:
    """JSONL always; TensorBoard scalars when the `tensorboard` package is installed."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / LOG_FILE
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:
            tqdm.write("note: TensorBoard logging is off (pip install tensorboard to enable it)")

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """Owns a run folder: builds or resumes the model, trains, evaluates, checkpoints, samples."""

    def __init__(
        self,
        run_dir: str | Path,
        model_config: ImageTransformerConfig,
        info: RunInfo,
        train_set: ImageDataset,
        test_set: ImageDataset | None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        context: distributed.Context = distributed.SINGLE,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.context = context
        self.config = model_config
        self.info = info
        self.cfg = info.train
        self.train_set, self.test_set = train_set, test_set
        self.device = torch.device(device)
        self.progress = progress and context.is_main
        _check_data_fits(model_config, train_set)
        if test_set is not None:
            _check_data_fits(model_config, test_set)
        torch.manual_seed(self.cfg.seed)
        self.model = ImageTransformer(model_config).to(self.device)
        self.optimizer = make_optimizer(self.model)
        self.scaler = grad_scaler(self.device, self.cfg.precision)
        # DDP and torch.compile wrap the training forward only; weights, checkpoints and
        # sampling use the plain module (DDP broadcasts rank 0's initial weights)
        forward: torch.nn.Module = self.model
        if context.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(forward) if self.cfg.compile else forward
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # Persistence -------------------------------------------------------------------------------
    def start_new(self) -> None:
        if (self.run_dir / CHECKPOINT_FILE).exists():
            raise UserError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, or choose "
                "another --out"
            )
        distributed.barrier(self.context)  # every rank has looked before rank 0 writes
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / CONFIG_FILE, self.config.to_json() + "\n")
            self.record_run_info()

    def record_run_info(self) -> None:
        """Write run.json (data, preset, recipe): a resume may have raised max_steps."""
        if self.context.is_main:
            atomic_write_text(self.run_dir / RUN_FILE, self.info.to_json() + "\n")

    def resume(self) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
            raise UserError(f"{path} is not a checkpoint of this tool's format {CHECKPOINT_FORMAT}")
        saved = state.get("model_config")
        if saved != self.config.to_dict():
            raise UserError(
                f"{path} was written for a different model config than {self.run_dir / CONFIG_FILE}"
                "; resume without model --set overrides, or start a new run with --out"
            )
        load_state_checked(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def save(self) -> None:
        if not self.context.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "model_config": self.config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "history": self.history,
            "rng_cpu": torch.get_rng_state(),
            "scaler": self.scaler.state_dict(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.run_dir / CHECKPOINT_FILE, state)
        save_pretrained(self.model, self.run_dir)

    # Loop --------------------------------------------------------------------------------------
    def _micro_batches(self) -> list[torch.Tensor]:
        """This process's share of the global batch of the current step, in micro-batches.

        The global batch (batch_size x processes x grad_accum images) is the same function of
        (seed, step) as in a single process, so the number of processes does not change what
        is learned.
        """
        cfg, ctx = self.cfg, self.context
        per_step = cfg.batch_size * ctx.world_size * cfg.grad_accum
        idx = batch_indices(self.step, len(self.train_set), per_step, cfg.seed)
        return [
            idx[(m * ctx.world_size + ctx.rank) * cfg.batch_size :][: cfg.batch_size]
            for m in range(cfg.grad_accum)
        ]

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = learning_rate(self.step, cfg, self.config.d_model)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._micro_batches()
        total_loss = total_nll = 0.0
        for m, idx in enumerate(micro):
            images, labels = self.train_set.batch(idx)
            images = images.to(self.device)
            labels = (
                labels.to(self.device) if self.config.num_classes and labels is not None else None
            )
            last = m == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last or not self.context.active
                else self.forward.no_sync()
            )
            with sync:
                with autocast(self.device, cfg.precision):
                    logits = self.forward(images, labels)
                nll = sub_pixel_nll(logits, images).mean()
                loss = nll
                if cfg.label_smoothing > 0:
                    loss = sub_pixel_nll(logits, images, cfg.label_smoothing).mean()
                self.scaler.scale(loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
            total_nll += nll.item() / len(micro)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {
            "loss": total_loss,
            "bits_per_dim": total_nll / math.log(2),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }

    def evaluate(self, max_images: int = 0) -> dict[str, Any]:
        if self.test_set is None:
            return {}
        return evaluate(
            self.model,
            self.test_set,
            batch_size=64,
            max_images=max_images,
            precision=self.cfg.precision,
            context=self.context,
        )

    def sample_grid(self) -> Path:
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        labels = None
        n = self.cfg.sample_count
        if self.config.num_classes:
            labels = torch.arange(n, device=self.device) % self.config.num_classes
        images = self.model.sample(n, labels=labels, generator=generator)
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_grid(images.cpu(), path)
        return path

    def fit(self, log: bool = True) -> dict[str, Any]:
        """Train to `max_steps`; returns the final evaluation."""
        cfg = self.cfg
        logger = _Logger(self.run_dir, log and self.context.is_main)
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        images_seen, window_start = 0, time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                metrics = self._train_step()
                images_seen += cfg.batch_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics["images_per_s"] = images_seen / max(elapsed, 1e-9)
                    images_seen, window_start = 0, time.perf_counter()
                    postfix = {  # a dict keeps this order; tqdm sorts keyword arguments
                        "loss": f"{metrics['loss']:.3f}",
                        "bpd": f"{metrics['bits_per_dim']:.3f}",
                        "img/s": f"{metrics['images_per_s']:.1f}",
                    }
                    bar.set_postfix(postfix)
                    logger.log(self.step, "train", metrics)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    result = self.evaluate(cfg.eval_images)
                    if result:
                        self.history.append({"step": self.step, **result})
                        logger.log(self.step, "test", _scalars(result))
                        if self.context.is_main:
                            tqdm.write(
                                f"step {self.step}: test bits/dim {result['bits_per_dim']:.4f}"
                            )
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.context.is_main:
                    self.sample_grid()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save()
        finally:
            bar.close()
        result = self.evaluate(0)
        if result:
            self.history.append({"step": self.step, "final": True, **result})
            logger.log(self.step, "test", _scalars(result))
        self.save()
        if cfg.sample_count and self.context.is_main:
            result["samples"] = str(self.sample_grid())
        logger.close()
        return result


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    out = {"bits_per_dim": result["bits_per_dim"]}
    for c, value in enumerate(result.get("bits_per_dim_per_channel", [])):
        out[f"bits_per_dim_channel{c}"] = value
    return out


def _check_data_fits(config: ImageTransformerConfig, dataset: ImageDataset) -> None:
    if tuple(dataset.shape) != tuple(config.image_shape):
        c, h, w = dataset.shape
        raise UserError(
            f"data set {dataset.name} holds {c}x{h}x{w} images but the model takes "
            f"{'x'.join(map(str, config.image_shape))}: pick a preset made for this size, or "
            f"--set image_shape={c},{h},{w} (or --image-size/--channels to convert the data)"
        )
    if config.num_classes:
        if dataset.labels is None:
            raise UserError(
                f"the model is class-conditional (num_classes={config.num_classes}) but "
                f"{dataset.name} has no labels: use a labelled set or --set num_classes=0"
            )
        if (dataset.num_classes or 0) > config.num_classes:
            raise UserError(
                f"{dataset.name} has {dataset.num_classes} classes but the model has "
                f"num_classes={config.num_classes}: --set num_classes={dataset.num_classes}"
            )
