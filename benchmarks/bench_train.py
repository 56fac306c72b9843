"""Training-step speed and peak memory of the attention backends, side by side.

Each (image size, attention type, backend) runs in two subprocesses of its own:

- timing: images/s over a few steps after one warm-up step, and the growth of the process's
  peak RSS over them (ru_maxrss after the steps minus before the warm-up). RSS is a loose
  measure: it also counts allocator caching, oneDNN/OpenMP scratch, pages not given back, and
  the one-off work of the first step.
- memory: the peak of live tensor memory during one training step, exactly. `torch.profiler`
  with `profile_memory=True` records every CPU tensor allocation and free (size, id, time) from
  before the model is built; replaying them in time order gives the bytes held by tensors at
  every moment. The first step (which builds the pattern's device forms and Adam's state) is
  profiled but not measured; the second one is. "kept" is what is live before it (parameters,
  gradients, Adam state, the attention pattern's cached mask and indices), "step" the most the
  step adds on top, "peak" their sum. The profiled steps are not timed.

Prints a markdown table with images/s and memory and the ratios of each local backend against
`dense`, then, for the largest image, what is live at the peak, grouped by the op that
allocated it.

    python benchmarks/bench_train.py            # 3x32x32 and 3x64x64, local_1d and local_2d
    python benchmarks/bench_train.py --quick    # 3x32x32 only
    python benchmarks/bench_train.py --check    # validate the memory measurement on toys
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# The paper's block sizes (docs/model.md, Presets) on a model small enough for a CPU.
ATTENTION = {
    "local_1d": dict(attention="local_1d", block_length=256, memory_length=256),
    "local_2d": dict(attention="local_2d", query_shape=(8, 16), memory_flange=(8, 32)),
}
MODEL = dict(d_model=128, num_heads=2, ffn_size=512, num_layers=1, dropout=0.0)
MIB = 2**20
_FIRST, _MEASURED = "bench_train: first step", "bench_train: measured step"
_SPANS = (_FIRST, _MEASURED)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(size: int, kind: str, backend: str, batch: int) -> Callable[[], None]:
    """Model, optimizer and batch of one configuration; returns its training step."""
    from imagetransformer import ImageTransformer, ImageTransformerConfig

    torch.manual_seed(0)
    config = ImageTransformerConfig(
        image_shape=(3, size, size), backend=backend, **MODEL, **ATTENTION[kind]
    )
    model = ImageTransformer(config)
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    if backend != "dense":  # build the pattern once, outside the timing (dense never uses it)
        _ = model.pattern.blocked_layout

    def step() -> None:
        loss = model.loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def run_timing(size: int, kind: str, backend: str, batch: int, steps: int) -> dict:
    step = _build(size, kind, backend, batch)
    before = _rss_mib()
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    return {
        "seconds_per_step": seconds,
        "images_per_s": batch / seconds,
        "rss_mib": _rss_mib() - before,
    }


# Live tensor memory --------------------------------------------------------------------------
def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _op_label(node) -> tuple[str, str]:
    """(top-level op under the step marker, innermost op with its input shapes) of an
    allocation event; backward ops are named by their autograd node."""
    chain = []
    parent = node.parent
    while parent is not None and parent.name not in _SPANS:
        chain.append(parent)
        parent = parent.parent
    if not chain:
        return "(outside any op)", ""
    top = chain[-1].name.replace("autograd::engine::evaluate_function: ", "")
    inner = chain[0]
    shapes = [
        "x".join(map(str, arg.sizes)) or "scalar"
        for arg in getattr(inner.extra_fields, "inputs", [])
        if hasattr(arg, "sizes")
    ]
    return top, f"{inner.name}({', '.join(shapes)})"


def live_tensor_peak(setup: Callable[[], Callable[[], None]], top: int = 0) -> dict:
    """Peak bytes held by CPU tensors during the second call of the step `setup()` returns.

    Everything runs under `torch.profiler` with `profile_memory=True`, from before `setup`:
    each allocation and free is an event with its size and allocation id, so the running sum in
    time order is the bytes held by tensors allocated since. The CPU allocator reports nothing
    about tensors allocated before profiling began, so run this in a fresh process: patterns
    are cached per process, and one built earlier would be missing from "kept".
    Returns the level before the measured step ("kept"), the most it adds on top ("step"),
    the first step's own peak, and with `top` the largest groups of allocations live at the
    peak.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as p:
        step = setup()
        with record_function(_FIRST):
            step()
        with record_function(_MEASURED):
            step()
    nodes = list(_walk(p.profiler.kineto_results.experimental_event_tree()))
    spans = {n.name: (n.start_time_ns, n.end_time_ns) for n in nodes if n.name in _SPANS}
    events = [
        n
        for n in nodes
        if type(n.extra_fields).__name__ == "_ExtraFields_Allocation"
        and n.extra_fields.device.type == "cpu"
    ]
    events.sort(key=lambda n: n.start_time_ns)  # stable: ties keep the recorded order
    level, unmatched = 0, 0  # bytes live; frees of allocations never seen (expect none)
    live: dict = {}  # allocation id -> its event
    levels_before: dict = {}
    peaks: dict = {}
    peak_live: dict = {}
    for n in events:
        f = n.extra_fields
        for name, (start, _) in spans.items():
            if name not in levels_before and n.start_time_ns >= start:
                levels_before[name] = level
        level += f.alloc_size
        if f.alloc_size > 0:
            live[f.allocation_id] = n
        elif live.pop(f.allocation_id, None) is None:
            unmatched += 1
        for name, (start, end) in spans.items():
            if start <= n.start_time_ns <= end and level > peaks.get(name, -1):
                peaks[name] = level
                if name == _MEASURED and top:
                    peak_live = dict(live)
    kept = levels_before[_MEASURED]
    result = {
        "kept_mib": kept / MIB,
        "step_mib": (peaks[_MEASURED] - kept) / MIB,
        "peak_mib": peaks[_MEASURED] / MIB,
        "first_step_peak_mib": peaks[_FIRST] / MIB,
        "after_mib": level / MIB,  # equals kept_mib when the step is in a steady state
        "unmatched_frees": unmatched,
    }
    if top:
        groups: dict = {}
        for n in peak_live.values():
            phase = "step" if n.start_time_ns >= spans[_MEASURED][0] else "kept"
            key = (phase, *_op_label(n))
            size, count = groups.get(key, (0, 0))
            groups[key] = (size + n.extra_fields.alloc_size, count + 1)
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
        result["at_peak"] = [
            [phase, where, op, size / MIB, count]
            for (phase, where, op), (size, count) in ranked[:top]
        ]
        if len(ranked) > top:
            size = sum(size for _, (size, _) in ranked[top:])
            count = sum(count for _, (_, count) in ranked[top:])
            result["at_peak"].append(["", "(the rest)", "", size / MIB, count])
    return result


