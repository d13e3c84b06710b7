"""Bounded load test of ``pneumoloc serve`` on loopback.

Usage:
    python benchmarks/bench_serve.py            # resnet18, 256 px, 8 clients, 200 requests
    python benchmarks/bench_serve.py --images   # as the page asks (?images=1)
    python benchmarks/bench_serve.py --requests 50 --clients 4

Saves a resnet18 checkpoint with random (seeded) weights at ``--size`` px into a temporary
folder (the cost of a request does not depend on what the weights learnt), starts
``python -m pneumoloc serve`` on 127.0.0.1 on a free port as a child process, and has
``--clients`` threads upload one real RSNA DICOM (1024 x 1024, JPEG Baseline) until
``--requests`` requests are done or ``--max-seconds`` have passed. Reports requests/s,
p50/p95/max latency, the server's resident memory (idle after start, after one warm-up
request, after the load) and the load average, as a markdown table. Only loopback addresses are
used; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from pneumoloc.models import build_model
from pneumoloc.models.checkpoint import save_checkpoint

RSNA_IMAGES = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "rsna-pneumonia-sample"
    / "stage_2_train_images"
)
HOST = "127.0.0.1"


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (psutil when installed, else /proc/PID/status)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"cannot read the memory of process {pid}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop the load after")
    parser.add_argument("--images", action="store_true", help="ask for display images too")
    parser.add_argument("--dicom", type=Path, default=None, help="default: first RSNA file")
    args = parser.parse_args()

    dicom = args.dicom or sorted(RSNA_IMAGES.glob("*.dcm"))[0]
    data = dicom.read_bytes()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pneumoloc-bench-serve-") as tmp:
        torch.manual_seed(0)
        model = build_model(args.model)
        ckpt = Path(tmp) / "random.pt"
        save_checkpoint(
            ckpt,
            {
                "model": model.spec,
                "state_dict": model.state_dict(),
                "image_size": args.size,
                "threshold": 0.5,
            },
        )
        del model
        port = _free_port()
        url = f"http://{HOST}:{port}"
        log = (Path(tmp) / "server.log").open("wb")
        command = [sys.executable, "-m", "pneumoloc", "serve", "--model", str(ckpt)]
        command += ["--host", HOST, "--port", str(port), "--device", "cpu"]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, proc, timeout=120)
            rss_idle = _rss_mib(proc.pid)
            query = "?images=1" if args.images else ""
            files = {"file": (dicom.name, data, "application/dicom")}
            warm = httpx.post(url + "/api/predict" + query, files=files, timeout=120)
            warm.raise_for_status()
            rss_warm = _rss_mib(proc.pid)

            latencies: list[float] = []
            failures: list[int] = []
            lock = threading.Lock()
            issued = [0]
            deadline = time.monotonic() + args.max_seconds

            def client() -> None:
                with httpx.Client(base_url=url, timeout=120) as c:
                    while time.monotonic() < deadline:
                        with lock:
                            if issued[0] >= args.requests:
                                return
                            issued[0] += 1
                        started = time.perf_counter()
                        r = c.post("/api/predict" + query, files=files)
                        elapsed = time.perf_counter() - started
                        with lock:
                            if r.status_code == 200:
                                latencies.append(elapsed)
                            else:
                                failures.append(r.status_code)

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            rss_after = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    load_after = os.getloadavg()

    done = len(latencies)
    print(
        f"machine: {platform.platform()}; {os.cpu_count()} cores; torch {torch.__version__} "
        f"(CPU); python {platform.python_version()}"
    )
    print(
        f"command: python benchmarks/bench_serve.py --model {args.model} --size {args.size} "
        f"--clients {args.clients} --requests {args.requests}"
        + (" --images" if args.images else "")
    )
    print(
        f"{args.model} with random (seeded) weights at {args.size} px; upload: {dicom.name[:8]}... "
        f"({len(data) / 1024:.0f} KiB, 1024 x 1024 JPEG Baseline DICOM); "
        f"images in the answer: {'yes' if args.images else 'no'}\n"
    )
    print("| clients | requests ok | failed | wall s | requests/s | p50 ms | p95 ms | max ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    if done:
        print(
            f"| {args.clients} | {done} | {len(failures)} | {wall:.1f} | {done / wall:.2f} "
            f"| {statistics.median(latencies) * 1000:.0f} "
            f"| {_percentile(latencies, 0.95) * 1000:.0f} | {max(latencies) * 1000:.0f} |"
        )
    else:
        print(f"| {args.clients} | 0 | {len(failures)} | {wall:.1f} | 0 | - | - | - |")
    print()
    print("| server RSS idle MiB | after warm-up MiB | after load MiB |")
    print("|---:|---:|---:|")
    print(f"| {rss_idle:.0f} | {rss_warm:.0f} | {rss_after:.0f} |")
    print()
    print(
        "load average (1/5/15 min) before: "
        + "/".join(f"{v:.2f}" for v in load_before)
        + "; after: "
        + "/".join(f"{v:.2f}" for v in load_after)
    )
    if failures:
        print(f"failed statuses: {sorted(set(failures))}")


if __name__ == "__main__":
    main()
