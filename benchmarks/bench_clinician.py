"""The clinician's path, end to end, for this code and (optionally) the code before, in one run.

Issue 15's figures, each measured as a user meets them (a fresh process, the shipped default
model, real RSNA DICOMs from ``../shared/data``):

* ``one``: ``pneumoloc predict ONE.dcm --out DIR`` wall time, interpreter start-up included
  (median of ``--runs``);
* ``folder``: ``pneumoloc predict FOLDER`` on ``--n`` DICOMs, with and without overlays:
  images/s over the command's wall time (start-up included) and over the run itself (the
  "in X s" the command reports: model loading included, interpreter start-up and imports not);
* ``serve``: ``pneumoloc serve`` on loopback, ``--clients`` threads posting real DICOMs
  (round robin over the folder) until ``--requests`` are answered: predictions/s, p50/p95;
* ``evaluate``: ``pneumoloc evaluate default --data RSNA --split all`` (every labelled DICOM of
  the sample, report included) with a warm cache (a first call prepares it and is not timed).

Each measurement runs the code under ``src`` and, with ``--old-src DIR``, the code in ``DIR``
(e.g. ``git archive COMMIT src | tar -x -C /tmp/old``) right after it, in a child process with
``PYTHONPATH`` set, the same interpreter and packages, so background load hits both alike.
``--prev-src DIR`` adds a third code the same way (e.g. the previous commit of a change). The
folder runs of this code are also measured with ``--parallel threads`` (``folder_*_threads``),
so that worker processes and threads are compared in the same run.
Results go to ``--json`` as they are measured, and a markdown table is printed at the end.

Usage::

    git archive cefb646 src | tar -x -C /tmp/old15
    PYTHONPATH=src .venv/bin/python benchmarks/bench_clinician.py --old-src /tmp/old15/src \\
        --json docs/results/clinician-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RSNA = ROOT.parent / "shared" / "data" / "rsna-pneumonia-sample"
HOST = "127.0.0.1"


def _env(src: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env["PNEUMOLOC_CACHE_DIR"] = str(cache)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout + proc.stderr


def _reported_seconds(text: str) -> float | None:
    found = re.findall(r"in ([0-9.]+) s \(", text)
    return float(found[-1]) if found else None


def bench_one(src: Path, cache: Path, dicom: Path, runs: int) -> dict[str, Any]:
    env = _env(src, cache)
    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = Path(tmp) / f"o{i}"
            wall, _ = _run(
                [
                    sys.executable,
                    "-m",
                    "pneumoloc",
                    "predict",
                    str(dicom),
                    "--out",
                    str(out),
                    "--quiet",
                ],
                env,
            )
            walls.append(wall)
        record = json.loads(next(Path(tmp, "o0").glob("*.json")).read_text())
    return {
        "wall_s_median": statistics.median(walls),
        "wall_s_all": walls,
        "backend": record.get("backend"),
        "probability": record.get("probability"),
    }


def bench_folder(
    src: Path, cache: Path, folder: Path, n: int, overlays: bool, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    env = _env(src, cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "pneumoloc", "predict", str(folder), "--out", str(out)]
        cmd += ["--quiet", *extra] + ([] if overlays else ["--no-overlay"])
        wall, text = _run(cmd, env)
        run_s = _reported_seconds(text)
        probs = {}
        for path in out.glob("*.json"):
            rec = json.loads(path.read_text())
            probs[rec.get("source")] = rec.get("probability")
    return {
        "n": n,
        "overlays": overlays,
        "wall_s": wall,
        "images_per_s_wall": n / wall,
        "run_s": run_s,
        "images_per_s_run": n / run_s if run_s else None,
        "probabilities": probs,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def bench_serve(
    src: Path, cache: Path, files: list[Path], clients: int, requests: int
) -> dict[str, Any]:
    import httpx

    env = _env(src, cache)
    port = _free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = (Path(tmp) / "serve.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pneumoloc", "serve", "--host", HOST, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        "serve exited: " + (Path(tmp) / "serve.log").read_text()[-2000:]
                    )
                try:
                    if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("serve did not start")
                time.sleep(0.2)
            payloads = [(f.name, f.read_bytes()) for f in files]
            for name, data in payloads[:2]:  # warm-up
                httpx.post(
                    url + "/api/predict",
                    files={"file": (name, data, "application/dicom")},
                    timeout=120,
                ).raise_for_status()
            latencies: list[float] = []
            errors: list[int] = []
            lock = threading.Lock()
            counter = [0]

            def client() -> None:
                with httpx.Client(base_url=url, timeout=120) as c:
                    while True:
                        with lock:
                            i = counter[0]
                            counter[0] += 1
                        if i >= requests:
                            return
                        name, data = payloads[i % len(payloads)]
                        t = time.perf_counter()
                        r = c.post(
                            "/api/predict", files={"file": (name, data, "application/dicom")}
                        )
                        dt = time.perf_counter() - t
                        with lock:
                            latencies.append(dt)
                            if r.status_code not in (200, 422):
                                errors.append(r.status_code)

            started = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total = time.perf_counter() - started
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "predictions_per_s": requests / total,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "errors": errors,
    }


def bench_evaluate(src: Path, cache: Path, rsna: Path) -> dict[str, Any]:
    env = _env(src, cache)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pneumoloc", "evaluate", "default", "--data", str(rsna)]
        cmd += ["--split", "all", "--quiet"]
        _run([*cmd, "--out", str(Path(tmp) / "warm")], env)  # prepares the cache
        wall, _ = _run([*cmd, "--out", str(Path(tmp) / "eval")], env)
        metrics = json.loads((Path(tmp) / "eval" / "metrics.json").read_text())
        n = int(
            metrics.get("provenance", {}).get("n_images") or metrics["classification"].get("n") or 0
        )
        report = (Path(tmp) / "eval" / "report" / "index.html").is_file()
    return {
        "wall_s": wall,
        "n_images": n,
        "images_per_s": n / wall if n else None,
        "report_written": report,
        "auroc": metrics["classification"].get("auroc"),
    }


_INT8_SCRIPT = r"""
import json, sys, time
import numpy as np
from pneumoloc.data.cache import resolve_cache
from pneumoloc.inference.onnx_backend import OnnxPredictor
from pneumoloc.quantize import quantize_onnx
rsna, out = sys.argv[1], sys.argv[2]
fp32_path = "src/pneumoloc/weights/default.onnx"
fp32 = OnnxPredictor.from_onnx(fp32_path, threads=1, lung_mask=False, refine=None, batch_size=8)
cache = resolve_cache(rsna, size=fp32.image_size, progress=False)
q = quantize_onnx(fp32_path, out, cache.root)
int8 = OnnxPredictor.from_onnx(out, threads=1, lung_mask=False, refine=None, batch_size=8)
images = np.asarray(cache.images[:])
test = np.sort(cache.split.part("test"))
res = {"n_images": len(images), "n_test": len(test), "quantize": q.__dict__ | {"path": str(q.path)}}
for name, pred in (("fp32", fp32), ("int8", int8)):
    pred.network(images[:8])
    t = time.perf_counter()
    probs = pred.network(images)[0]
    res[name + "_ms_per_image_1_thread"] = 1000 * (time.perf_counter() - t) / len(images)
    res[name + "_probs"] = probs
