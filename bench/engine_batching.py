"""The in-process model engine with N chat requests at once: batched vs one at a time.

    python bench/engine_batching.py                       # tiny and smollm2, 8 requests of 64 tokens
    python bench/engine_batching.py --models tiny --requests 16 --max-tokens 128
    python bench/engine_batching.py --stagger 0.05        # the requests arrive 50 ms apart
    python bench/engine_batching.py --threads 1           # a CPU shared with other work

For each model (loaded with trainer.models.load_model; one that does not load offline is
reported as skipped), --requests chat prompts of different lengths arrive together (or
--stagger seconds apart) at annotate.model_engine.Engine, each read by its own thread as a
serve-model request would read it:

    batched     Engine(concurrency=N): one decode thread batches them all
    sequential  Engine(concurrency=1): one at a time; a request that finds the engine busy
                retries every 5 ms (serve-model answers it 503 with Retry-After)

and measures the aggregate tokens/s (all new tokens / wall time from the first arrival to
the last answer) and the time to first token per request (its arrival to its first text
piece: waiting included), p50 and p99. Greedy decoding by default (--temperature),
and no stop strings, so pieces are not held back. One warm-up request per engine first.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = [
    "bananas",
    "the history of the printing press and how it changed the way people shared ideas",
    "why the sky is blue",
    "a good way to learn a new language as an adult with little free time, step by step",
    "tides",
    "how a refrigerator keeps food cold, explained for a curious ten-year-old",
    "volcanoes",
    "the difference between weather and climate, with an example from your own town",
]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_once(engine, ids: list[list[int]], args) -> dict:
    from annotate.model_engine import Busy

    ttft: list[float | None] = [None] * len(ids)
    tokens = [0] * len(ids)
    t0 = time.perf_counter()

    def client(k: int) -> None:
        arrive = t0 + k * args.stagger
        time.sleep(max(0.0, arrive - time.perf_counter()))
        while True:
            try:
                job = engine.start(
                    ids[k],
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                    top_p=1.0,
                    seed=k,
                    stop=[],
                )
                break
            except Busy:
                time.sleep(0.005)
        for _ in job.pieces():
            if ttft[k] is None:
                ttft[k] = time.perf_counter() - arrive
        tokens[k] = job.completion_tokens

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    firsts = [x for x in ttft if x is not None]
    return {
        "wall_s": round(wall, 3),
        "new_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "ttft_p50_s": round(percentile(firsts, 0.5), 4) if firsts else None,
        "ttft_p99_s": round(percentile(firsts, 0.99), 4) if firsts else None,
    }


def bench_model(name: str, args) -> dict:
    from annotate.model_engine import Engine
    from trainer import models

    try:
        model, tokenizer = models.load_model(name, device=args.device)
    except Exception as e:  # e.g. not in the cache and offline
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    out = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
    for mode, concurrency in (("batched", args.requests), ("sequential", 1)):
        engine = Engine(model, tokenizer, max_new_tokens=args.max_tokens, concurrency=concurrency)
        ids = [engine.prompt_ids(p) for p in prompts(args.requests)]
        warm = engine.start(ids[0], max_tokens=4, temperature=0, top_p=1.0, seed=0, stop=[])
        "".join(warm.pieces())
        out[mode] = run_once(engine, ids, args)
        if mode == "batched":
            out[mode]["largest_batch"] = engine.decoder.largest_batch
        engine.closing.set()
        print(name, mode, out[mode], flush=True)
    out["prompt_tokens"] = [len(i) for i in ids]
    seq, bat = out["sequential"]["tokens_per_s"], out["batched"]["tokens_per_s"]
    out["speedup"] = round(bat / seq, 2) if seq else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=["tiny", "smollm2"], help="models to load (default: tiny smollm2)"
    )
    p.add_argument(
        "--requests", type=int, default=8, help="concurrent requests, and the batch's size (default 8)"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument(
        "--stagger", type=float, default=0.0, help="seconds between arrivals (default 0: together)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if there, else cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own). On a CPU shared with other work, 1 avoids "
        "OpenMP threads spinning against each other, which slows batched matmuls far more than single rows",
    )
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    results = {name: bench_model(name, args) for name in args.models}
    summary = {
        "bench": "engine_batching",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stagger_s": args.stagger,
        "torch_threads": torch.get_num_threads(),
        "models": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
