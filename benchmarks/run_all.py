"""Run every kernel benchmark and print one table (``python benchmarks/run_all.py [--write-results]``).

On a CUDA machine the ops run their Triton kernels; on CPU they run the C++ extension ``value_steer._C``
(the Triton interpreter is never benchmarked). The torch column is the reference composite each op
replaces. ``--write-results`` adds or replaces this device's section in ``benchmarks/RESULTS.md``
(device name, date, git commit).

GPU goals from the issue (checked in the "met" column on GPU only):
  value_head        H=4096, M<=64: >= 80% of HBM bandwidth on weight reads and >= 1.5x torch
  score_and_select  >= 3x the torch composite (vfd_select + force_eos + gathers)
  copy_kv_slots     32 layers in one launch: >= 5x a per-layer torch loop
  steer_activations / steer_gate: no goal set (timed against a per-request torch loop)
  logit_steer       no goal set (timed against a per-request torch loop; memory bound on the logits)
  value_head_grouped no goal here (timed against a per-head torch loop); its goal, one-head time / grouped
                    8-head time >= 0.9, is checked by `python benchmarks/bench_value_head_grouped.py`
  token_filter      no goal here (timed against TokenFilterTables.filter's torch path); its goal, >= 3x that
                    path at B=32 (mask rule, CPU), is checked by `python benchmarks/bench_token_filter.py`
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kv
import bench_logit_steer
import bench_score_and_select
import bench_steer_activations
import bench_token_filter
import bench_value_head
import bench_value_head_grouped
from _common import device, device_name, format_table, peak_bandwidth

import value_steer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
HEADER = (
    "# value_steer kernel benchmarks\n\n"
    "One section per device, written by `python benchmarks/run_all.py --write-results`.\n"
)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(RESULTS),
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(name: str, body: str) -> None:
    begin, end = f"<!-- results: {name} -->", f"<!-- /results: {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = open(RESULTS).read() if os.path.exists(RESULTS) else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    with open(RESULTS, "w") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: torch/OpenMP threads for both sides (default 1: on a shared, oversubscribed machine "
        "multi-threaded OpenMP regions stall on descheduled threads and the timings become meaningless)",
    )
    args = parser.parse_args()

    dev = device()
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    name = device_name(dev)
    peak, how = peak_bandwidth(dev)
    t0 = time.time()
    rows = bench_value_head.run(dev) + bench_score_and_select.run(dev) + bench_kv.run(dev)
    rows += bench_steer_activations.run(dev)
    rows += bench_logit_steer.run(dev)
    rows += bench_value_head_grouped.run(dev)
    rows += bench_token_filter.run(dev)
    elapsed = time.time() - t0
    impl = "Triton kernels" if dev.type == "cuda" else (
        "C++ extension value_steer._C" if value_steer.has_extension() else "torch reference (value_steer._C NOT built)"
    )  # fmt: skip
    notes = [
        f"- device: {name}; torch {torch.__version__}; ours = {impl}",
        f"- peak bandwidth: {how}",
        "- GB/s = minimum bytes each op must move / our time; % peak BW against the figure above",
    ]
    if dev.type != "cuda" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        notes.append(
            f"- 1-min load average at the end of the run: {load:.1f} on {os.cpu_count()} CPUs (a shared machine: "
            "absolute times are noisy; ours and torch are timed interleaved, fastest round kept)"
        )
    if dev.type != "cuda":
        notes.append(
            "- the CPU peak is a memcpy estimate taken on the same (loaded) machine; shares above 100% mean it "
            "is an underestimate, not that an op beat memory bandwidth"
        )
        notes.append('- the GPU targets do not apply on CPU ("n/a"); they are checked when run on a GPU')
        notes.append(
            "- value_head (C++) is batch-invariant by contract (each hidden unit one fixed-order dot product: a "
            "row's value is bitwise the same alone or in any batch, csrc/value_head.cpp); torch's GEMM is not, "
            "and its blocking wins from M=16 up; with bf16 weights torch also computes in bf16 where ours is fp32 "
            "math. That is the price of VFD scores that do not depend on the batch"
        )
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"## {name} — {date} — commit {git_commit()}"
    body = "\n".join([title, "", *notes, "", *format_table(rows, peak, gpu=dev.type == "cuda")])
    print(body)
    print(f"\n(benchmarks took {elapsed:.1f}s)")
    if args.write_results:
        write_section(name, body)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
