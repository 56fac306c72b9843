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
import signal
import threading
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
# A training loss this far above a uniform guess's 8 bits/dim means the run has diverged, even
# while it is still finite (a learning rate far too high drives it to thousands).
DIVERGED_BITS_PER_DIM = 64.0


def learning_rate(step: int, cfg: TrainConfig, d_model: int) -> float:
    """docs/model.md, Training: noam, `base*10*d^-0.5*min((s+1)*w^-1.5, (s+1)^-0.5)`, peak at s = w.

    `cosine` warms up linearly to the same peak, then decays to zero at `max_steps`: for short
    CPU runs that end long before noam's slow decay has done its work. `linear` decays in a
    straight line instead: below cosine in the first half of the decay, above it in the second.
    """
    s, w = step + 1, cfg.warmup_steps
    scale = cfg.learning_rate * 10 * d_model**-0.5
    if cfg.lr_schedule == "noam":
        return scale * min(s * w**-1.5, s**-0.5)
    peak = scale * w**-0.5
    if s <= w:
        return peak * s / w
    progress = min(1.0, (s - w) / max(1, cfg.max_steps - w))
    if cfg.lr_schedule == "linear":
        return peak * (1 - progress)
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


class Stopped(Exception):
    """Training stopped on a signal (SIGTERM, Ctrl-C) after finishing a step and writing its
    checkpoint; `--resume` continues from `step` as if nothing had happened."""

    def __init__(self, step: int, signal_name: str, signal_number: int) -> None:
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal_name, self.signal_number = step, signal_name, signal_number


class StopRequests:
    """SIGTERM and SIGINT (Ctrl-C) ask the loop to stop after the step in progress, instead of
    killing it: SIGTERM is what Slurm, Kubernetes and `timeout` send before they kill, and
    torchrun forwards it to every process. A second Ctrl-C interrupts at once. Handlers can
    only be installed from the main thread; elsewhere the process's own handling stays."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = number
        tqdm.write(
            f"{signal.Signals(number).name}: stopping after this step to write a checkpoint"
            + (" (Ctrl-C again to quit at once)" if number == signal.SIGINT else "")
        )

    def agreed(self, context: distributed.Context, device: torch.device) -> int | None:
        """The signal any process received (every process gets the same answer, so all stop
        at the same step), or None."""
        number = self.received or 0
        if context.active:
            flag = torch.tensor([1.0 if number else 0.0], device=device)
            if distributed.all_reduce_sum(flag, context).item() > 0 and not number:
                number = int(signal.SIGTERM)  # another process was told to stop
        return number or None


def diverged_message(step: int, what: str, lr: float, saved_step: int | None) -> str:
    kept = (
        f"the checkpoint of step {saved_step} is kept"
        if saved_step is not None
        else "no checkpoint was written"
    )
    return (
        f"training diverged at step {step} (learning rate {lr:.3g}): the {what}; "
        f"stopped, {kept}. Lower learning_rate (--set learning_rate=...), keep gradient "
        "clipping on (--set grad_clip=1.0) or lengthen warmup_steps, and start a new run "
        "(or --resume from the kept checkpoint)"
    )


def perturb(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """Replace each intensity by a uniform random one with probability `fraction`: the
    training data of a background model for the likelihood-ratio test (Ren et al., NeurIPS
    2019). Draws from the global RNG, which checkpoints hold, so resuming stays exact."""
    if fraction <= 0:
        return images
    replace = torch.rand(images.shape, device=images.device) < fraction
    noise = torch.randint(0, 256, images.shape, device=images.device, dtype=images.dtype)
    return torch.where(replace, noise, images)


def make_optimizer(model: torch.nn.Module, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam with the paper's betas (0.9, 0.98) and eps 1e-9, no weight decay; with
    `weight_decay`, AdamW decaying the weight matrices and embedding tables (parameters of two
    or more dimensions), not biases or LayerNorm gains."""
    betas, eps = (0.9, 0.98), 1e-9
    if not weight_decay:
        return torch.optim.Adam(model.parameters(), lr=0.0, betas=betas, eps=eps)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps)


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
        values = {  # strict JSON: a non-finite figure is written as null, never as NaN
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}, allow_nan=False) + "\n")
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