p8, p32 = res.pop("int8_probs"), res.pop("fp32_probs")
d = np.abs(p8 - p32)
res["decisions_changed_all"] = int(((p8 >= fp32.threshold) != (p32 >= fp32.threshold)).sum())
res["max_abs_diff_probability_all"] = float(d.max())
res["mean_abs_diff_probability_all"] = float(d.mean())
res["max_abs_diff_probability_test"] = float(d[test].max())
res["speedup"] = res["fp32_ms_per_image_1_thread"] / res["int8_ms_per_image_1_thread"]
print(json.dumps(res))
"""


def bench_int8(src: Path, cache: Path, rsna: Path) -> dict[str, Any]:
    env = _env(src, cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "default.int8.onnx")
        cmd = [sys.executable, "-c", _INT8_SCRIPT, str(rsna), out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old-src", type=Path, default=None, help="src folder of the code before")
    parser.add_argument("--prev-src", type=Path, default=None, help="src folder of a third code")
    parser.add_argument("--rsna", type=Path, default=RSNA)
    parser.add_argument("--n", type=int, default=200, help="DICOMs in the folder run")
    parser.add_argument("--runs", type=int, default=5, help="runs of the one-file predict")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--only", default="one,folder,serve,evaluate,int8")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    images = sorted((args.rsna / "stage_2_train_images").glob("*.dcm"))
    if len(images) < args.n:
        raise SystemExit(f"{args.rsna}: fewer than {args.n} DICOMs")
    codes = {"new": ROOT / "src"}
    if args.prev_src is not None:
        codes["prev"] = args.prev_src.resolve()
    if args.old_src is not None:
        codes["old"] = args.old_src.resolve()
    only = set(args.only.split(","))
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_average_start": os.getloadavg()[0],
        "command": " ".join(sys.argv),
        "codes": {k: str(v) for k, v in codes.items()},
    }

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        for path in images[: args.n]:
            shutil.copy(path, folder / path.name)  # a plain folder (the data stays read-only)
        caches = {k: Path(tmp) / f"cache-{k}" for k in codes}
        threads = ("--parallel", "threads")
        steps = [
            ("one", lambda s, c: bench_one(s, c, images[0], args.runs)),
            ("folder_overlays", lambda s, c: bench_folder(s, c, folder, args.n, True)),
            ("folder_no_overlays", lambda s, c: bench_folder(s, c, folder, args.n, False)),
            (
                "folder_overlays_threads",
                lambda s, c: bench_folder(s, c, folder, args.n, True, threads),
            ),
            (
                "folder_no_overlays_threads",
                lambda s, c: bench_folder(s, c, folder, args.n, False, threads),
            ),
            ("serve", lambda s, c: bench_serve(s, c, images[:50], args.clients, args.requests)),
            ("evaluate", lambda s, c: bench_evaluate(s, c, args.rsna)),
            ("int8", lambda s, c: bench_int8(s, c, args.rsna)),
        ]
        for name, fn in steps:
            if name.split("_")[0] not in only:
                continue
            for code, src in codes.items():
                if (name == "int8" or name.endswith("_threads")) and code != "new":
                    continue  # no int8 option, nor --parallel, before
                print(f"{name} [{code}] ...", file=sys.stderr, flush=True)
                try:
                    results.setdefault(name, {})[code] = fn(src, caches[code])
                except Exception as exc:  # one failed measurement must not lose the others
                    results.setdefault(name, {})[code] = {
                        "error": f"{type(exc).__name__}: {exc}"[:3000]
                    }
                results.setdefault(name, {})[code]["load_average"] = os.getloadavg()[0]
                save()
    print(json.dumps({k: v for k, v in results.items()}, indent=1, default=str)[:20000])


if __name__ == "__main__":
    main()
