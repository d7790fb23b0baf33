"""Generation throughput: the released RLCD loop's behaviour vs `rlcd-data build` on its two engines.

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--max-new-tokens 300]
                    [--dtype float32 bfloat16] [--runs 1] [--only a b c d] [--vllm-threads-bind CPUS] [--vllm-compile]

Each generator runs in its own process on the same prompts, model and settings (the paper's text format,
temperature 1, as the released loop samples):

(a) released-loop baseline: p+ and p- as separate queue entries in input order, fixed batches of 16,
    left padding, every batch decoded until all its rows end or reach max_new_tokens (no stop string),
    backslash and backtick tokens banned, the paper's post-hoc cut, failed outputs re-queued up to 5 times, again in batches of 16;
(b) `rlcd-data build` on its transformers backend (`model.generate` in batches, longest prompts first,
    each row stopped at its own stop, one random generator per output);
(c) `rlcd-data build` on vLLM (`--backend vllm`): the engine's start-up is timed apart from the build.
    Its OpenMP threads are bound as the build binds them (every CPU on a small machine);
    `--vllm-threads-bind auto` measures vLLM's own binding instead.
    Eager by default on a CPU; `--vllm-compile` compiles instead, the first run with an empty compile
    cache (cold start), later runs with the cache the first one wrote (warm start);
(d) (c) without the watcher process that ends the engine's processes when the build is killed
    (`rlcd_data/generate/reaper.py`): `--only c d` measures what the watcher costs;
(e) `rlcd-data build --base-url` against vLLM's OpenAI server on 127.0.0.1, started with the same model,
    dtype, batch size and thread binding as (c) (its start-up timed apart): `--only c e` compares the
    served build with the in-process one. Its peak RSS is the client's alone (the build's process).

Reports completed pairs per second, useful tokens per second (tokens kept after the cut), tokens
generated, peak resident memory (for (c) summed over the engine's processes), the ratios to (a), and
the machine's ceiling: the measured matmul rate divided by the forward-pass FLOPs per generated token.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HH_PROMPTS = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-prompts.jsonl"


def load(args):
    import logging

    from rlcd_data.generate.models import load_causal_lm

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return load_causal_lm(args.model, "none", args.dtype)


def contrast_pairs(args):
    from rlcd_data.pipeline.plan import prepare

    return prepare(config(args, output="-")).pairs


def config(args, **fields):
    """The build every arm runs: the paper's text format at temperature 1 (the released loop's setting)."""
    from rlcd_data.pipeline.config import BuildConfig

    return BuildConfig(task="harmless", prompts=str(args.hh), limit=args.prompts, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, prompt_format="text", temperature=1.0, **fields)


def run_baseline(args) -> dict:
    """(a) The released loop's behaviour."""
    import torch

    from rlcd_data.generate import PAPER_BANNED_CHARACTERS, banned_token_ids
    from rlcd_data.tasks.conversation import extract_response

    model, tok, _ = load(args)
    pairs = contrast_pairs(args)
    banned = banned_token_ids(tok, PAPER_BANNED_CHARACTERS)  # as (b) bans them
    queue = [(i, side, 0) for i in range(len(pairs)) for side in ("chosen", "rejected")]
    responses, failed, generated = {}, set(), 0
    start = time.perf_counter()
    torch.manual_seed(0)
    while queue:
        retry = []
        for b in range(0, len(queue), 16):
            batch = queue[b : b + 16]
            texts = [pairs[i].p_plus if side == "chosen" else pairs[i].p_minus for i, side, _ in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                                     suppress_tokens=banned)
            new = out[:, enc["input_ids"].shape[1]:]
            generated += new.numel()  # every row runs as long as the batch does
            for (i, side, attempt), ids in zip(batch, new.tolist()):
                ended = tok.eos_token_id in ids
                text = tok.decode(ids[: ids.index(tok.eos_token_id)] if ended else ids, skip_special_tokens=True)
                response = extract_response(text, ended)
                if response is not None:
                    responses[i, side] = response
                elif attempt < 5:
                    retry.append((i, side, attempt + 1))
                else:
                    failed.add(i)
        queue = [r for r in retry if r[0] not in failed]
    seconds = time.perf_counter() - start
    done = [i for i in range(len(pairs)) if (i, "chosen") in responses and (i, "rejected") in responses]
    useful = sum(len(tok(responses[i, s], add_special_tokens=False)["input_ids"]) for i in done for s in ("chosen", "rejected"))
    return {"pairs": len(done), "seconds": seconds, "generated_tokens": generated, "useful_tokens": useful}


