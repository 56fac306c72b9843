"""The project's GPU paths on one CUDA GPU, in one command (under 9 minutes in all).

    python benchmarks/gpu.py                      # on a machine with a CUDA GPU
    python benchmarks/gpu.py --json out.json --steps 300 --batch 32 --peak-tflops 989

Four parts, all on the CIFAR-10 paper preset (`load_preset("cifar10_1d")`: 12 layers, d=512,
3,072 positions, local_1d with 256-position blocks and memory), bf16 autocast unless said:

1. train: `--steps` Adam steps (betas 0.9/0.98, eps 1e-9, gradient clipping at 1.0 as the
   project's trainer does; lr `--lr` after a 20-step linear warm-up) at batch `--batch` on
   random smooth images: 4x4 uniform noise per channel, bilinearly upsampled to 32x32 and
   quantised to 8 intensity levels. That distribution is learnable, so the loss (mean nats per
   sub-pixel) must fall; the first and last 20-step means are reported and compared.
2. throughput: images/s of a whole training step (forward, backward, clipping, Adam) at batch
   `--batch` after warm-up, timed with CUDA events, for the attention backends `dense`,
   `flex` (the model eager; the package itself runs `flex_attention` through `torch.compile`
   on CUDA), `flex` with `torch.compile(model.loss)` (the whole training forward and loss
   compiled; backward through the compiled graph) and `blocked` (reference). Each backend is
   chosen by `dataclasses.replace(config, backend=NAME)`. Also the peak CUDA memory and MFU:

       FLOPs per image and training step = 6 * P * N + 12 * L * N * K * d

   with P the parameter count (`model.num_parameters()`, embeddings included), N the positions
   per image, L the layers, d the model width and K the average number of keys a query may see
   (`model.pattern.dense_mask().float().sum(1).mean()`; 363.2 for cifar10_1d). 6 * P * N is
   the matmul cost forward (2) plus backward (4); attention adds Q.K^T and A.V, 2 * N * K * d
   each forward, x3 with backward. These are useful FLOPs: `dense` computes all N x N scores
   and flex whole 128 x 128 tiles, which the formula does not count. MFU = images/s x FLOPs
   per image / peak, the peak being the GPU's dense bf16 tensor-core rate: `--peak-tflops`
   when given, else looked up from the device name (`PEAK_BF16_TFLOPS`), else left empty.
3. sample: seconds to sample `--samples` (64) images with `model.sample(n, temperature=1.0,
   generator=...)` (the cached sampler, eager) under bf16 autocast and in fp32, with the
   model of part 1 (or an untrained one if part 1 failed). Also the fraction of sampled
   intensities that lie on the data's 8 levels (a trained model: high; untrained: ~3%).
4. eval: `model.bits_per_dim` of one batch of those images (not seen in training), in eval
   mode, under bf16 autocast and in fp32, and their difference.

Every part has a time budget (`BUDGETS`, seconds; 510 s in all): loops stop early when it runs
out and an atomic call (compilation, sampling) is interrupted by an alarm; either way the part
says so. Every part catches its own errors ("failed: <one line>") so that the others still
report; the JSON (`--json`, default benchmarks/gpu_results.json) is rewritten atomically after
each part. Progress goes to stderr; stdout gets one markdown table, beside reference figures
measured elsewhere (`REFERENCE`).

Exit status: 0 when every part ran and the loss fell, 1 otherwise, 2 when there is no CUDA
device (one line on stderr). `--cpu-smoke` is for the project's tests only: every part on the
CPU with a tiny model (3x8x8 images, 2 layers, d=32, 3 steps, 2 samples), no compilation.
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
# for fp32 and for bf16 without gradients (part 1 compiled it only with them)
BUDGETS = {
    "train": 100.0,
    "throughput/dense": 35.0,
    "throughput/flex": 35.0,
    "throughput/blocked": 30.0,
    "throughput/flex_compiled": 130.0,
    "sample/bf16": 65.0,
    "sample/fp32": 65.0,
    "eval": 45.0,
}
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
    ("throughput/flex_compiled", "flex", True, "flex, torch.compile(model.loss)"),
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
        self.failed: list[str] = []
        self.json_path = Path(args.json)
        config = package.load_preset(PRESET)
        if self.smoke:  # the tiny preset's shapes, in colour
            config = dataclasses.replace(package.load_preset("tiny"), image_shape=(3, 8, 8))
        self.config = config
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
                "train_backend": args.train_backend,
                "budgets_s": BUDGETS,
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
    def run(self, name: str, part: Callable[[dict, float], None], atomic: bool = False) -> None:
        """Run `part(entry, deadline)`; it fills `entry`. Errors and overruns are recorded, never
        raised. `atomic` parts cannot stop themselves: the alarm is their budget."""
        entry: dict = {"budget_s": BUDGETS[name]}
        self.doc["parts"][name] = entry
        started = time.perf_counter()
        left = self.deadline - started
        budget = min(BUDGETS[name], left)
        if budget < 3:
            entry["status"] = "skipped: the total time budget is spent"
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
        model = self.build(self.args.train_backend).train()
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
            if losses:
                window = min(WINDOW, max(1, len(losses) // 2))
                first = sum(losses[:window]) / window
                last = sum(losses[-window:]) / window
                fell = bool(math.isfinite(last) and last < first)
                entry.update(window=window, first_mean=first, last_mean=last, loss_fell=fell)
                log(f"[train] loss {first:.4f} -> {last:.4f}: fell: {'yes' if fell else 'NO'}")
        del optimizer

    def part_throughput(self, entry: dict, deadline: float, backend: str, compiled: bool) -> None:
        if compiled and self.smoke:
            entry["status"] = "skipped: no compilation in --cpu-smoke"
            return
        model = self.build(backend).train()
        optimizer = self.adam(model, 1e-5)
        images = self.images(3)
        entry["compiled"] = "torch.compile(model.loss)" if compiled else None
        if compiled:  # one eager step: the pattern's device forms exist before any trace
            self.train_step(model, model.loss, optimizer, images)
        loss_fn = torch.compile(model.loss) if compiled else model.loss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        for _ in range(1 if self.smoke else THROUGHPUT_WARMUP):
            self.train_step(model, loss_fn, optimizer, images)
        self.sync()
        entry["warmup_s"] = time.perf_counter() - started
        one = self.time_steps(model, loss_fn, optimizer, images, 1)
        room = deadline - time.perf_counter() - 1.0
        steps = 3 if self.smoke else max(1, min(THROUGHPUT_MAX_STEPS, int(room / one)))
        seconds = self.time_steps(model, loss_fn, optimizer, images, steps)
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

    def trained_model(self, entry: dict):
        if self.model is None:
            entry["model"] = "untrained, backend blocked (part 1 did not build one)"
            self.model = self.build("blocked")
        else:
            entry["model"] = "from part 1 (train)"
        return self.model

    def part_sample(self, entry: dict, deadline: float, precision: str) -> None:
        model = self.trained_model(entry)
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
        for precision in ("bf16", "fp32"):
            what = f"{n} images, eager, {'bf16 autocast' if precision == 'bf16' else 'fp32'}"
            name = f"sample/{precision}"
            rows.append((f"3 {name}", what, cell(name, sample), sample_ref))
        rows.append(("4 eval", "bits/dim bf16 / fp32 / difference", cell("eval", evaluate), ""))
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
        epilog="Exit status: 0 all parts ran and the loss fell, 1 otherwise, 2 no CUDA device.",
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
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
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
    bench.doc["complete"] = not bench.failed
    bench.write()
    print(bench.table())
    log(f"results: {bench.json_path}")
    if bench.failed:
        log(f"failed parts: {', '.join(bench.failed)}")
        return 1
    if not bench.smoke and not train.get("loss_fell"):
        log("the training loss did not fall")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