def run_memory(size: int, kind: str, backend: str, batch: int) -> dict:
    return live_tensor_peak(lambda: _build(size, kind, backend, batch), top=12)


def check() -> None:
    """The measurement on toys whose answer is known."""

    def toy(mib: int):
        def setup():
            def step():
                a = torch.empty(mib * MIB // 4)  # mib MiB
                a.fill_(1.0)
                b = a + 1  # both live: 2 x mib
                del a
                c = b * 2  # b and c live: 2 x mib
                del b, c

            return step

        return setup

    for mib in (100, 300):
        r = live_tensor_peak(toy(mib))
        print(f"two live {mib} MiB tensors: step peak {r['step_mib']:.3f} MiB (expect {2 * mib})")

    def kept_setup():
        kept = torch.zeros(50 * MIB // 4)

        def step():
            x = torch.ones(100 * MIB // 4)
            del x
            kept.add_(1)  # in place: no new storage

        return step

    r = live_tensor_peak(kept_setup)
    print(
        f"50 MiB kept + 100 MiB in the step: kept {r['kept_mib']:.3f}, step {r['step_mib']:.3f}, "
        f"peak {r['peak_mib']:.3f} MiB (expect 50, 100, 150)"
    )
    n = 3 * 64 * 64
    r = run_memory(64, "local_1d", "dense", 1)
    mask = n * n / MIB
    print(
        f"dense local_1d at {n} positions: kept {r['kept_mib']:.1f} MiB (holds the [N, N] bool "
        f"mask, {mask:.0f} MiB), step {r['step_mib']:.1f} MiB (its float copy is "
        f"{4 * mask:.0f} MiB); unmatched frees {r['unmatched_frees']}"
    )
    for row in r["at_peak"][:4]:
        print("   ", row)


def _subprocess(args: list) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3x32x32 only")
    parser.add_argument("--check", action="store_true", help="validate the memory measurement")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    if args.check:
        check()
        return
    if args.one:
        what, *config = json.loads(args.one)
        run = run_timing if what == "timing" else run_memory
        print(json.dumps(run(*config)))
        return
    sizes = [(32, 4, 3)] if args.quick else [(32, 4, 3), (64, 1, 2)]
    rows = []
    for size, batch, steps in sizes:
        for kind in ATTENTION:
            for backend in ("dense", "blocked"):
                row = {"positions": 3 * size * size, "attention": kind, "backend": backend}
                row["batch"] = batch
                row.update(_subprocess(["timing", size, kind, backend, batch, steps]))
                row.update(_subprocess(["memory", size, kind, backend, batch]))
                rows.append(row)
                print(f"  measured {row}", file=sys.stderr)
                if row["unmatched_frees"] or abs(row["after_mib"] - row["kept_mib"]) > 0.01:
                    print("  warning: the measured step is not in a steady state", file=sys.stderr)
    print(f"# Training step: blocked vs dense ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}. Model: {MODEL}, fp32, forward + backward + Adam.\n"
    )
    print(
        "| positions | attention | batch | backend | images/s | speed-up | kept MiB | step MiB "
        "| peak MiB | memory ratio | RSS growth MiB | RSS ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        dense = next(
            r
            for r in rows
            if r["backend"] == "dense"
            and r["positions"] == row["positions"]
            and r["attention"] == row["attention"]
        )
        speed = row["images_per_s"] / dense["images_per_s"]
        memory = dense["peak_mib"] / row["peak_mib"]
        rss = dense["rss_mib"] / max(row["rss_mib"], 1.0)
        print(
            f"| {row['positions']} | {row['attention']} | {row['batch']} | {row['backend']} | "
            f"{row['images_per_s']:.2f} | {speed:.2f}x | {row['kept_mib']:.1f} | "
            f"{row['step_mib']:.1f} | {row['peak_mib']:.1f} | {memory:.2f}x | "
            f"{row['rss_mib']:.0f} | {rss:.2f}x |"
        )
    largest = max(row["positions"] for row in rows)
    print(f"\nLive at the peak of the measured step, {largest} positions (top groups, MiB):")
    for row in rows:
        if row["positions"] != largest:
            continue
        print(f"\n{row['attention']} {row['backend']} (peak {row['peak_mib']:.1f} MiB):\n")
        print("| MiB | tensors | allocated | under | by op (input shapes) |")
        print("|---|---|---|---|---|")
        for phase, where, op, mib, count in row["at_peak"]:
            print(f"| {mib:.1f} | {count} | {phase} | {where} | {op} |")


if __name__ == "__main__":
    main()