def run_build(args) -> dict:
    """(b) rlcd-data build's generator, through the build pipeline."""
    from rlcd_data.generate import TransformersGenerator
    from rlcd_data.pipeline.run import build

    model, tok, source = load(args)
    out = Path(tempfile.mkdtemp()) / "out"
    start = time.perf_counter()
    result = build(config(args, output=str(out)), generator=TransformersGenerator(model, tok, args.batch_size, source.description), progress=False)
    seconds = time.perf_counter() - start
    import datasets

    rows = datasets.load_dataset(str(out), split="train")
    useful = sum(rows["chosen_tokens"]) + sum(rows["rejected_tokens"])
    return {"pairs": result.stats.pairs, "seconds": seconds, "generated_tokens": result.stats.generated_tokens,
            "useful_tokens": useful}


def run_vllm(args) -> dict:
    """(c) rlcd-data build on vLLM; the engine start is timed on its own."""
    import os
    import threading

    import psutil

    from rlcd_data.generate import vllm_engine
    from rlcd_data.generate.models import resolve_model
    from rlcd_data.generate.vllm_engine import VLLMEngine, VLLMGenerator
    from rlcd_data.pipeline.run import build

    if args.child == "d":
        class NoWatcher:
            def __init__(self):
                pass

            engine_started = close = __init__

        vllm_engine.Reaper = NoWatcher

    peak = [0]
    running = [True]

    def sample_rss():  # the engine core runs in child processes: sum the tree
        me = psutil.Process(os.getpid())
        while running[0]:
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                total = 0
            peak[0] = max(peak[0], total)
            time.sleep(0.25)

    threading.Thread(target=sample_rss, daemon=True).start()
    source = resolve_model(args.model)
    start = time.perf_counter()
    engine = VLLMEngine(source.path, dtype=args.dtype, max_num_seqs=args.batch_size,
                        enforce_eager=not args.vllm_compile)
    startup = time.perf_counter() - start
    out = Path(tempfile.mkdtemp()) / "out"
    start = time.perf_counter()
    result = build(config(args, output=str(out), backend="vllm"), generator=VLLMGenerator(engine, source.description), progress=False)
    seconds = time.perf_counter() - start
    running[0] = False
    import datasets

    rows = datasets.load_dataset(str(out), split="train")
    useful = sum(rows["chosen_tokens"]) + sum(rows["rejected_tokens"])
    return {"pairs": result.stats.pairs, "seconds": seconds, "generated_tokens": result.stats.generated_tokens,
            "useful_tokens": useful, "startup_seconds": startup, "tree_peak_rss_mb": peak[0] / 2**20}


def run_served(args) -> dict:
    """(e) rlcd-data build as a client of vLLM's OpenAI server on loopback; the server start is timed apart."""
    import json as json_
    import os
    import signal
    import socket
    import urllib.request

    from rlcd_data.generate.models import resolve_model
    from rlcd_data.generate.vllm_engine import cpu_threads_bind
    from rlcd_data.pipeline.run import build

    source = resolve_model(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if "VLLM_CPU_OMP_THREADS_BIND" not in env and (cpus := cpu_threads_bind()):
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    env["VLLM_CPU_KVCACHE_SPACE"] = "2"  # the in-process engine's CPU default (CPU_KV_CACHE_GIB)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", source.path,
               "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
               "--max-num-seqs", str(args.batch_size), "--no-enable-chunked-prefill", "--generation-config", "vllm",
               "--enable-prefix-caching", "--disable-log-stats"]
    if not args.vllm_compile:
        command.append("--enforce-eager")
    url = f"http://127.0.0.1:{port}/v1"
    start = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({server.returncode})")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as answer:
                    if json_.load(answer)["data"]:
                        break
            except OSError:
                time.sleep(1)
        startup = time.perf_counter() - start
        out = Path(tempfile.mkdtemp()) / "out"
        start = time.perf_counter()
        result = build(config(args, output=str(out), backend="openai", base_url=url, model="bench",
                              tokenizer=source.path, max_concurrency=args.batch_size), progress=False)
        seconds = time.perf_counter() - start
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    import datasets

    rows = datasets.load_dataset(str(out), split="train")
    useful = sum(rows["chosen_tokens"]) + sum(rows["rejected_tokens"])
    return {"pairs": result.stats.pairs, "seconds": seconds, "generated_tokens": result.stats.generated_tokens,
            "useful_tokens": useful, "startup_seconds": startup}


