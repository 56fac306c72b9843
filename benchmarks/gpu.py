"""The project's GPU paths on one CUDA GPU, in one command (under 9 minutes in all).

Run it from the repository root with the system's Python, no virtualenv and no install:

    PYTHONPATH=. python3 benchmarks/gpu.py --json PATH

It needs only torch (2.5 or newer, built with CUDA), einops, safetensors, tqdm, pillow and
numpy, and writes its results to PATH (default benchmarks/gpu_results.json). Other options:

    python3 benchmarks/gpu.py --json out.json --steps 300 --batch 32 --peak-tflops 989

Five parts, all on the CIFAR-10 paper preset (`load_preset("cifar10_1d")`: 12 layers, d=512,
3,072 positions, local_1d with 256-position blocks and memory), bf16 autocast unless said:

1. train: `--steps` Adam steps (betas 0.9/0.98, eps 1e-9, gradient clipping at 1.0 as the
   project's trainer does; lr `--lr` after a 20-step linear warm-up) at batch `--batch` on
   random smooth images: 4x4 uniform noise per channel, bilinearly upsampled to 32x32 and
   quantised to 8 intensity levels. That distribution is learnable, so the loss (mean nats per
   sub-pixel) must fall; the first and last 20-step means are reported and compared. The
   backend is `--train-backend` (auto: flex on CUDA); the JSON records the one that ran.
2. throughput: images/s of a whole training step (forward, backward, clipping, Adam) at batch
   `--batch` after warm-up, timed with CUDA events, for the attention backends `dense`,
   `flex` (the model eager; the package itself runs `flex_attention` through `torch.compile`
   on CUDA), `flex` with every block `torch.compile`d (`block.compile()` after
   `model.prepare_attention()`: the blocks are identical, so one compilation, forward and
   backward, serves all 12; the embedding, head and loss stay eager) and `blocked`
   (reference). Each backend is chosen by `dataclasses.replace(config, backend=NAME)`. Also
   the peak CUDA memory, the number of graphs compiled, and MFU:

       FLOPs per image and training step = 6 * P * N + 12 * L * N * K * d

   with P the parameter count (`model.num_parameters()`, embeddings included), N the positions
   per image, L the layers, d the model width and K the average number of keys a query may see
   (`model.pattern.dense_mask().float().sum(1).mean()`; 363.2 for cifar10_1d). 6 * P * N is
   the matmul cost forward (2) plus backward (4); attention adds Q.K^T and A.V, 2 * N * K * d
   each forward, x3 with backward. These are useful FLOPs: `dense` computes all N x N scores
   and flex whole 128 x 128 tiles, which the formula does not count. MFU = images/s x FLOPs
   per image / peak, the peak being the GPU's dense bf16 tensor-core rate: `--peak-tflops`
   when given, else looked up from the device name (`PEAK_BF16_TFLOPS`), else left empty.
3. check: one fp32 batch of 4 images through the compiled-flex model (blocks compiled as in
   part 2) and the dense one, both with the weights of part 1 (initial ones if it did not
   train), in eval mode (no dropout) with gradients: the head
   outputs and every parameter's gradient must agree (`torch.allclose`, `CHECK_TOLERANCE`). A
   mask that let a query see a later position would still let the loss fall; this does not.
4. sample: seconds to sample `--samples` (64) images with `model.sample(n, temperature=1.0,
   generator=...)` (the cached sampler, eager) under bf16 autocast and in fp32, with the
   model of part 1 (or an untrained one if part 1 failed), after an untimed warm-up of a few
   decoding steps in the same precision (one-time set-up: masks, kernels). Also the fraction
   of sampled intensities that lie on the data's 8 levels (a trained model: high; untrained:
   ~3%).
5. eval: `model.bits_per_dim` of one batch of those images (not seen in training), in eval
   mode, under bf16 autocast and in fp32, and their difference.

Every part has a time budget (`BUDGETS`, seconds; 505 s in all; `--budget PART=SECONDS` sets
another): loops stop early when it runs out and an atomic call (compilation, sampling) is
interrupted by an alarm; either way the part says so. Every part catches its own errors
("failed: <one line>") so that the others still report; the JSON (`--json`) is rewritten
atomically after each part. Progress goes to stderr; stdout gets one markdown table, beside
reference figures measured elsewhere (`REFERENCE`).

The run is complete (`"complete": true` in the JSON) only when every part ran to its end and
gave its figure (`FIGURES`; train needs two separate 20-step windows): a part that failed, was
skipped, or was stopped by its budget leaves the run incomplete; the JSON lists them under
`failed` and `incomplete`.

Exit status: 0 when the run is complete, flex matched dense and the loss fell; 1 otherwise; 2
when there is no CUDA device (one line on stderr). `--cpu-smoke` is for the project's tests
only: every part on the CPU with a tiny model (3x8x8 images, 2 layers, d=32, 3 steps, 2
samples); the compiled parts compile with the `aot_eager` backend (Dynamo and AOTAutograd
traced, no code generated).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "gpu_results.json"
PRESET = "cifar10_1d"
LEVELS = 8  # intensity levels of the synthetic images
WARMUP_LR_STEPS = 20
WINDOW = 20  # steps in each loss mean
# seconds from the start of the measurements: 9 minutes less a margin for importing torch,
# starting CUDA, the table and the JSON
TOTAL_BUDGET = 510.0
# seconds per part; the sum stays under TOTAL_BUDGET. eval compiles flex_attention's forward
# for fp32 and for bf16 without gradients (part 1 compiled it only with them); check compiles
# one block for fp32, forward and backward
BUDGETS = {
    "train": 95.0,
    "throughput/dense": 30.0,
    "throughput/flex": 30.0,
    "throughput/blocked": 25.0,
    "throughput/flex_compiled": 100.0,
    "check/flex_vs_dense": 55.0,
    "sample/bf16": 60.0,
    "sample/fp32": 65.0,
    "eval": 45.0,
}
# the key each part must have written for the run to be complete
FIGURES = {
    "train": "loss_fell",
    "throughput/dense": "images_per_s",
    "throughput/flex": "images_per_s",
    "throughput/blocked": "images_per_s",
    "throughput/flex_compiled": "images_per_s",
    "check/flex_vs_dense": "match",
    "sample/bf16": "sample_seconds",
    "sample/fp32": "sample_seconds",
    "eval": "difference",
}
# flex (compiled) against dense in fp32: outputs, and gradients relative to each tensor's scale
CHECK_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}
CHECK_BATCH = 4
SAMPLE_WARMUP_STEPS = 8
GRACE = 10.0  # the alarm of a part with its own early stop fires this much after its budget
THROUGHPUT_WARMUP = 3
THROUGHPUT_MAX_STEPS = 30
# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, first substring match of the name
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("NVL", 835.0),  # H100 NVL, H200 NVL
    ("H100", 989.0),
    ("H200", 989.0),  # also GH200
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)
REFERENCE = {
    "where": "one H100, bf16, batch 32, a model of the cifar10_1d preset's size",
    "train_images_per_s": {
        "best existing PyTorch port": 129.0,
        "same-size GPT, compiled flash attention": 346.0,
        "flex_attention with the local_1d mask, compiled": 422.0,
    },
    "train_mfu_flex_compiled": 0.34,
    "sample_64_seconds": {"bare cached loop, eager": 38.0, "bare cached loop, CUDA graphs": 6.8},
}
THROUGHPUT_ROWS = (  # part name, backend, compiled, label
    ("throughput/dense", "dense", False, "dense"),
    ("throughput/flex", "flex", False, "flex, model eager"),
    ("throughput/flex_compiled", "flex", True, "flex, each block torch.compile'd"),
    ("throughput/blocked", "blocked", False, "blocked"),
)


class OverBudget(Exception):
    """Raised by the alarm when a part runs past its budget."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise OverBudget in the main thread after `seconds` (no-op where there is no SIGALRM)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def ring(signum, frame):
        raise OverBudget("interrupted")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def over_budget(error: BaseException | None) -> bool:
    """Whether the alarm caused `error`, perhaps wrapped by torch.compile's own errors."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OverBudget) or "OverBudget" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def budget_override(text: str) -> tuple[str, float]:
    """`--budget PART=SECONDS`."""
    name, _, seconds = text.partition("=")
    if name not in BUDGETS:
        raise argparse.ArgumentTypeError(f"unknown part {name!r}; parts: {', '.join(BUDGETS)}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a number") from None


def graphs_compiled() -> int | None:
    """Graphs Dynamo has compiled in this process so far (None where torch does not say)."""
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except Exception:
        return None


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or repr(error)
    return f"{type(error).__name__}: {text}"[:300]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clean(value):
    """JSON-safe: floats rounded, NaN/inf as None, tensors as numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def peak_tflops(device_name: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"looked up from the device name ({key!r})"
    return None, "unknown device: pass --peak-tflops"


def smooth_images(
    batch: int, shape: tuple[int, int, int], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """uint8 [B, C, H, W]: per-channel uniform noise on a coarse grid (H/8 x W/8, at least
    2x2), bilinearly upsampled and quantised to LEVELS evenly spaced intensities."""
    c, h, w = shape
    low = torch.rand(batch, c, max(2, h // 8), max(2, w // 8), generator=generator, device=device)
    up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    level = (up * LEVELS).floor().clamp(0, LEVELS - 1)
    return (level * (255 / (LEVELS - 1))).round().to(torch.uint8)


def level_values(device: torch.device) -> torch.Tensor:
    return (torch.arange(LEVELS, device=device) * (255 / (LEVELS - 1))).round().to(torch.uint8)


class Bench:
    """Shared state of one run: settings, the JSON document, the model trained in part 1."""

    def __init__(self, args: argparse.Namespace, package) -> None:
        self.args = args
        self.package = package
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.start = time.perf_counter()
        self.deadline = self.start + TOTAL_BUDGET
        self.steps = args.steps if args.steps is not None else (3 if self.smoke else 300)
        self.batch = args.batch if args.batch is not None else (4 if self.smoke else 32)
        self.samples = args.samples if args.samples is not None else (2 if self.smoke else 64)
        self.model = None  # trained in part 1
        self.graphs_before: int | None = None
        self.failed: list[str] = []
        self.incomplete: list[str] = []  # parts without their figure (FIGURES)
        self.json_path = Path(args.json)
        self.budgets = {**BUDGETS, **dict(args.budget or [])}
        config = package.load_preset(PRESET)
        if self.smoke:  # the tiny preset's shapes, in colour
            config = dataclasses.replace(package.load_preset("tiny"), image_shape=(3, 8, 8))
        self.config = config
        pattern = package.AttentionPattern.from_config(config)
        self.train_backend = package.attention.resolve_backend(
            args.train_backend, pattern, self.device
        )
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            props = torch.cuda.get_device_properties(self.device)
            device_info = {
                "name": name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": props.total_memory / 2**30,
                "bf16_supported": torch.cuda.is_bf16_supported(),
            }
        else:
            name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
            device_info = {"name": name}
        self.device_name = name
        self.peak, peak_source = peak_tflops(name, args.peak_tflops)
        self.doc = {
            "script": "benchmarks/gpu.py",
            "mode": "cpu-smoke" if self.smoke else "cuda",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "settings": {
                "preset": "tiny, image_shape 3x8x8" if self.smoke else PRESET,
                "steps": self.steps,
                "batch": self.batch,
                "samples": self.samples,
                "lr": args.lr,
                "train_backend": self.train_backend,
                "train_backend_asked": args.train_backend,
                "compile_backend": self.compile_backend,
                "budgets_s": self.budgets,
                "fp32_matmul_precision": torch.get_float32_matmul_precision(),
            },
            "model": {"config": config.to_dict()},
            "peak_bf16_tflops": self.peak,
            "peak_source": peak_source,
            "parts": {},
            "reference": REFERENCE,
        }

    # Helpers -----------------------------------------------------------------------------------
    def autocast(self, precision: str = "bf16"):
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def images(self, seed: int, batch: int | None = None) -> torch.Tensor:
        n = self.batch if batch is None else batch
        return smooth_images(n, self.config.image_shape, self.generator(seed), self.device)

    def build(self, backend: str):
        torch.manual_seed(0)
        config = dataclasses.replace(self.config, backend=backend)
        return self.package.ImageTransformer(config).to(self.device)

    @property
    def compile_backend(self) -> str:
        return "aot_eager" if self.smoke else "inductor"

    def compile_blocks(self, model, entry: dict) -> None:
        """`torch.compile` every block after building the attention's device forms (so the
        trace neither builds them nor guards on their absence). The blocks are identical: the
        first call compiles, the others reuse it; `entry` gets the number of graphs."""
        model.prepare_attention()
        for block in model.blocks:
            block.compile(backend=self.compile_backend)
        entry["compiled"] = f"each block, torch.compile(backend={self.compile_backend!r})"
        self.graphs_before = graphs_compiled()

    def count_graphs(self, entry: dict) -> None:
        if self.graphs_before is not None and graphs_compiled() is not None:
            entry["graphs_compiled"] = graphs_compiled() - self.graphs_before

    def adam(self, model, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)

    def train_step(self, model, loss_fn: Callable, optimizer, images) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = loss_fn(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    def write(self) -> None:
        """The JSON document, atomically (temp file + os.replace)."""
        self.doc["total_seconds"] = time.perf_counter() - self.start
        tmp = self.json_path.with_name(f".{self.json_path.name}.{os.getpid()}.tmp")
        try:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(clean(self.doc), indent=2) + "\n")
            os.replace(tmp, self.json_path)
        except OSError as error:
            log(f"cannot write {self.json_path}: {one_line(error)}")

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # Running a part ----------------------------------------------------------------------------
    def check_figure(self, name: str, entry: dict) -> None:
        """A part that did not fail but was skipped, stopped by its budget, or gave no figure
        leaves the run incomplete."""
        if name in self.failed or (entry.get("status") == "ok" and FIGURES[name] in entry):
            return
        self.incomplete.append(name)
        has = FIGURES[name] in entry
        entry["figure"] = "partial: the part did not finish" if has else f"missing: {FIGURES[name]}"

    def run(self, name: str, part: Callable[[dict, float], None], atomic: bool = False) -> None:
        """Run `part(entry, deadline)`; it fills `entry`. Errors and overruns are recorded, never
        raised. `atomic` parts cannot stop themselves: the alarm is their budget."""
        entry: dict = {"budget_s": self.budgets[name]}
        self.doc["parts"][name] = entry
        started = time.perf_counter()
        left = self.deadline - started
        budget = min(self.budgets[name], left)
        if budget < 3:
            spent = "the total time budget left is" if budget == left else "its budget is"
            entry["status"] = f"skipped: {spent} under 3 s"
            self.check_figure(name, entry)
            log(f"[{name}] {entry['status']}")
            self.write()
            return
        log(f"[{name}] budget {budget:.0f} s")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with alarm(budget if atomic else min(budget + GRACE, left)):
                    part(entry, started + budget)
                entry["status"] = entry.get("status", "ok")
            except Exception as error:  # one broken path must not lose the other figures
                if over_budget(error):
                    took = f"{time.perf_counter() - started:.0f} s"
                    entry["status"] = f"stopped: interrupted after {took} ({budget:.0f} s budget)"
                else:
                    entry["status"] = f"failed: {one_line(error)}"
                    self.failed.append(name)
            finally:
                with contextlib.suppress(Exception):
                    self.sync()
        messages = []
        for w in caught:
            text = " ".join(str(w.message).split())[:200]
            if text not in messages:
                messages.append(text)
        if messages:
            entry["warnings"] = messages[:5]
        entry["seconds"] = time.perf_counter() - started
        self.check_figure(name, entry)
        log(f"[{name}] {entry['status']} ({entry['seconds']:.1f} s)")
        for text in messages[:5]:
            log(f"[{name}] warning: {text}")
        self.release()
        self.write()

    # The parts ---------------------------------------------------------------------------------
    def describe_model(self) -> None:
        model = self.build("blocked")
        n = self.config.num_positions
        keys = float(model.pattern.dense_mask().float().sum(1).mean())
        params = model.num_parameters()
        layers, d = self.config.num_layers, self.config.d_model
        self.flops = 6 * params * n + 12 * layers * n * keys * d
        self.doc["model"].update(
            parameters=params,
            positions=n,
            keys_per_query=keys,
            flops_per_image_train_step=self.flops,
            formula="6 * parameters * positions + 12 * layers * positions * keys_per_query * d",
        )

    def part_train(self, entry: dict, deadline: float) -> None:
        model = self.build(self.train_backend).train()
        self.model = model
        optimizer = self.adam(model, self.args.lr)
        generator = self.generator(1)
        losses: list[float] = []
        entry["losses"] = losses
        started = time.perf_counter()
        try:
            for step in range(self.steps):
                if time.perf_counter() > deadline:
                    entry["status"] = f"stopped early: budget spent after {step} steps"
                    break
                for group in optimizer.param_groups:
                    group["lr"] = self.args.lr * min(1.0, (step + 1) / WARMUP_LR_STEPS)
                images = smooth_images(self.batch, self.config.image_shape, generator, self.device)
                losses.append(float(self.train_step(model, model.loss, optimizer, images)))
                if (step + 1) % 50 == 0:
                    log(f"[train] step {step + 1}/{self.steps} loss {losses[-1]:.4f}")
        finally:  # also when the alarm interrupts a step: summarise the steps that finished
            entry["steps_done"] = len(losses)
            entry["seconds_training"] = time.perf_counter() - started
            # the figure needs two separate windows: WINDOW steps each (fewer in a short run)
            window = min(WINDOW, max(1, self.steps // 2))
            if len(losses) >= 2 * window:
                first = sum(losses[:window]) / window
                last = sum(losses[-window:]) / window
                fell = bool(math.isfinite(last) and last < first)
                entry.update(window=window, first_mean=first, last_mean=last, loss_fell=fell)
                log(f"[train] loss {first:.4f} -> {last:.4f}: fell: {'yes' if fell else 'NO'}")
            else:
                log(f"[train] {len(losses)} steps: too few for two {window}-step windows")
        del optimizer

    def part_throughput(self, entry: dict, deadline: float, backend: str, compiled: bool) -> None:
        model = self.build(backend).train()
        optimizer = self.adam(model, 1e-5)
        images = self.images(3)
        entry["compiled"] = None
        if compiled:
            self.compile_blocks(model, entry)
        loss_fn = model.loss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        for _ in range(1 if self.smoke else THROUGHPUT_WARMUP):
            self.train_step(model, loss_fn, optimizer, images)
        self.sync()
        entry["warmup_s"] = time.perf_counter() - started
        if compiled:
            self.count_graphs(entry)
        one = self.time_steps(model, loss_fn, optimizer, images, 1)
        room = deadline - time.perf_counter() - 1.0
        steps = 3 if self.smoke else max(1, min(THROUGHPUT_MAX_STEPS, int(room / one)))
        seconds = self.time_steps(model, loss_fn, optimizer, images, steps)
        if compiled:  # the timed steps compiled nothing more
            self.count_graphs(entry)
        entry.update(steps_timed=steps, seconds_per_step=seconds / steps)
        entry["images_per_s"] = self.batch * steps / seconds
        if self.device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.peak and getattr(self, "flops", None):
            entry["mfu"] = entry["images_per_s"] * self.flops / (self.peak * 1e12)
        log(f"[{backend}{' compiled' if compiled else ''}] {entry['images_per_s']:.1f} images/s")

    def time_steps(self, model, loss_fn, optimizer, images, steps: int) -> float:
        """Seconds for `steps` training steps: CUDA events on a GPU, the wall clock elsewhere."""
        if self.device.type != "cuda":
            started = time.perf_counter()
            for _ in range(steps):
                self.train_step(model, loss_fn, optimizer, images)
            return time.perf_counter() - started
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.sync()
        begin.record()
        for _ in range(steps):
            self.train_step(model, loss_fn, optimizer, images)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000

    def part_check(self, entry: dict, deadline: float) -> None:
        """flex (blocks compiled) against dense on one fp32 batch: outputs and gradients."""
        images = self.images(5, min(CHECK_BATCH, self.batch))
        entry.update(images=images.shape[0], precision="fp32", tolerance=CHECK_TOLERANCE)
        trained = self.doc["parts"].get("train", {}).get("loss_fell") and self.model is not None
        weights = self.model.state_dict() if trained else None
        entry["weights"] = "from part 1 (train)" if trained else "initial (part 1 did not train)"
        results = {}
        for backend in ("dense", "flex"):
            model = self.build(backend).eval()  # no dropout; gradients still flow
            if weights is not None:  # trained attention is sharper: a leak shows more
                model.load_state_dict(weights)
            if backend == "flex":
                self.compile_blocks(model, entry)
            params = model(images)
            loss = model.distribution.nll(params, images.long()).sum() / images.numel()
            loss.backward()
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            results[backend] = (params.detach(), loss.detach(), grads)
            if backend == "flex":
                self.count_graphs(entry)
            del model, params, loss
        if self.device.type != "cuda":
            entry["flex_ran_as"] = "blocked: flex_attention has no backward on the CPU"
        dense, dense_loss, dense_grads = results["dense"]
        flex, flex_loss, flex_grads = results["flex"]
        outputs_match = torch.allclose(flex, dense, **CHECK_TOLERANCE)
        entry["loss"] = {"dense": dense_loss, "flex": flex_loss}
        entry["output_max_abs_difference"] = (flex - dense).abs().max()
        worst, worst_ratio, grads_match = None, 0.0, dense_grads.keys() == flex_grads.keys()
        for name, expected in dense_grads.items():
            got = flex_grads.get(name)
            if got is None:
                continue
            scale = float(expected.abs().max()) or 1.0
            ratio = float((got - expected).abs().max()) / scale
            if ratio >= worst_ratio:
                worst, worst_ratio = name, ratio
            atol = CHECK_TOLERANCE["atol"] * scale
            grads_match &= torch.allclose(got, expected, rtol=CHECK_TOLERANCE["rtol"], atol=atol)
        entry["gradients_compared"] = len(dense_grads)
        entry["gradient_worst"] = {"parameter": worst, "max_abs_difference_over_scale": worst_ratio}
        entry.update(outputs_match=outputs_match, gradients_match=bool(grads_match))
        entry["match"] = bool(outputs_match and grads_match)
        if not entry["match"]:
            what = "outputs" if not outputs_match else f"gradients ({worst})"
            raise AssertionError(f"flex (compiled) differs from dense in fp32: {what}")

    def trained_model(self, entry: dict):
        if self.model is None:
            entry["model"] = "untrained, backend blocked (part 1 did not build one)"
            self.model = self.build("blocked")
        else:
            entry["model"] = "from part 1 (train)"
        return self.model

    def warm_up_sampling(self, model, precision: str) -> None:
        """A few untimed decoding steps and draws in `precision`: the one-time set-up (masks
        on the device, kernels, autocast's weight casts) is not paid by the timed run."""
        n = self.samples
        previous = None
        with model.evaluating(), self.autocast(precision):
            state = model.start_decoding(n)
            for step in range(min(SAMPLE_WARMUP_STEPS, self.config.num_positions)):
                logits = model.decode_step(state, step, previous)
                previous = model.distribution.draw(logits, 1.0, self.generator(1), 0, 1.0)
        self.sync()

    def part_sample(self, entry: dict, deadline: float, precision: str) -> None:
        model = self.trained_model(entry)
        started = time.perf_counter()
        self.warm_up_sampling(model, precision)
        entry["warmup_s"] = time.perf_counter() - started
        generator = self.generator(0)
        self.sync()
        started = time.perf_counter()
        with self.autocast(precision):
            images = model.sample(self.samples, temperature=1.0, generator=generator)
        self.sync()
        seconds = time.perf_counter() - started
        entry.update(sample_seconds=seconds, images=self.samples, shape=list(images.shape))
        on_levels = torch.isin(images.long(), level_values(images.device).long())
        entry["on_levels"] = float(on_levels.float().mean())
        log(f"[sample {precision}] {self.samples} images in {seconds:.1f} s")

    def part_eval(self, entry: dict, deadline: float) -> None:
        model = self.trained_model(entry)
        images = self.images(2)
        model.eval()
        entry["images"] = images.shape[0]
        with torch.no_grad():  # one at a time: a figure survives the other's failure
            with self.autocast():
                bf16 = model.bits_per_dim(images).double()
            entry["bf16"] = bf16.mean()
            fp32 = model.bits_per_dim(images).double()
            entry["fp32"] = fp32.mean()
        entry["difference"] = float(bf16.mean() - fp32.mean())
        entry["max_abs_difference_per_image"] = float((bf16 - fp32).abs().max())

    def run_all(self) -> None:
        self.run("train", self.part_train)
        for name, backend, compiled, _ in sorted(THROUGHPUT_ROWS, key=lambda r: r[2]):
            self.run(name, lambda e, d, b=backend, c=compiled: self.part_throughput(e, d, b, c))
        self.run("check/flex_vs_dense", self.part_check)
        for precision in ("bf16", "fp32"):
            self.run(
                f"sample/{precision}",
                lambda e, d, p=precision: self.part_sample(e, d, p),
                atomic=True,
            )
        self.run("eval", self.part_eval)

    # The table ---------------------------------------------------------------------------------
    def table(self) -> str:
        parts = self.doc["parts"]
        ref = REFERENCE["train_images_per_s"]
        samp = REFERENCE["sample_64_seconds"]

        def cell(name: str, figure: Callable[[dict], str]) -> str:
            entry = parts.get(name, {"status": "not run"})
            status = entry.get("status", "")
            try:
                text = figure(entry)
            except (KeyError, TypeError, ValueError):
                return status or "no figure"
            return text if status == "ok" else f"{text} ({status})"

        def train(e: dict) -> str:
            fell = "yes" if e["loss_fell"] else "NO"
            return (
                f"{e['first_mean']:.3f} -> {e['last_mean']:.3f} nats over {e['steps_done']} steps"
                f" ({e['seconds_training']:.0f} s); fell: {fell}"
            )

        def speed(e: dict) -> str:
            mfu = f", MFU {100 * e['mfu']:.1f}%" if e.get("mfu") is not None else ""
            mem = f", peak {e['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in e else ""
            return f"{e['images_per_s']:.1f} images/s{mfu}{mem}"

        def sample(e: dict) -> str:
            return (
                f"{e['sample_seconds']:.1f} s; {100 * e['on_levels']:.0f}% of intensities on levels"
            )

        def evaluate(e: dict) -> str:
            return f"{e['bf16']:.4f} / {e['fp32']:.4f} / {e['difference']:+.5f}"

        def check(e: dict) -> str:
            worst = e["gradient_worst"]["max_abs_difference_over_scale"]
            return (
                f"{'match' if e['match'] else 'DIFFER'}: outputs within "
                f"{e['output_max_abs_difference']:.1e}, gradients within {worst:.1e} of scale"
            )

        refs = {
            "throughput/flex": f"best existing PyTorch port: {ref['best existing PyTorch port']:g}",
            "throughput/flex_compiled": (
                f"GPT, compiled flash attention: "
                f"{ref['same-size GPT, compiled flash attention']:g}; flex local_1d mask, "
                f"compiled: {ref['flex_attention with the local_1d mask, compiled']:g} "
                f"(MFU {100 * REFERENCE['train_mfu_flex_compiled']:.0f}%)"
            ),
        }
        sample_ref = (
            f"bare cached loop: {samp['bare cached loop, eager']:g} s eager, "
            f"{samp['bare cached loop, CUDA graphs']:g} s CUDA graphs"
        )
        b, n = self.batch, self.samples
        rows = [("1 train", f"loss, first / last {WINDOW}-step mean", cell("train", train), "")]
        for name, _, _, label in THROUGHPUT_ROWS:
            rows.append(
                (f"2 {name}", f"train step, batch {b}, {label}", cell(name, speed), refs.get(name))
            )
        what = "flex (compiled) vs dense, fp32, outputs and gradients"
        rows.append(("3 check/flex_vs_dense", what, cell("check/flex_vs_dense", check), ""))
        for precision in ("bf16", "fp32"):
            what = f"{n} images, eager, {'bf16 autocast' if precision == 'bf16' else 'fp32'}"
            name = f"sample/{precision}"
            rows.append((f"4 {name}", what, cell(name, sample), sample_ref))
        rows.append(("5 eval", "bits/dim bf16 / fp32 / difference", cell("eval", evaluate), ""))
        header = ("part", "measurement", "this run", f"reference ({REFERENCE['where']})")
        lines = [
            f"{self.device_name}, torch {torch.__version__}, {self.doc['date']}, "
            f"{self.doc['settings']['preset']}, bf16 unless said",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(text or "" for text in row) + " |" for row in rows]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure the project's GPU paths on one CUDA GPU (under 9 minutes).",
        epilog=(
            "Exit status: 0 every part gave its figure, flex matched dense and the loss fell; "
            "1 otherwise; 2 no CUDA device."
        ),
    )
    parser.add_argument("--steps", type=int, help="training steps of part 1 (default 300)")
    parser.add_argument("--batch", type=int, help="batch size of parts 1, 2, 4 (default 32)")
    parser.add_argument("--samples", type=int, help="images to sample in part 3 (default 64)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of part 1")
    parser.add_argument(
        "--train-backend",
        default="auto",
        choices=("auto", "dense", "blocked", "flex"),
        help="attention backend of part 1 (default auto: flex on CUDA)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)"
    )
    parser.add_argument(
        "--json", default=str(DEFAULT_JSON), help="where to write the results (JSON)"
    )
    parser.add_argument(
        "--budget",
        action="append",
        type=budget_override,
        metavar="PART=SECONDS",
        help=f"another time budget for one part (repeatable); parts: {', '.join(BUDGETS)}",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="for the project's tests only: every part on the CPU with a tiny model, in seconds",
    )
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        print(
            f"gpu.py: needs a CUDA GPU (torch {torch.__version__}: {built}); "
            "run it on a machine with one",
            file=sys.stderr,
        )
        return 2
    if str(REPO) not in sys.path:  # measure this working tree's package
        sys.path.insert(0, str(REPO))
    try:
        import imagetransformer as package

        bench = Bench(args, package)
    except Exception as error:
        print(f"gpu.py: cannot set up: {one_line(error)}", file=sys.stderr)
        return 1
    try:
        bench.describe_model()
    except Exception as error:
        bench.doc["model"]["error"] = f"failed: {one_line(error)}"
        log(f"[model] failed: {one_line(error)} (no MFU)")
    bench.write()
    bench.run_all()
    train = bench.doc["parts"].get("train", {})
    bench.doc["complete"] = not bench.failed and not bench.incomplete
    bench.doc["failed"] = bench.failed
    bench.doc["incomplete"] = bench.incomplete
    bench.write()
    print(bench.table())
    log(f"results: {bench.json_path}")
    code = 0
    if bench.failed:
        log(f"failed parts: {', '.join(bench.failed)}")
        code = 1
    if bench.incomplete:
        log(f"parts without their figure: {', '.join(bench.incomplete)}")
        code = 1
    if not bench.smoke and train.get("loss_fell") is False:
        log("the training loss did not fall")
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
