"""Convert a random-weight checkpoint at cBottle's released coarse size; report time and memory.

Builds the checkpoint by inverting the key mapping (cBottle's zip format, 68,361,901
parameters, ~273 MB), then converts it in a fresh subprocess and reports wall time and
the subprocess's peak resident memory (Linux VmHWM, reset after the imports), so the
conversion's own footprint above the interpreter and its libraries can be read off.

    python benchmarks/convert_full_size.py [--workdir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, json
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
t0 = time.perf_counter()
import jaxguide.model.convert as convert, jaxguide.model.checkpoint  # imports: torch, jax, orbax
import orbax.checkpoint, torch
t1 = time.perf_counter()
rss_before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (Linux)
    f.write("5")
if sys.argv[1] == "convert":
    convert.convert_checkpoints([sys.argv[2]], sys.argv[3], overwrite=True)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "rss_before_bytes": rss_before,
                  "peak_rss_bytes": status("VmHWM:")}))
"""


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="jaxguide-fullsize-"))
    work.mkdir(parents=True, exist_ok=True)

    from jaxguide.model.convert import write_cbottle_checkpoint
    from jaxguide.model.config import BatchInfo, ModelConfig
    from jaxguide.model.checkpoint import count_params, init_params

    config = ModelConfig(model_channels=128, label_dim=1024, out_channels=45, condition_channels=1)
    channels = tuple(f"ch{i}" for i in range(45))
    info = BatchInfo(channels=channels, center=(0.0,) * 45, scales=(1.0,) * 45)
    ckpt = work / "released_size_random.checkpoint"
    t = time.perf_counter()
    write_cbottle_checkpoint(ckpt, config, info, init_params(config, seed=0))
    build_s = time.perf_counter() - t
    size = ckpt.stat().st_size

    conv = run_child("convert", str(ckpt), str(work / "converted"))
    result = {
        "parameters": count_params(config),
        "checkpoint_bytes": size,
        "build_checkpoint_s": build_s,
        "convert_s": conv["work_s"],
        "peak_rss_convert_bytes": conv["peak_rss_bytes"],
        "rss_after_imports_bytes": conv["rss_before_bytes"],
        "peak_rss_over_checkpoint": conv["peak_rss_bytes"] / size,
        "conversion_rss_over_checkpoint": (conv["peak_rss_bytes"] - conv["rss_before_bytes"]) / size,
    }
    print(f"parameters                      {result['parameters']:,}")
    print(f"checkpoint size                 {size / 2**20:.1f} MiB")
    print(f"conversion time                 {result['convert_s']:.1f} s (imports excluded)")
    print(f"peak RSS of converting process  {conv['peak_rss_bytes'] / 2**20:.0f} MiB = {result['peak_rss_over_checkpoint']:.2f} x checkpoint")
    print(f"  resident after imports        {conv['rss_before_bytes'] / 2**20:.0f} MiB")
    print(f"  conversion above that         {result['conversion_rss_over_checkpoint']:.2f} x checkpoint")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