def ceiling(args) -> dict:
    """Measured matmul rate (F.linear at the batch size) / forward FLOPs per token (2 x parameters used per token)."""
    import torch

    model, _, _ = load(args)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        params += model.get_output_embeddings().weight.numel()
    dtype = next(model.parameters()).dtype
    a = torch.randn(args.batch_size, model.config.hidden_size, dtype=dtype)
    w = torch.randn(model.config.intermediate_size, model.config.hidden_size, dtype=dtype)
    for _ in range(10):
        torch.nn.functional.linear(a, w)
    n, start = 2000, time.perf_counter()
    for _ in range(n):
        torch.nn.functional.linear(a, w)
    rate = 2 * a.shape[0] * w.numel() * n / (time.perf_counter() - start)
    return {"flops_per_token": 2 * params, "matmul_gflops": rate / 1e9, "ceiling_tokens_per_s": rate / (2 * params)}


def child(args) -> None:
    result = {"a": run_baseline, "b": run_build, "c": run_vllm, "d": run_vllm, "e": run_served,
              "ceiling": ceiling}[args.child](args)
    result["peak_rss_mb"] = result.pop("tree_peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def spawn(args, which: str, env: dict | None = None) -> dict:
    import os

    cmd = [sys.executable, __file__, "--child", which] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("child", "runs", "only") and v is not None and not isinstance(v, bool)
    ] + (["--vllm-compile"] if args.vllm_compile else [])
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="each is measured in turn (ceiling, runs, medians)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of (b); (a) always uses 16")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hh", default=str(HH_PROMPTS))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=["a", "b", "c", "d", "e"],
                        help="run only these (ratios need a; (c)/(d) needs both)")
    parser.add_argument("--vllm-threads-bind", metavar="CPUS",
                        help="(c) VLLM_CPU_OMP_THREADS_BIND, e.g. auto for vLLM's own binding (it leaves one CPU to "
                             "its scheduler); default: as the build binds them")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="(c) compiled instead of eager: cold compile cache in run 1, warm after")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.dtype = args.dtype[0]
        return child(args)
    for dtype in args.dtype:
        measure(argparse.Namespace(**{**vars(args), "dtype": dtype}))


def measure(args) -> None:
    """Ceiling, runs and medians for one dtype."""
    print(f"{args.prompts} prompts, max {args.max_new_tokens} new tokens, {args.dtype}, model {args.model}")
    limit = spawn(args, "ceiling")
    print(f"ceiling: {limit['matmul_gflops']:.1f} GFLOP/s matmul (F.linear, batch {args.batch_size})"
          f" / {limit['flops_per_token'] / 1e6:.0f} MFLOP per token = {limit['ceiling_tokens_per_s']:.0f} tokens/s")
    runs = {w: [] for w in (args.only or ("a", "b", "c"))}  # in the order given
    compile_cache = {"VLLM_CACHE_ROOT": tempfile.mkdtemp(prefix="vllm-cache-")}  # empty for run 1: a cold start
    if args.vllm_threads_bind:
        compile_cache["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_threads_bind
    for run in range(args.runs):
        for which in runs:
            r = spawn(args, which, compile_cache if which in "cde" else None)
            runs[which].append(r)
            rate = r["generated_tokens"] / r["seconds"]
            start = ""
            if "startup_seconds" in r:
                kind = "compiled, " + ("cold" if run == 0 else "warm") + " cache" if args.vllm_compile else "eager"
                start = f"; engine start-up {r['startup_seconds']:.0f} s ({kind}), not included"
            print(f"run {run + 1} ({which}): {r['pairs']} pairs in {r['seconds']:.0f} s = {r['pairs'] / r['seconds']:.3f} "
                  f"pairs/s, {r['useful_tokens'] / r['seconds']:.1f} useful tok/s, {r['generated_tokens']} tokens generated "
                  f"({rate:.0f} tok/s, {100 * rate / limit['ceiling_tokens_per_s']:.0f}% of ceiling), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB{start}", flush=True)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    pps = {w: statistics.median(r["pairs"] / r["seconds"] for r in rs) for w, rs in runs.items()}
    print("median pairs/s: " + ", ".join(f"({w}) {v:.3f}" for w, v in pps.items()), flush=True)
    for w in ("b", "c"):
        if "a" in pps and w in pps:
            print(f"ratio ({w})/(a): pairs/s {pps[w] / pps['a']:.2f}, "
                  f"peak RSS {med[w]['peak_rss_mb'] / med['a']['peak_rss_mb']:.2f}", flush=True)
    if "c" in pps and "d" in pps:
        print(f"ratio (c)/(d), the watcher's cost: pairs/s {pps['c'] / pps['d']:.3f}", flush=True)
    if "c" in pps and "e" in pps:
        print(f"ratio (e)/(c), served over in-process: pairs/s {pps['e'] / pps['c']:.2f}; client peak RSS "
              f"{med['e']['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
