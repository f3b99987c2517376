"""Loading a full-size checkpoint onto a GPU: seconds, host memory and GPU memory, the ways users load it.

Writes random full-size checkpoints in the official layout (`tools/make_checkpoint.py --int-mode direct
--copy-code`: the package files next to the weights, as on the Hub) into a temporary folder, reads each
file once so that the page cache is warm, then runs every case in a fresh process:

    raw          the floor: read every tensor of the file (torch.load with mmap, or safetensors) and copy
                 it to the device, nothing else: no model, no checks
    half_to      AutoModel.from_pretrained(dir, trust_remote_code=True).half().to(device)
                 (the original's README line, `.half().cuda()`)
    device_map   AutoModel.from_pretrained(dir, trust_remote_code=True, device_map=device)
                 (tensors go to the device as they are read)

Each reports the seconds until the model is on the device (synchronized; importing transformers and its
`modeling_utils`, which every model pays, is timed apart), the peak host RSS (VmHWM:
includes the file's mapped pages), the peak anonymous host memory (RssAnon, sampled every 2 ms: what
the process itself allocated), the device memory allocated / reserved at the peak (torch's allocator),
and, as a check that the model works, the seconds of a first 8-token greedy `generate` (it includes
compiling the GPU kernels in the first process of a cache).

    python3 benchmarks/bench_gpu_load.py --json $OUT/load.json          # INT8 .bin, INT8 .safetensors, INT4 .bin
    python3 benchmarks/bench_gpu_load.py --device cpu --preset tiny      # smoke test of the script itself
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _package  # noqa: E402  (repo root as package chatglm6b; the child-process helper)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = ("raw", "half_to", "device_map")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _AnonPeak(threading.Thread):
    """Samples RssAnon (the process's own allocations, not the file's mapped pages) every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb, self._halt = _status_kb("RssAnon"), threading.Event()

    def run(self):
        while not self._halt.wait(0.002):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
        return self.peak_kb


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _raw(folder: Path, device: str) -> int:
    import torch

    st = folder / "model.safetensors"
    n = 0
    if st.exists():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt", device="cpu") as f:
            kept = [f.get_tensor(k).to(device) for k in f.keys()]
    else:
        sd = torch.load(str(folder / "pytorch_model.bin"), map_location="cpu", mmap=True, weights_only=True)
        kept = [t.to(device) for t in sd.values()]
    for t in kept:
        n += t.numel() * t.element_size()
    return n


def child(case: str, folder: str, device: str) -> None:
    import torch

    folder = Path(folder)
    anon = _AnonPeak()
    anon.start()
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    base_dev = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    out = dict(case=case)
    if case != "raw":
        t0 = time.perf_counter()
        from transformers import AutoModel  # (not part of loading: every transformers model pays it,
        import transformers.modeling_utils  # noqa: F401   and PreTrainedModel's module is imported lazily)

        out["import_transformers_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    if case == "raw":
        out["bytes"] = _raw(folder, device)
        _sync(device)
        out["load_s"] = round(time.perf_counter() - t0, 3)
        model = None
    else:
        if case == "half_to":
            model = AutoModel.from_pretrained(str(folder), trust_remote_code=True).half().to(device)
        elif case == "device_map":
            model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, device_map=device)
        else:
            raise SystemExit(f"unknown case {case!r}")
        _sync(device)
        out["load_s"] = round(time.perf_counter() - t0, 3)
        where = {str(p.device) for p in model.parameters()}
        out["parameter_devices"] = sorted(where)
    out["peak_anon_gb"] = round(anon.stop() * 1024 / 1e9, 3)
    out["peak_rss_gb"] = round(_status_kb("VmHWM") * 1024 / 1e9, 3)
    if device.startswith("cuda"):
        out["device_peak_allocated_gib"] = round((torch.cuda.max_memory_allocated() - base_dev) / 2**30, 3)
        out["device_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        out["device_now_allocated_gib"] = round((torch.cuda.memory_allocated() - base_dev) / 2**30, 3)
    if model is not None:
        g = torch.Generator().manual_seed(0)
        ids = torch.cat([torch.randint(5, 130000, (1, 26), generator=g), torch.tensor([[130001, 130004]])], 1)
        ids = ids.to(device)
        t1 = time.perf_counter()
        new = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        _sync(device)
        out["first_generate_s"] = round(time.perf_counter() - t1, 3)
        out["generated"] = int(new.shape[1] - ids.shape[1])
    print("RESULT " + json.dumps(out), flush=True)


def run_case(case: str, folder: Path, device: str) -> dict:
    return _package.run_child([__file__, "--child", case, folder, "--device", device], what=case)


def make(folder: Path, preset: str, bits: int, fmt: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), str(folder), "--preset", preset,
                    "--bits", str(bits), "--format", fmt, "--int-mode", "direct", "--copy-code", "--quiet"],
                   check=True)
    return time.perf_counter() - t0


def warm_page_cache(folder: Path) -> float:
    t0 = time.perf_counter()
    for p in folder.iterdir():
        if p.suffix in (".bin", ".safetensors"):
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--preset", default="full", help="checkpoint sizes: full (default) or tiny")
    ap.add_argument("--checkpoints", default="8:bin,8:safetensors,4:bin",
                    help="BITS:FORMAT,... (default 8:bin,8:safetensors,4:bin)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each case, alternating (default 2)")
    ap.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.device)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu_load.py --device cuda needs an NVIDIA GPU (try --device cpu)")
    results = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   torch=torch.__version__, cpus=os.cpu_count(), preset=args.preset, runs={})
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for spec in args.checkpoints.split(","):
            bits, fmt = spec.split(":")
            folder = Path(tmp, f"int{bits}_{fmt}")
            made = make(folder, args.preset, int(bits), fmt)
            size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
            warm = warm_page_cache(folder)
            entry = dict(file_gb=round(size / 1e9, 3), made_s=round(made, 1), page_cache_read_s=round(warm, 2),
                         cases={c: [] for c in CASES})
            for _ in range(args.repeat):
                for case in CASES:
                    entry["cases"][case].append(run_case(case, folder, args.device))
                    print(json.dumps({spec: entry["cases"][case][-1]}), flush=True)
            results["runs"][spec] = entry
            for p in folder.iterdir():  # free the disk before the next checkpoint
                p.unlink()
            if args.json:  # after each checkpoint: a run stopped at its time limit keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
