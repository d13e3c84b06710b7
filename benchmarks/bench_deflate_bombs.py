"""``pneumoloc serve`` under deflate bombs: resident memory, refusals, and a real answer after.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_deflate_bombs.py
    PYTHONPATH=src .venv/bin/python benchmarks/bench_deflate_bombs.py --old-src /tmp/old14a/src

Starts ``python -m pneumoloc serve`` (a real uvicorn process, the shipped default model, CPU)
on 127.0.0.1, uploads one real RSNA DICOM (the reference answer), then ``--rounds`` rounds of
``--concurrent`` simultaneous uploads of a deflated DICOM of about 1 MB that inflates to 1 GiB
(``tests/fuzzing.py``: 1024 x 1024 x 8 bits declared, a 1 GiB pixel data element of zeros),
then the real DICOM again, whose answer must equal the reference. The server's resident
memory is read from ``/proc/PID/status`` (``VmRSS`` sampled every 20 ms, and the kernel's
peak ``VmHWM``). With ``--old-src`` the same run is repeated on another checkout's ``src``
(the code before issue 14, say), one server after the other; a server whose resident memory
passes ``--kill-above-mib`` is killed and reported as such.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzing  # tests/fuzzing.py: the bombs of the fuzz test

HOST = "127.0.0.1"
TARGET_MIB = 1.6 * 1024  # issue 14: under 1.6 GB resident


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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


class _Sampler(threading.Thread):
    """Samples the server's VmRSS; kills it above ``kill_above`` MiB."""

    def __init__(self, proc: subprocess.Popen[bytes], kill_above: float) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.kill_above = kill_above
        self.peak = 0.0
        self.killed = False
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.proc.poll() is None:
            try:
                rss = _status_kib(self.proc.pid, "VmRSS") / 1024
            except (OSError, RuntimeError):
                return
            self.peak = max(self.peak, rss)
            if rss > self.kill_above:
                self.killed = True
                self.proc.kill()
                return
            time.sleep(0.02)


def _predict(url: str, name: str, data: bytes) -> httpx.Response:
    files = {"file": (name, data, "application/dicom")}
    return httpx.post(url + "/api/predict", files=files, timeout=600)


def run_server(src: Path | None, args: argparse.Namespace, dicom: Path, bomb: bytes) -> dict:
    """One server's run (``src``: the checkout's ``src`` to import pneumoloc from)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    port = _free_port()
    url = f"http://{HOST}:{port}"
    real = dicom.read_bytes()
    out: dict[str, Any] = {"code": str(src) if src else "this checkout"}
    with tempfile.TemporaryDirectory(prefix="pneumoloc-bench-bombs-") as tmp:
        log_path = Path(tmp) / "server.log"
        command = [sys.executable, "-m", "pneumoloc", "serve", "--model", args.model]
        command += ["--host", HOST, "--port", str(port), "--device", "cpu"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = _Sampler(proc, args.kill_above_mib)
        try:
            _wait_healthy(url, proc, timeout=180)
            out["rss_idle"] = _status_kib(proc.pid, "VmRSS") / 1024
            reference = _predict(url, dicom.name, real)
            out["reference_status"] = reference.status_code
            reference_body = reference.json()
            out["reference_probability"] = reference_body.get("probability")
            out["rss_warm"] = _status_kib(proc.pid, "VmRSS") / 1024
            sampler.start()
            statuses: collections.Counter[str] = collections.Counter()
            lock = threading.Lock()

            def upload() -> None:
                try:
                    r = _predict(url, "bomb.dcm", bomb)
                    outcome = f"{r.status_code} {r.json().get('error', '')}".strip()
                except (httpx.HTTPError, ValueError) as exc:
                    outcome = f"no answer ({type(exc).__name__})"
                with lock:
                    statuses[outcome] += 1

            started = time.perf_counter()
            for _ in range(args.rounds):
                if proc.poll() is not None:
                    break
                threads = [threading.Thread(target=upload) for _ in range(args.concurrent)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            out["bomb_seconds"] = time.perf_counter() - started
            out["statuses"] = dict(statuses)
            time.sleep(1.0)
            alive = proc.poll() is None
            out["rss_after"] = _status_kib(proc.pid, "VmRSS") / 1024 if alive else None
            out["vm_hwm"] = _status_kib(proc.pid, "VmHWM") / 1024 if alive else None
            if alive:
                again = _predict(url, dicom.name, real)
                body = again.json()
                keys = ("probability", "decision", "boxes")
                out["after_status"] = again.status_code
                out["same_answer"] = again.status_code == reference.status_code and all(
                    body.get(k) == reference_body.get(k) for k in keys
                )
                out["probability"] = body.get("probability")
            else:
                out["after_status"], out["same_answer"] = None, False
        finally:
            sampler.stop.set()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        out["sampled_peak"] = sampler.peak
        out["killed"] = sampler.killed
    return out


def _row(r: dict, args: argparse.Namespace) -> str:
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    peak = max(v for v in (r.get("vm_hwm"), r["sampled_peak"]) if v is not None)
    peak_text = f"> {args.kill_above_mib:.0f} (killed)" if r["killed"] else mib(peak)
    statuses = ", ".join(f"{n} x {s}" for s, n in sorted(r["statuses"].items()))
    verdict = "yes" if not r["killed"] and peak < TARGET_MIB else "no"
    return (
        f"| {r['code']} | {mib(r['rss_idle'])} | {mib(r['rss_warm'])} | {peak_text} | "
        f"{mib(r['rss_after'])} | {verdict} | {statuses} | {r['bomb_seconds']:.1f} | "
        f"{'yes' if r['same_answer'] else 'no'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--inflated-mib", type=int, default=1024)
    parser.add_argument("--dicom", type=Path, default=None, help="default: first RSNA file")
    parser.add_argument("--old-src", type=Path, default=None, help="also run this src folder")
    parser.add_argument("--kill-above-mib", type=float, default=10_000.0)
    args = parser.parse_args()

    dicom = args.dicom or sorted(fuzzing.RSNA_IMAGES.glob("*.dcm"))[0]
    bomb = fuzzing.deflate_bomb(args.inflated_mib << 20, 1024, 1024)
    results = [run_server(None, args, dicom, bomb)]
    if args.old_src is not None:
        results.append(run_server(args.old_src, args, dicom, bomb))

    print(
        f"machine: {platform.platform()}; {os.cpu_count()} cores; "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        f"python {platform.python_version()}"
    )
    print(f"command: python benchmarks/bench_deflate_bombs.py {' '.join(sys.argv[1:])}")
    print(
        f"bomb: {len(bomb):,} bytes inflating to {args.inflated_mib} MiB; {args.rounds} rounds "
        f"of {args.concurrent} concurrent uploads; real DICOM: {dicom.name[:8]}... "
        f"({len(dicom.read_bytes()) / 1024:.0f} KiB)\n"
    )
    print(
        "| code | RSS idle MiB | after warm-up | peak during bombs | after bombs | "
        "under 1.6 GB | bomb answers | bomb seconds | same real answer after |"
    )
    print("|---|---:|---:|---:|---:|---|---|---:|---|")
    for r in results:
        print(_row(r, args))
    print()
    for r in results:
        print(
            f"{r['code']}: real DICOM before the bombs: {r['reference_status']}, p = "
            f"{r['reference_probability']}; after: {r['after_status']}, p = {r.get('probability')}"
        )


if __name__ == "__main__":
    main()
