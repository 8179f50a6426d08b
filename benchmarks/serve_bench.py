#!/usr/bin/env python
"""Throughput of the `serve` job under concurrent clients, against the same requests one at a time.

    python benchmarks/serve_bench.py                      # SmolLM2-135M shape, 32 requests x 32 tokens
    python benchmarks/serve_bench.py --preset tiny --requests 64

The real server (`launch/tpu_run.py --config serve_xinst`, a subprocess on loopback) serves a
random-init model of the preset's shape (throughput does not depend on the weights; an answer
ends at EOS or `--max-tokens`, and tokens/s counts what the server's `usage` reports). The same `--requests` completions (greedy,
prompts of 48-112 characters) are sent by 1, 4 and 16 concurrent clients through the `openai`
client; each level is warmed up once (compiles) and then timed. Printed per level: requests/s,
generated tokens/s and mean latency; the ratio of 16 clients to 1 client is what batching buys.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from machine import machine_summary  # noqa: E402


def random_model(preset: str, out: Path) -> Path:
    import jax

    from xinst_jax.config import model_preset
    from xinst_jax.convert.hf import export_hf
    from xinst_jax.model.llama import init_params

    cfg = model_preset(preset)
    export_hf(init_params(cfg, jax.random.PRNGKey(0)), cfg, out, dtype="float32")
    return out


def start_server(model_dir: Path, run_dir: Path, preset: str, slots: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"run_dir={run_dir}", f"generate.hf_dir={model_dir}", "generate.tokenizer=bytes", f"model.preset={preset}",
            f"serve.port={port}", "mesh.num_devices=1", "mesh.fsdp=1", f"generate.batch_size={slots}",
            "serve.batch_wait_ms=20"]
    args = [sys.executable, str(REPO / "launch" / "tpu_run.py"), "--config", "serve_xinst"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen(args, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited while starting")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if json.loads(r.read())["status"] == "ok":
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


def prompts(n: int) -> list[str]:
    words = "the river carries light across old stones while people talk about markets and rain".split()
    return [" ".join(words[(i * 3) % len(words):] + words[:(i * 3) % len(words)])[:48 + (i * 17) % 64]
            for i in range(n)]


def run_level(url: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(text: str) -> tuple[float, int]:
        start = time.perf_counter()
        r = client.completions.create(model="xinst", prompt=text, max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - start, r.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, texts))
    wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"clients": clients, "wall_s": wall, "requests_per_s": len(texts) / wall, "tokens_per_s": tokens / wall,
            "latency_s": statistics.mean(l for l, _ in results), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2_135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    print(f"machine: {machine_summary()}, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model(args.preset, Path(tmp) / "hf")
        proc, url = start_server(model_dir, Path(tmp) / "run", args.preset, slots=max(args.levels))
        try:
            texts = prompts(args.requests)
            rows = []
            for clients in args.levels:
                run_level(url, texts[:max(clients, 4)], clients, args.max_tokens)  # compiles this level's shapes
                rows.append(run_level(url, texts, clients, args.max_tokens))
                r = rows[-1]
                print(f"  {clients:2d} clients: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
                      f"mean latency {r['latency_s']:.2f} s", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    base = rows[0]
    print(f"\n{args.preset} (random init), {args.requests} requests x {args.max_tokens} tokens, greedy, "
          f"{max(args.levels)} engine slots")
    print("| clients | requests/s | tokens/s | mean latency s | vs 1 client |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_s']:.2f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
