"""Activation steering inside vLLM (CPU build): steered batches against the idle plugin and stock vLLM, one run.

``python benchmarks/bench_activation_steering.py [--model DIR] [--rounds 5] [--max-tokens 64]
[--num-prompts 64] [--prompt-len 32] [--eager] [--out results.json] [--write-results]``

Two engines on the same model stay alive side by side in this process: stock vLLM (``steering=False``,
``CPUWorker``) and ``ValueSteerWorker`` with ``{"steering": {}}`` (every decoder layer wrapped by the
steering ops, no vector preloaded). Each measurement is one ``llm.generate`` call with ``--num-prompts``
requests decoding together (greedy, ``ignore_eos``, exactly ``--max-tokens`` new tokens each, prompts of
exactly ``--prompt-len`` tokens, prefix caching off), timed end to end (prefill, every decode step, the
plugin's request validation of the inline vectors). Configurations:

  vanilla            stock vLLM, no plugin
  idle               the plugin, no request steered
  1 config           every request the same spec: one add at the middle layer (unit vector, small scale)
  8 / 32 configs     distinct specs spread over the batch: add / cap + add / ablate at different layers,
                     each config its own inline vector
  ... + gate         the same three with a probe gate (``gate(layer, probe, 0, 10)`` at the lowest edited
                     layer: every op gated, decode tokens only)

After a warm-up round (every configuration once, not timed), ``--rounds`` rounds run
``vanilla, idle, <steered configs>, idle, vanilla`` (steered order reversed every other round); a round's
baseline is the mean of its two idle (two vanilla) calls, so linear drift of the shared machine's load
cancels. Reported per configuration: median output tok/s (and total tok/s, prompt included) over rounds,
and the per-round ratios idle/vanilla and steered/idle as median with min-max. Goals (issue 13):
idle/vanilla >= 0.98; steered/idle >= 0.95 with 1 config, >= 0.90 with 32 configs (the same for the gated
rows). "changed" is the share of requests whose greedy output differs from the idle run's (a check that the
steering acts; vanilla: differs from idle).

Default mode: compiled (vLLM's default ``enforce_eager=False``, how ``vllm serve`` runs); ``--eager`` for
eager. Default model: SmolLM2-135M-Instruct prepared by ``value-steer models prepare`` (fp32).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from value_steer.offline.assets import apply_vllm_cpu_env

apply_vllm_cpu_env("bench")

VANILLA, IDLE = "vanilla", "idle"
# (name, number of distinct specs in the batch, gated)
STEERED = (("1 config", 1, False), ("8 configs", 8, False), ("32 configs", 32, False),
           ("1 config + gate", 1, True), ("8 configs + gate", 8, True), ("32 configs + gate", 32, True))
GOALS = {IDLE: 0.98, "1 config": 0.95, "32 configs": 0.90, "1 config + gate": 0.95, "32 configs + gate": 0.90}
ADD_SCALE = 4.0  # on unit vectors: small against the residual stream's norm, so the text stays sane
CAP = 1.0  # cap's bounds: [-CAP, CAP] on the component along the unit vector
NUM_PROBES = 4


def build_specs(n_configs: int, gated: bool, num_layers: int, hidden: int, seed: int = 0) -> list[dict]:
    """``n_configs`` distinct steering specs (``extra_args`` dicts), inline unit vectors of ``hidden`` floats.

    One config: an add at the middle layer. More: config ``i`` edits layer ``2 + 7i mod (num_layers - 4)``
    with an add (i % 3 == 0), a cap there plus an add two layers up (1), or an ablate (2), each with its own
    vector (at most 32 distinct vectors plus 4 probes: the default bank holds 64).
    """
    import numpy as np

    from value_steer.core.steering_spec import Steering, ablate, add, cap, gate

    rng = np.random.default_rng(seed)

    def unit() -> np.ndarray:
        v = rng.standard_normal(hidden).astype(np.float32)
        return v / np.linalg.norm(v)

    vectors = [unit() for _ in range(n_configs)]
    probes = [unit() for _ in range(NUM_PROBES)]
    specs = []
    for i in range(n_configs):
        if n_configs == 1:
            layer = num_layers // 2
            ops = [add(layer, vectors[i], ADD_SCALE)]
        else:
            layer = 2 + (7 * i) % (num_layers - 4)
            kind = i % 3
            if kind == 0:
                ops = [add(layer, vectors[i], ADD_SCALE)]
            elif kind == 1:
                ops = [cap(layer, vectors[i], -CAP, CAP), add(layer + 2, vectors[i], ADD_SCALE / 2)]
            else:
                ops = [ablate(layer, vectors[i], 0.0)]
        g = gate(layer, probes[i % NUM_PROBES], 0.0, 10.0) if gated else None
        specs.append(Steering(ops, gate=g).extra_args())
    return specs


def describe(spec: dict) -> dict:
    """A spec without its vectors (for the JSON): the ops' layers, kinds and parameters, the gate's."""
    st = spec["steering"]
    d = {"ops": [{k: v for k, v in op.items() if k != "vector"} for op in st["ops"]]}
    if "gate" in st:
        d["gate"] = {k: v for k, v in st["gate"].items() if k != "probe"}
    return d


def build_prompts(tokenizer, n: int, prompt_len: int) -> list[dict]:
    """``n`` distinct prompts of exactly ``prompt_len`` tokens: the sentiment task's test prompts run on
    (prompt i starts with text i and continues with the following ones), cut to length."""
    from value_steer.offline.tasks.sentiment import sample_prompts

    texts = [p.text for p in sample_prompts("test", None, seed=0)]
    out = []
    for i in range(n):
        ids: list[int] = []
        j = i
        while len(ids) < prompt_len:
            ids += tokenizer.encode(texts[j % len(texts)] + " ", add_special_tokens=False)
            j += 1
        out.append({"prompt_token_ids": ids[:prompt_len]})
    return out


def _llm(model: str, steering: bool, args: argparse.Namespace):
    from value_steer.offline.engines import offline_llm

    return offline_llm(model, {"steering": {}} if steering else None, steering=steering, kv_use="bench",
                       enforce_eager=args.eager, max_model_len=max(512, args.prompt_len + args.max_tokens),
                       max_num_seqs=args.num_prompts, max_num_batched_tokens=max(2048, args.num_prompts * 8),
                       block_size=args.block_size, enable_prefix_caching=False)


def _sampling(n: int, max_tokens: int, extra_args: list[dict] | None) -> list:
    from vllm import SamplingParams

    # Greedy and no per-request seed (vLLM 0.32's CPU runner crashes rewinding a seeded generator when a
    # prefill is chunked, see bench_vfd_engine.py). Fresh params (and spec dicts) for every call.
    return [SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                           extra_args=None if extra_args is None else copy.deepcopy(extra_args[i % len(extra_args)]))
            for i in range(n)]


def timed_generate(llm, prompts: list[dict], max_tokens: int, extra_args: list[dict] | None):
    """Seconds of one ``generate`` over all prompts, and each request's generated token ids."""
    sps = _sampling(len(prompts), max_tokens, extra_args)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == max_tokens for t in tokens), [len(t) for t in tokens]
    return dt, tokens, outs[0].outputs[0].text


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up round")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (ignore_eos)")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per generate call (all concurrent)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True (default: compiled, vLLM's default)")
    ap.add_argument("--block-size", type=int, default=32, help="the CPU backend needs a multiple of 32")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--write-results", action="store_true", help="add/replace the section in benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 1 or args.num_prompts < 1 or args.prompt_len < 1:
        ap.error("--rounds, --max-tokens, --num-prompts and --prompt-len must be >= 1")

    from transformers import AutoConfig

    from value_steer.offline.models import prepare_smollm2

    model = args.model or str(prepare_smollm2())
    hf = AutoConfig.from_pretrained(model)
    num_layers, hidden = hf.num_hidden_layers, hf.hidden_size
    mode = "eager" if args.eager else "compiled"
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    engines = {VANILLA: _llm(model, False, args)}
    start_s = {VANILLA: time.perf_counter() - t0}
    t0 = time.perf_counter()
    engines[IDLE] = _llm(model, True, args)
    start_s[IDLE] = time.perf_counter() - t0
    print(f"engines up ({mode}): vanilla {start_s[VANILLA]:.0f} s, plugin {start_s[IDLE]:.0f} s", flush=True)

    prompts = build_prompts(engines[IDLE].get_tokenizer(), args.num_prompts, args.prompt_len)
    # name -> (engine, per-request extra_args cycled over the batch, or None)
    configs: dict[str, tuple[object, list[dict] | None]] = {VANILLA: (engines[VANILLA], None),
                                                             IDLE: (engines[IDLE], None)}
    for name, n, gated in STEERED:
        configs[name] = (engines[IDLE], build_specs(n, gated, num_layers, hidden))
    steered = [name for name, _, _ in STEERED]

    def run(name: str):
        llm, extra = configs[name]
        return timed_generate(llm, prompts, args.max_tokens, extra)

    # Warm-up: every configuration once (lazy paths, allocator); its outputs are the "changed" reference.
    tokens: dict[str, list[list[int]]] = {}
    samples: dict[str, str] = {}
    for name in configs:
        dt, tokens[name], samples[name] = run(name)
        print(f"warm-up {name:18s} {dt:7.2f} s", flush=True)
    changed = {name: sum(a != b for a, b in zip(tokens[name], tokens[IDLE])) / len(prompts)
               for name in configs if name != IDLE}

    times: dict[str, list[float]] = {name: [] for name in configs}
    ratios: dict[str, list[float]] = {name: [] for name in configs if name != VANILLA}
    calls: list[dict] = []  # every timed call in order (round, configuration, seconds)
    for r in range(args.rounds):
        order = steered if r % 2 == 0 else steered[::-1]
        got: dict[str, list[float]] = {name: [] for name in configs}
        for name in [VANILLA, IDLE, *order, IDLE, VANILLA]:
            dt = run(name)[0]
            got[name].append(dt)
            calls.append({"round": r + 1, "config": name, "seconds": dt})
        for name, dts in got.items():
            times[name].append(statistics.fmean(dts))
        ratios[IDLE].append(times[VANILLA][-1] / times[IDLE][-1])
        for name in steered:
            ratios[name].append(times[IDLE][-1] / times[name][-1])
        print(f"round {r + 1}/{args.rounds}: idle/vanilla {ratios[IDLE][-1]:.3f}  "
              + "  ".join(f"{name} {ratios[name][-1]:.3f}" for name in steered), flush=True)

    out_tokens = args.num_prompts * args.max_tokens
    all_tokens = args.num_prompts * (args.max_tokens + args.prompt_len)
    results = {}
    for name in configs:
        tok_s = [out_tokens / t for t in times[name]]
        cell = {"seconds": times[name], "output_tok_s": _stats(tok_s),
                "total_tok_s": _stats([all_tokens / t for t in times[name]]),
                "changed_vs_idle": changed.get(name), "sample": samples[name][:200]}
        if name in ratios:
            cell["ratio"] = {**_stats(ratios[name]), "rounds": ratios[name],
                             "against": VANILLA if name == IDLE else IDLE, "goal": GOALS.get(name)}
            goal = GOALS.get(name)
            cell["ratio"]["met"] = None if goal is None else cell["ratio"]["median"] >= goal
        results[name] = cell
    specs_per_batch = {VANILLA: "-", IDLE: "0", **{name: str(n) for name, n, _ in STEERED}}

    load = f"; 1-min load average at the end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    lines = [
        f"model {os.path.basename(model.rstrip('/'))} fp32 ({num_layers} layers, H={hidden}), vLLM CPU {mode}, "
        f"{os.cpu_count()} cores{load}; {args.num_prompts} concurrent requests x {args.prompt_len} prompt + "
        f"{args.max_tokens} new tokens (greedy, ignore_eos), one generate call each; {args.rounds} rounds after a "
        "warm-up, interleaved on both engines; median over rounds (ratio min-max)",
        "",
        "| configuration | specs in batch | output tok/s | total tok/s | ratio | min-max | against | goal | met | "
        "changed |",
        "|---|---:|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for name, cell in results.items():
        rt = cell.get("ratio")
        ratio = f"{rt['median']:.3f} | {rt['min']:.3f}-{rt['max']:.3f} | {rt['against']}" if rt else "| |"
        goal = "" if not rt or rt["goal"] is None else f">= {rt['goal']:.2f}"
        met = "" if not rt or rt["met"] is None else ("yes" if rt["met"] else "NO")
        ch = "" if cell["changed_vs_idle"] is None else f"{cell['changed_vs_idle']:.2f}"
        lines.append(f"| {name} | {specs_per_batch[name]} | {cell['output_tok_s']['median']:.1f} | "
                     f"{cell['total_tok_s']['median']:.1f} | {ratio} | {goal} | {met} | {ch} |")
    lines += ["", "ratio: tok/s against the baseline of the same round (idle: against vanilla; steered: against idle "
              "on the same engine). changed: share of requests whose greedy output differs from idle's."]
    table = "\n".join(lines)
    elapsed = time.perf_counter() - t_start
    print("\n" + table + f"\n\n(took {elapsed:.0f} s)")

    if args.out:
        doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "model": model, "mode": mode, "cpu_count": os.cpu_count(), "num_layers": num_layers,
               "hidden_size": hidden, "args": vars(args), "engine_start_s": start_s, "elapsed_s": elapsed,
               "specs": {name: [describe(s) for s in configs[name][1]] for name in steered},
               "results": results, "calls": calls, "table": table}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    if args.write_results:
        from run_all import git_commit, write_section

        cmd = "python benchmarks/bench_activation_steering.py" + (" --eager" if args.eager else "")
        body = (f"## vLLM engine: activation steering vs idle plugin vs stock vLLM ({mode}, CPU)\n\n"
                f"{datetime.date.today()} · commit {git_commit()} · `{cmd}`\n\n{table}\n")
        write_section(f"activation-steering-{mode}-cpu", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
