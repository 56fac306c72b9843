"""Training and evaluation (SPEC.md section 3): Adam, noam schedule, clipping, exact bits/dim.

A run lives in one folder (DESIGN.md 4). Resuming is exact: the data order of every epoch is a
pure function of (seed, epoch), and the checkpoint holds the weights, the optimizer, the step
and every process's torch RNG state (dropout), so a resumed run takes the same steps as an
unbroken one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
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
from .model import ImageTransformer
from .precision import autocast, grad_scaler

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FORMAT = 1
# Settings a resumed run may change: they steer the loop, not the function being learned.
# batch_size and grad_accum only so that the global batch stays (Trainer.resume checks): that is
# how a run moves to another number of processes.
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
    "batch_size",
    "grad_accum",
    "backend",  # a model setting, but every backend computes the same function
)
# model settings that do not change the function, so a checkpoint may be resumed with others
_FUNCTION_NEUTRAL = ("backend",)


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
    per_channel = torch.zeros(channels, dtype=torch.float64)  # cat: nats per channel
    total = torch.zeros(1, dtype=torch.float64)
    mine = torch.arange(context.rank, n, context.world_size)  # each process its own share
    bar = tqdm(range(0, len(mine), batch_size), desc="eval", disable=not progress, leave=False)
    for start in bar:
        images, labels = dataset.batch(mine[start : start + batch_size])
        images = images.to(device)
        labels = labels.to(device) if conditional and labels is not None else None
        with autocast(device, precision):
            params = model(images, labels)
        nll = model.distribution.nll(params, images.long())  # nats, float32
        total += nll.double().sum().cpu()
        if not model.config.per_pixel:  # [B, C, H, W]; dmol scores a pixel's channels jointly
            per_channel += nll.double().sum(dim=(0, 2, 3)).cpu()
    model.train(was_training)
    sums = distributed.all_reduce_sum(torch.cat([total, per_channel]).to(device), context).cpu()
    total, per_channel = sums[0], sums[1:]
    dims = n * math.prod(model.config.image_shape[1:])
    result = {"bits_per_dim": float(total / (dims * channels) / math.log(2)), "images": n}
    if not model.config.per_pixel:
        result["bits_per_dim_per_channel"] = (per_channel / dims / math.log(2)).tolist()
    return result


@dataclass
class RunInfo:
    """What a run folder records besides the model config: the data and the recipe."""

    train: TrainConfig
    data: str = "mnist5k"
    preset: str | None = None
    image_size: int | None = None
    channels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None  # processes of the latest (re)start; None: not recorded

    def to_json(self) -> str:
        return json.dumps(
            {
                "train": self.train.to_dict(),
                "data": self.data,
                "preset": self.preset,
                "image_size": self.image_size,
                "channels": self.channels,
                "world_size": self.world_size,
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
            world_size=data.pop("world_size", None),
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
        if model_config.per_pixel and self.cfg.label_smoothing:
            raise UserError(
                "label_smoothing applies to the categorical output only; drop it for dmol"
            )
        if test_set is not None:
            _check_data_fits(model_config, test_set)
        torch.manual_seed(self.cfg.seed)
        self.model = ImageTransformer(model_config).to(self.device)
        # each rank its own dropout stream: one shared seed would drop the same units for
        # every rank's different images (rank 0 keeps the single-process stream)
        torch.manual_seed(self.cfg.seed + 1_000_003 * context.rank)
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
        """Write run.json (data, preset, recipe, processes): a resume may have changed them."""
        self.info.world_size = self.context.world_size
        if self.context.is_main:
            atomic_write_text(self.run_dir / RUN_FILE, self.info.to_json() + "\n")

    def resume(self) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
            raise UserError(f"{path} is not a checkpoint of this tool's format {CHECKPOINT_FORMAT}")
        saved = dict(state.get("model_config") or {})
        current = self.config.to_dict()
        for key in _FUNCTION_NEUTRAL:
            saved.pop(key, None)
            current.pop(key, None)
        if saved != current:
            raise UserError(
                f"{path} was written for a different model config than {self.run_dir / CONFIG_FILE}"
                "; resume without model --set overrides, or start a new run with --out"
            )
        load_state_checked(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._check_batch_layout(state, path)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self._restore_rng(state)

    def _check_batch_layout(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a resume whose global batch differs; warn if only its split does.

        Step s trains on chunk s of a permutation cut into global batches (_micro_batches), so
        with the same global batch every step sees the same images whatever the number of
        processes; another global batch would change the data of every step still to come.
        Checkpoints from before `world_size` was saved count as written by this many processes.
        """
        cfg, ctx = self.cfg, self.context
        saved = state.get("train_config") or {}
        was = (
            int(saved.get("batch_size", cfg.batch_size)),
            int(state.get("world_size", ctx.world_size)),
            int(saved.get("grad_accum", 1)),
        )
        now = (cfg.batch_size, ctx.world_size, cfg.grad_accum)
        if was == now:
            return
        recorded, current = math.prod(was), math.prod(now)
        if current != recorded:
            raise UserError(
                f"{path} was trained on a global batch of {recorded} images per step "
                f"(batch_size {was[0]} x {was[1]} processes x grad_accum {was[2]}) but this "
                f"resume would take {current} (batch_size {now[0]} x {now[1]} processes x "
                f"grad_accum {now[2]}): {_layout_fix(recorded, cfg.batch_size, ctx.world_size)}"
            )
        if ctx.is_main:
            warnings.warn(
                f"resuming with batch_size {now[0]} x {now[1]} processes x grad_accum {now[2]} "
                f"instead of {was[0]} x {was[1]} x {was[2]}: each step sees the same "
                f"{recorded} images, but dropout draws (and float rounding) differ from an "
                "unbroken run",
                stacklevel=3,
            )

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """Give each process its own saved RNG states, so that its dropout draws continue.

        Checkpoints hold one state per rank (`rng_cpu_ranks`, `rng_cuda_ranks`); older ones only
        rank 0's (`rng_cpu`, `rng_cuda`), which every rank then gets, as before. After a change
        in the number of processes rank r takes saved state r modulo the saved count.
        """
        rank = self.context.rank
        cpu = state.get("rng_cpu_ranks") or [state["rng_cpu"]]
        torch.set_rng_state(cpu[rank % len(cpu)])
        if self.device.type == "cuda":
            cuda = state.get("rng_cuda_ranks") or (
                [state["rng_cuda"]] if "rng_cuda" in state else []
            )
            if cuda:
                torch.cuda.set_rng_state(cuda[rank % len(cuda)], self.device)

    def save(self) -> None:
        """Write checkpoint and weights from rank 0; every rank must call it (RNG gather)."""
        rng: dict[str, torch.Tensor] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        ranks = distributed.gather_to_main(rng, self.context)
        if not self.context.is_main:
            return
        assert ranks is not None
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "model_config": self.config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "history": self.history,
            "scaler": self.scaler.state_dict(),
            "world_size": self.context.world_size,
            # one RNG state per rank; rank 0's also under the old keys, for older readers
            "rng_cpu": rng["cpu"],
            "rng_cpu_ranks": [r["cpu"] for r in ranks],
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = rng["cuda"]
            state["rng_cuda_ranks"] = [r["cuda"] for r in ranks]
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
                    params = self.forward(images, labels)
                nll = self.model.distribution.nll(params, images.long()).sum() / images.numel()
                loss = nll
                if cfg.label_smoothing > 0:
                    loss = self.model.distribution.nll(
                        params, images.long(), cfg.label_smoothing
                    ).mean()
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
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        if self.config.task == "superres":  # input | sample | truth for the first test images
            from .layout import area_downsample
            from .superres import superres_rows

            source = self.test_set if self.test_set is not None else self.train_set
            truth, _ = source.batch(torch.arange(min(n, len(source))))
            low_res = area_downsample(truth, self.config.scale)
            samples = self.model.upscale(low_res.to(self.device), generator=generator).cpu()
            images, per_row = superres_rows(low_res, samples, self.config.scale, truth)
            save_grid(images, path, nrow=per_row * 2)
            return path
        if self.config.num_classes:
            labels = torch.arange(n, device=self.device) % self.config.num_classes
        images = self.model.sample(n, labels=labels, generator=generator)
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
                # global: every process's micro-batches
                images_seen += cfg.batch_size * cfg.grad_accum * self.context.world_size
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


def _layout_fix(global_batch: int, batch_size: int, world_size: int) -> str:
    """How to reach `global_batch` with `world_size` processes: the advice of a refused resume."""
    goal = f"so that batch_size x processes x grad_accum is {global_batch} again"
    if global_batch % (batch_size * world_size) == 0:
        accum = global_batch // (batch_size * world_size)
        return f"set grad_accum={accum} (--grad-accum {accum}) {goal}"
    if global_batch % world_size == 0:
        size = global_batch // world_size
        return (
            f"set batch_size={size} and grad_accum=1 (--set batch_size={size} --grad-accum 1) "
            + goal
        )
    return (
        f"use a number of processes that divides {global_batch}, and set batch_size and "
        f"grad_accum {goal}"
    )


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
