"""The training loop (docs/model.md, "Training"): Adam, noam or cosine schedule, clipping,
an optional moving average of the weights, periodic evaluation, checkpoints and samples.

Resuming is exact: the data order of every epoch is a pure function of (seed, epoch), and the
checkpoint holds the weights (and their average), the optimizer, the step and every process's
torch RNG state (dropout), so a resumed run takes the same steps as an unbroken one. What a run
folder is, and which changes a resume may make, is `run.py`'s business.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_checkpoint, load_state_checked, save_checkpoint, save_pretrained
from .config import TrainConfig
from .data import ImageDataset
from .errors import UserError
from .evaluation import evaluate
from .grid import save_grid
from .model import ImageTransformer
from .precision import autocast, grad_scaler
from .run import Run

CHECKPOINT_FORMAT = 1


def learning_rate(step: int, cfg: TrainConfig, d_model: int) -> float:
    """docs/model.md, Training: noam, `base*10*d^-0.5*min((s+1)*w^-1.5, (s+1)^-0.5)`, peak at s = w.

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


def ema_update(decay: float):
    """The update of an exponential moving average of the weights (Polyak averaging), for
    `torch.optim.swa_utils.AveragedModel`.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, as TensorFlow's
    `ExponentialMovingAverage(num_updates=)` does: with a fixed 0.999 the average of a
    600-step run still gives the random initial weights 55% of its mass.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n) -> None:
        n = int(n)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def perturb(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """Replace each intensity by a uniform random one with probability `fraction`: the
    training data of a background model for the likelihood-ratio test (Ren et al., NeurIPS
    2019). Draws from the global RNG, which checkpoints hold, so resuming stays exact."""
    if fraction <= 0:
        return images
    replace = torch.rand(images.shape, device=images.device) < fraction
    noise = torch.randint(0, 256, images.shape, device=images.device, dtype=images.dtype)
    return torch.where(replace, noise, images)


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


class _Logger:
    """JSONL always; TensorBoard scalars when the `tensorboard` package is installed."""

    def __init__(self, run: Run, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run.log_path
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))
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


class TrainingLoss(torch.nn.Module):
    """`model.loss` as a module's forward, so that DDP and torch.compile wrap the one definition
    of the loss (DDP synchronises gradients only through a wrapped module's forward)."""

    def __init__(self, model: ImageTransformer, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.model.loss(images, labels, self.label_smoothing)


class Trainer:
    """Trains the model of a `Run`: builds or resumes it, evaluates, checkpoints, samples."""

    def __init__(
        self,
        run: Run,
        train_set: ImageDataset,
        test_set: ImageDataset | None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        context: distributed.Context = distributed.SINGLE,
    ) -> None:
        self.run = run
        self.context = context
        self.config = run.config
        self.cfg: TrainConfig = run.info.train
        self.train_set, self.test_set = train_set, test_set
        self.device = torch.device(device)
        self.progress = progress and context.is_main
        run.check_data(train_set, training=True)
        if test_set is not None:
            run.check_data(test_set, training=True)
        torch.manual_seed(self.cfg.seed)
        self.model = ImageTransformer(run.config).to(self.device)
        self.model.distribution.check_label_smoothing(self.cfg.label_smoothing)
        # Polyak averaging: evaluation, samples and model.safetensors use the averaged weights
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=ema_update(self.cfg.ema_decay))
            if self.cfg.ema_decay > 0
            else None
        )
        # each rank its own dropout stream: one shared seed would drop the same units for
        # every rank's different images (rank 0 keeps the single-process stream)
        torch.manual_seed(self.cfg.seed + 1_000_003 * context.rank)
        self.optimizer = make_optimizer(self.model)
        self.scaler = grad_scaler(self.device, self.cfg.precision)
        # DDP and torch.compile wrap the training loss only; weights, checkpoints and sampling
        # use the plain module (DDP broadcasts rank 0's initial weights)
        forward: torch.nn.Module = TrainingLoss(self.model, self.cfg.label_smoothing)
        if context.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(forward, device_ids=ids)
        self.forward = torch.compile(forward) if self.cfg.compile else forward
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.history: list[dict[str, Any]] = []

    @property
    def eval_model(self) -> ImageTransformer:
        """The weights that are evaluated, sampled and saved: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # Persistence -------------------------------------------------------------------------------
    def start_new(self) -> None:
        """Create the run folder (refusing one that holds a run)."""
        self.run.write_start(self.context)

    def record_run_info(self) -> None:
        self.run.record_info(self.context)

    def resume(self) -> None:
        """Load the latest checkpoint of the run (or its older copy, if that one is damaged)."""
        path = self.run.checkpoint_path
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
            raise UserError(f"{path} is not a checkpoint of this tool's format {CHECKPOINT_FORMAT}")
        self.run.check_state(state, self.context)
        load_state_checked(self.model, state["model"], path)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # a run that started without an average: start it from the current weights
                self.ema.update_parameters(self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = self.saved_step = int(state["step"])
        self.history = list(state.get("history", []))
        self._restore_rng(state)

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
            "model": _cpu_state(self.model),
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
        if self.ema is not None:
            state["ema"] = _cpu_state(self.ema)
        if self.device.type == "cuda":
            state["rng_cuda"] = rng["cuda"]
            state["rng_cuda_ranks"] = [r["cuda"] for r in ranks]
        save_checkpoint(self.run.checkpoint_path, state, previous_step=self.saved_step)
        self.saved_step = self.step
        save_pretrained(self.eval_model, self.run.path)

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
        total_loss = 0.0
        for m, idx in enumerate(micro):
            images, labels = self.train_set.batch(idx)
            images = perturb(images.to(self.device), cfg.input_noise)
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
                    loss = self.forward(images, labels)
                self.scaler.scale(loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        metrics = {"loss": total_loss, "lr": lr, "grad_norm": float(grad_norm)}
        if cfg.label_smoothing == 0:  # the loss is then the training images' exact nats/dim
            metrics["bits_per_dim"] = total_loss / math.log(2)
        return metrics

    def evaluate(
        self, max_images: int = 0, model: ImageTransformer | None = None
    ) -> dict[str, Any]:
        """Test bits/dim of the evaluated weights (or of `model`)."""
        if self.test_set is None:
            return {}
        return evaluate(
            model or self.eval_model,
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
        path = self.run.sample_path(self.step)
        model = self.eval_model
        if self.config.task == "superres":  # input | sample | truth for the first test images
            from .layout import area_downsample
            from .superres import superres_rows

            source = self.test_set if self.test_set is not None else self.train_set
            truth, _ = source.batch(torch.arange(min(n, len(source))))
            low_res = area_downsample(truth, self.config.scale)
            samples = model.upscale(low_res.to(self.device), generator=generator).cpu()
            images, per_row = superres_rows(low_res, samples, self.config.scale, truth)
            save_grid(images, path, nrow=per_row * 2)
            return path
        if self.config.num_classes:
            labels = torch.arange(n, device=self.device) % self.config.num_classes
        images = model.sample(n, labels=labels, generator=generator)
        save_grid(images.cpu(), path)
        return path

    def fit(self, log: bool = True) -> dict[str, Any]:
        """Train to `max_steps`; returns the final evaluation."""
        cfg = self.cfg
        logger = _Logger(self.run, log and self.context.is_main)
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
                    postfix = {"loss": f"{metrics['loss']:.3f}"}  # a dict keeps this order
                    if "bits_per_dim" in metrics:
                        postfix["bpd"] = f"{metrics['bits_per_dim']:.3f}"
                    postfix["img/s"] = f"{metrics['images_per_s']:.1f}"
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
        if result and self.ema is not None:  # what the average gained, on the same images
            result["bits_per_dim_raw_weights"] = self.evaluate(0, self.model)["bits_per_dim"]
        if result:
            self.history.append({"step": self.step, "final": True, **result})
            logger.log(self.step, "test", _scalars(result))
        self.save()
        if cfg.sample_count and self.context.is_main:
            result["samples"] = str(self.sample_grid())
        logger.close()
        return result


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    out = {k: result[k] for k in ("bits_per_dim", "bits_per_dim_raw_weights") if k in result}
    for c, value in enumerate(result.get("bits_per_dim_per_channel", [])):
        out[f"bits_per_dim_channel{c}"] = value
    return out


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