def flip_mask(step: int, global_batch: int, seed: int) -> torch.Tensor:
    """Which images of step `step`'s global batch are mirrored (hflip): a fixed function of
    (seed, step), like the batch itself, so resuming and the number of processes change nothing."""
    generator = torch.Generator().manual_seed(seed * 100_003 + step + 7_919)
    return torch.rand(global_batch, generator=generator) < 0.5


def micro_batches(
    step: int, n: int, cfg: TrainConfig, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Process `rank`'s share of step `step`'s global batch, in micro-batches: (image indices,
    which of them to mirror, or None without hflip).

    The global batch (batch_size x processes x grad_accum images) and its flips are the same
    function of (seed, step) as in a single process, so the number of processes does not change
    what is learned.
    """
    per_step = cfg.batch_size * world_size * cfg.grad_accum
    idx = batch_indices(step, n, per_step, cfg.seed)
    flips = flip_mask(step, per_step, cfg.seed) if cfg.hflip else None
    out = []
    for m in range(cfg.grad_accum):
        start = (m * world_size + rank) * cfg.batch_size
        part = slice(start, start + cfg.batch_size)
        out.append((idx[part], None if flips is None else flips[part]))
    return out


class DivergenceWatch:
    """Notes, on the device and without waiting for it, the first step whose loss or gradient
    norm is not finite or whose loss is above DIVERGED_BITS_PER_DIM; `first` reads it."""

    WHAT = (
        "",
        "loss is not finite",
        "gradient norm is not finite",
        f"loss is above {DIVERGED_BITS_PER_DIM:.0f} bits/dim (a uniform guess costs 8)",
    )

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.code = torch.zeros((), dtype=torch.int64, device=device)

    def record(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, check_grad: bool
    ) -> None:
        finite_grad = (
            torch.isfinite(grad_norm)
            if check_grad
            else torch.ones_like(self.code, dtype=torch.bool)
        )
        too_high = loss > DIVERGED_BITS_PER_DIM * math.log(2)
        code = torch.where(
            ~torch.isfinite(loss), 1, torch.where(~finite_grad, 2, torch.where(too_high, 3, 0))
        )
        new = (self.code == 0) & (code > 0)
        self.step = torch.where(new, step, self.step)
        self.code = torch.where(new, code, self.code)

    def first(self) -> tuple[int, str] | None:
        code = int(self.code)
        return None if code == 0 else (int(self.step), self.WHAT[code])


class Trainer:
    """Trains the model of a `Run`: builds or resumes it, evaluates, checkpoints, samples.

    With a validation split, the weights that `model.safetensors` keeps are those of the
    evaluation with the lowest validation bits/dim (run.json's `selected` names their step),
    while the checkpoint keeps the latest state, so that resuming stays exact. The test split is
    only reported, for the selected weights.
    """

    def __init__(
        self,
        run: Run,
        train_set: ImageDataset,
        test_set: ImageDataset | None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        context: distributed.Context = distributed.SINGLE,
        validation_set: ImageDataset | None = None,
    ) -> None:
        self.run = run
        self.context = context
        self.config = run.config
        self.cfg: TrainConfig = run.info.train
        self.train_set, self.test_set = train_set, test_set
        self.validation_set = validation_set
        self.device = torch.device(device)
        self.progress = progress and context.is_main
        run.check_data(train_set, training=True)
        for held_out in (test_set, validation_set):
            if held_out is not None:
                run.check_data(held_out, training=True)
        torch.manual_seed(self.cfg.seed)
        self.model = ImageTransformer(run.config).to(self.device)
        self.model.distribution.check_label_smoothing(self.cfg.label_smoothing)
        if self.cfg.label_smoothing and run.config.low_res_bounds:
            raise UserError(
                "label_smoothing spreads probability over every value, and low_res_bounds "
                "gives the values out of a block's reach none: train with one of them"
            )
        # Polyak averaging: evaluation, samples and model.safetensors use the averaged weights
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=ema_update(self.cfg.ema_decay))
            if self.cfg.ema_decay > 0
            else None
        )
        # each rank its own dropout stream: one shared seed would drop the same units for
        # every rank's different images (rank 0 keeps the single-process stream)
        torch.manual_seed(self.cfg.seed + 1_000_003 * context.rank)
        self.optimizer = make_optimizer(self.model, self.cfg.weight_decay)
        self.scaler = grad_scaler(self.device, self.cfg.precision)
        # DDP and torch.compile wrap the training loss only; weights, checkpoints and sampling
        # use the plain module (DDP broadcasts rank 0's initial weights)
        forward: torch.nn.Module = TrainingLoss(self.model, self.cfg.label_smoothing)
        if context.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(forward, device_ids=ids)
        if self.cfg.compile:
            # the attention's masks and layouts exist before the first trace: built inside it,
            # they break the graph and fail its guards at the next step (a second compilation)
            self.model.prepare_attention()
            forward = torch.compile(forward)
        self.forward = forward
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.history: list[dict[str, Any]] = []
        # model selection: the best validation evaluation so far and its weights (on the CPU)
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_written: int | None = None  # the step of the weights in model.safetensors
        # training loss sum (on the device) and steps since the last evaluation
        self.train_window: list = [torch.zeros((), device=self.device), 0]
        self.overfit_warned = False
        self.watch = DivergenceWatch(self.device)

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
        self.best = state.get("best")
        self.best_state = state.get("best_model")
        window = state.get("train_window", [0.0, 0])
        self.train_window = [torch.tensor(float(window[0]), device=self.device), int(window[1])]
        self.overfit_warned = bool(state.get("overfit_warned", False))
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
        """Write checkpoint and weights from rank 0; every rank must call it (RNG gather).
        Weights that are not finite are never written: the last good checkpoint stays."""
        self.check_divergence()
        weights = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([torch.isfinite(v).all() for v in weights.values()])
        if not bool(finite.all()):  # one read from the device, not one per tensor
            name = list(weights)[int((~finite).nonzero()[0])]
            raise UserError(
                diverged_message(
                    self.step, f"weight {name} is not finite", self._lr(), self.saved_step
                )
            )
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
        if self.best is not None:
            state["best"] = self.best
            state["best_model"] = self.best_state
        state["train_window"] = [float(self.train_window[0]), self.train_window[1]]
        state["overfit_warned"] = self.overfit_warned
        save_checkpoint(self.run.checkpoint_path, state, previous_step=self.saved_step)
        self.saved_step = self.step
        self._write_weights()

    def _write_weights(self) -> None:
        """model.safetensors: the selected weights once a validation evaluation has chosen
        some (written when they change), the latest evaluated weights before that."""
        if self.best_state is None:
            save_pretrained(self.eval_model, self.run.path)
            return
        if self.best_written != self.best["step"]:
            save_pretrained(self.eval_model, self.run.path, state_dict=self.best_state)
            self.best_written = self.best["step"]

    # Loop --------------------------------------------------------------------------------------
    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        ctx = self.context
        return micro_batches(self.step, len(self.train_set), self.cfg, ctx.rank, ctx.world_size)

    def _lr(self) -> float:
        return learning_rate(max(self.step - 1, 0), self.cfg, self.config.d_model)

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = learning_rate(self.step, cfg, self.config.d_model)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._micro_batches()
        total_loss = torch.zeros((), device=self.device)
        for m, (idx, flips) in enumerate(micro):
            images, labels = self.train_set.batch(idx)
            if flips is not None:
                images = torch.where(flips[:, None, None, None], images.flip(-1), images)
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
            total_loss += loss.detach().float() / len(micro)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        # fp16's scaler skips steps whose gradients overflowed, as it is meant to
        self.watch.record(self.step, total_loss, grad_norm, not self.scaler.is_enabled())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        self.train_window[0] = self.train_window[0] + total_loss
        self.train_window[1] += 1
        # tensors: read at log steps only, so that a GPU never waits for the host in a step
        return {"loss": total_loss, "lr": lr, "grad_norm": grad_norm.detach()}

    def check_divergence(self) -> None:
        """Stop, in one line, when a step since the last check had a loss or gradient that is
        not finite, or a loss far above a uniform guess's (one host read)."""
        found = self.watch.first()
        if found is not None:
            step, what = found
            lr = learning_rate(step, self.cfg, self.config.d_model)
            raise UserError(diverged_message(step, what, lr, self.saved_step))

    def evaluate(
        self,
        max_images: int = 0,
        model: ImageTransformer | None = None,
        dataset: ImageDataset | None = None,
    ) -> dict[str, Any]:
        """Bits/dim of the evaluated weights (or of `model`) on the test split (or `dataset`)."""
        dataset = self.test_set if dataset is None else dataset
        if dataset is None:
            return {}
        return evaluate(
            model or self.eval_model,
            dataset,
            batch_size=64,
            max_images=max_images,
            precision=self.cfg.precision,
            context=self.context,
        )

    def validate(self, logger: _Logger | None = None) -> dict[str, Any]:
        """Evaluate the validation images (the first `eval_images`), keep the weights if they
        are the best so far, and say once when validation rises while training falls."""
        assert self.validation_set is not None
        result = self.evaluate(self.cfg.eval_images, dataset=self.validation_set)
        loss_sum, steps = self.train_window
        entry = {"step": self.step, "split": "validation", **result}
        if steps:
            entry["train_bits_per_dim"] = float(loss_sum) / steps / math.log(2)
        self.train_window = [torch.zeros((), device=self.device), 0]
        self.history.append(entry)
        if logger is not None:
            logger.log(self.step, "validation", _scalars(result))
        improved = self.best is None or result["bits_per_dim"] < self.best["bits_per_dim"]
        if improved:
            self.best = {
                "step": self.step,
                "bits_per_dim": result["bits_per_dim"],
                "images": result["images"],
            }
            self.best_state = _cpu_copy(self.eval_model)
            if self.context.is_main:
                self._write_weights()
                self.run.info.selected = dict(self.best)
                self.run.record_info(self.context)
        if self.context.is_main:
            best = " (best so far)" if improved else f" (best {self.best['bits_per_dim']:.4f})"
            tqdm.write(f"step {self.step}: validation bits/dim {result['bits_per_dim']:.4f}{best}")
            self._warn_if_overfitting()
        return result

    def _warn_if_overfitting(self) -> None:
        """One line, once: validation bits/dim rose at two evaluations in a row while the
        training images' bits/dim fell."""
        evals = [h for h in self.history if h.get("split") == "validation"]
        if self.overfit_warned or len(evals) < 3:
            return
        last = evals[-3:]
        val = [h["bits_per_dim"] for h in last]
        train = [h.get("train_bits_per_dim") for h in last]
        if None in train or not (val[0] < val[1] < val[2] and train[0] > train[1] > train[2]):
            return
        self.overfit_warned = True
        assert self.best is not None
        tqdm.write(
            f"warning: validation bits/dim rose for two evaluations ({val[0]:.3f} -> "
            f"{val[1]:.3f} -> {val[2]:.3f}) while train bits/dim fell ({train[0]:.3f} -> "
            f"{train[1]:.3f} -> {train[2]:.3f}): the model is overfitting; model.safetensors "
            f"keeps step {self.best['step']}; more images, --set hflip=true or fewer steps help"
        )

    @contextlib.contextmanager
    def selected_weights(self):
        """The evaluated model holding the selected weights for the duration (then the latest
        again); the latest weights when nothing was selected."""
        model = self.eval_model
        if self.best_state is None:
            yield model
            return
        latest = _cpu_copy(model)
        model.load_state_dict(self.best_state)
        try:
            yield model
        finally:
            model.load_state_dict(latest)

    def sample_grid(self, model: ImageTransformer | None = None) -> Path:
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        labels = None
        n = self.cfg.sample_count
        path = self.run.sample_path(self.step)
        model = model or self.eval_model
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
        try:
            with StopRequests() as stop:
                self._loop(stop, logger, bar)
        finally:
            bar.close()
        return self._finish(logger)

    def _loop(self, stop: StopRequests, logger: _Logger, bar) -> None:
        """Steps to max_steps, with evaluations, samples and checkpoints; a stop request ends it
        after the step in progress, with a checkpoint of that step."""
        cfg = self.cfg
        images_seen, window_start = 0, time.perf_counter()
        while self.step < cfg.max_steps:
            metrics = self._train_step()
            # global: every process's micro-batches
            images_seen += cfg.batch_size * cfg.grad_accum * self.context.world_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.check_divergence()
                metrics = {key: float(value) for key, value in metrics.items()}
                if cfg.label_smoothing == 0:  # the training images' exact bits/dim
                    metrics["bits_per_dim"] = metrics["loss"] / math.log(2)
                elapsed = time.perf_counter() - window_start
                metrics["images_per_s"] = images_seen / max(elapsed, 1e-9)
                images_seen, window_start = 0, time.perf_counter()
                postfix = {"loss": f"{metrics['loss']:.3f}"}  # a dict keeps this order
                if "bits_per_dim" in metrics:
                    postfix["bpd"] = f"{metrics['bits_per_dim']:.3f}"
                postfix["img/s"] = f"{metrics['images_per_s']:.1f}"
                bar.set_postfix(postfix)
                logger.log(self.step, "train", metrics)
            paused = time.perf_counter()  # images/s counts training steps only
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self._periodic_evaluation(logger)
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.context.is_main:
                self.sample_grid()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save()
            window_start += time.perf_counter() - paused
            received = stop.agreed(self.context, self.device)
            if received is not None:
                if self.saved_step != self.step:
                    self.save()
                logger.close()
                name = signal.Signals(received).name
                raise Stopped(self.step, name, received)

    def _finish(self, logger: _Logger) -> dict[str, Any]:
        """The end of a run: the last validation, the checkpoint, the test figure of the
        selected weights and their sample grid."""
        cfg = self.cfg
        if self.validation_set is not None and not self._validated_at(self.step):
            self.validate(logger)
        self.save()
        with self.selected_weights() as model:
            result = self.evaluate(0, model)
            selected = self.best["step"] if self.best is not None else self.step
            if result and self.ema is not None and selected == self.step:
                # what the average gained, on the same images
                result["bits_per_dim_raw_weights"] = self.evaluate(0, self.model)["bits_per_dim"]
            if self.best is not None:
                result["selected_step"] = self.best["step"]
                result["validation_bits_per_dim"] = self.best["bits_per_dim"]
            if "bits_per_dim" in result:
                self.history.append({"step": self.step, "final": True, **result})
                logger.log(self.step, "test", _scalars(result))
            if cfg.sample_count and self.context.is_main:
                result["samples"] = str(self.sample_grid(model))
        logger.close()
        return result

    def _periodic_evaluation(self, logger: _Logger) -> None:
        """Validation (choosing weights) when the run holds some out, else the test split,
        reported only."""
        if self.validation_set is not None:
            self.validate(logger)
            return
        result = self.evaluate(self.cfg.eval_images)
        if result:
            self.history.append({"step": self.step, **result})
            logger.log(self.step, "test", _scalars(result))
            if self.context.is_main:
                tqdm.write(f"step {self.step}: test bits/dim {result['bits_per_dim']:.4f}")

    def _validated_at(self, step: int) -> bool:
        return any(h.get("split") == "validation" and h["step"] == step for h in self.history)


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("bits_per_dim", "bits_per_dim_raw_weights", "selected_step")
    out = {k: result[k] for k in keys if k in result}
    for c, value in enumerate(result.get("bits_per_dim_per_channel", [])):
        out[f"bits_per_dim_channel{c}"] = value
    return out


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors on the CPU: on a CPU these are the live tensors, not copies."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's tensors on the CPU that later steps do not change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
