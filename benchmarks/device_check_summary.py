"""device_check.sh's table: the rows of its benchmarks' JSON files in one JSON.

    python benchmarks/device_check_summary.py OUT_DIR

reads OUT_DIR/first_run.json, perf.json and video.json (or their ``.partial`` files when a
step ran out of time), writes OUT_DIR/device_check.json and prints the table. Every row
of :data:`ROWS` (or of ``--rows``, the smoke path's subset) is reported; one without a
number is listed under ``missing`` and the exit status is 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = ("cli_cold", "cli_warm", "unguided", "regression", "mmps1", "mmps3", "vmap8", "bf16", "memory_unguided",
        "memory_dps", "memory_dps_remat", "video_unguided")
MIB = 2**20


def _load(out: Path, name: str) -> dict:
    for path in (out / f"{name}.json", out / f"{name}.json.partial"):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def _timing(res: dict, name: str, base: float | None = None) -> dict | None:
    t = res.get("timings", {}).get(name)
    if t is None:
        return None
    row = {"time_s": t["best_s"], "compile_s": t["compile_s"], "n_compiles": t["n_compiles"]}
    if base:
        row["x_unguided"] = t["best_s"] / base
    return row


def _memory(res: dict, name: str) -> dict | None:
    m = res.get("memory", {}).get(name)
    return None if m is None else {"peak_mib": m["peak_bytes"] / MIB, "temp_mib": m["temp_size_in_bytes"] / MIB}


def summarize(out: Path, expected: tuple[str, ...] = ROWS) -> dict:
    first, perf, video = _load(out, "first_run"), _load(out, "perf"), _load(out, "video")
    rows: dict[str, dict | None] = {}
    for row, key in (("cli_cold", "first_run"), ("cli_warm", "second_run_warm_cache")):
        run = first.get(key)
        rows[row] = None if run is None else {"wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                                              "devices_line": run.get("first_line")}
    base = perf.get("timings", {}).get("unguided", {}).get("best_s")
    for name in ("unguided", "regression", "mmps1", "mmps3"):
        rows[name] = _timing(perf, name, base)
    ens = perf.get("ensemble")
    rows["vmap8"] = None if ens is None else {"vmap_s": ens["vmap_s"], "singles_s": ens["singles_s"],
                                              "x_singles": ens["vmap_s"] / ens["singles_s"],
                                              "members": perf.get("members")}
    bf16 = perf.get("bf16")
    rows["bf16"] = None if bf16 is None else {"x_float32_time": bf16["time_ratio_bf16_over_fp32"],
                                              "rms_rel_diff": bf16["rms_rel_diff"]}
    rows["memory_unguided"] = _memory(perf, "unguided")
    rows["memory_dps"] = _memory(perf, "dps")
    rows["memory_dps_remat"] = _memory(perf, "dps_remat_blocks")
    rows["video_unguided"] = _timing(video, "unguided")
    if rows["video_unguided"] is not None:
        rows["video_unguided"]["n_params"] = video.get("n_params")
    return {
        "device": perf.get("device") or video.get("device"),
        "platform": perf.get("platform") or video.get("platform"),
        "jax": perf.get("jax"),
        "perf_config": perf.get("config"),
        "video_config": video.get("config"),
        "cli_command": first.get("command"),
        "device_peak_bytes_in_use": perf.get("device_peak_bytes_in_use"),
        "rows": rows,
        "expected": list(expected),
        "missing": [r for r in expected if rows.get(r) is None],
    }


def table(summary: dict) -> str:
    lines = [f"# device check: {summary['device']} ({summary['platform']}), jax {summary['jax']}",
             "| row | figures |", "|---|---|"]
    for name in summary.get("expected", ROWS):
        row = summary["rows"].get(name)
        text = "MISSING" if row is None else ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    expected = ROWS
    if len(args) == 3 and args[1] == "--rows":
        expected = tuple(args[2].split(","))
        unknown = sorted(set(expected) - set(ROWS))
        if unknown:
            print(f"unknown rows {unknown}; the rows are {list(ROWS)}", file=sys.stderr)
            return 2
        args = args[:1]
    if len(args) != 1:
        print("usage: device_check_summary.py OUT_DIR [--rows ROW,ROW,...]", file=sys.stderr)
        return 2
    out = Path(args[0])
    summary = summarize(out, expected)
    (out / "device_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    if summary["missing"]:
        print(f"missing rows: {summary['missing']}")
    return 1 if summary["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
