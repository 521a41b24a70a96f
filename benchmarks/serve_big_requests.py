"""What oversized requests cost a running server: `flora serve` (a subprocess, the real model) streams
one long completion while other clients send a prompt of 1 MB (under ``--max-request-bytes``, more
than the context can hold: 400 without being tokenized), 10 MB and 50 MB (over it: 413 unread).

Written: each big request's status and seconds to its answer; the streaming request's largest gap
between two chunks while they were answered and over its whole run (a server that stalls shows it
here); the server's resident memory (``/proc/PID/status`` VmRSS) before (after a warm-up that is the
stream's own request, whose cache columns are then counted in) and after. Usage:

    python benchmarks/serve_big_requests.py --json benchmarks/results/serve_big_requests.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import httpx
from harness import write_json
from serve_servers import REPO, Server, ServerSpec

SIZES_MB = (1, 10, 50)


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    command = (sys.executable, "-m", "flora", "serve", "--model", args.model, "--port", "{port}", "--host", "127.0.0.1")
    server = Server(ServerSpec("flora", command), REPO / "runs" / "serve_big_requests.log")
    with server as url:
        pid = server.process.pid
        stream_body = {"model": args.model, "prompt": "Tell me a long story.", "max_tokens": args.stream_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        # the warm-up is the stream's own request, so that what it allocates (its cache's columns) is in `before`
        httpx.post(f"{url}/v1/completions", json=stream_body | {"stream": False}, timeout=600).raise_for_status()
        before = resident_mb(pid)
        chunk_times: list[float] = []

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=stream_body, timeout=600) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        chunk_times.append(time.perf_counter())

        streamer = threading.Thread(target=stream)
        streamer.start()
        while len(chunk_times) < 5:
            time.sleep(0.01)
        big = []
        for megabytes in SIZES_MB:
            prompt = "a " * (megabytes * 10**6 // 2)
            body = json.dumps({"model": args.model, "prompt": prompt, "max_tokens": 8}).encode()
            start = time.perf_counter()
            response = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"},
                                  timeout=120)  # fmt: skip
            end = time.perf_counter()
            big.append({"megabytes": megabytes, "body_bytes": len(body), "status": response.status_code,
                        "seconds": round(end - start, 3), "start": start, "end": end,
                        "message": response.json()["error"]["message"][:200]})  # fmt: skip
            del body, prompt
        streamer.join()
        time.sleep(1.0)
        after = resident_mb(pid)
    window = (big[0]["start"], big[-1]["end"])
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    during = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False) if b >= window[0] and a <= window[1]]
    result = {
        "benchmark": "serve_big_requests", "model": args.model, "platform": platform.platform(),
        "requests": [{k: v for k, v in b.items() if k not in ("start", "end")} for b in big],
        "stream_chunks": len(chunk_times), "stream_max_gap_s_during": round(max(during, default=0.0), 3),
        "stream_max_gap_s": round(max(gaps), 3), "resident_mb_before": round(before, 1),
        "resident_mb_after": round(after, 1), "resident_mb_change": round(after - before, 1),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
