"""What the commands print: summaries and tables (rich), after the library has done the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def print_assimilation_summary(summary: dict) -> None:
    """`jaxguide assimilate`: the observation fit per variable, the frames of a trajectory, the timings."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"observation fit ({summary['n_obs']} obs, method {summary['method']})")
    for col in ("variable", "n", "prior RMSE", "analysis RMSE", "analysis spread"):
        table.add_column(col, justify="left" if col == "variable" else "right")
    prior = summary.get("prior") or {}
    for var, a in summary["analysis"].items():
        p = prior.get(var, {})
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        table.add_row(var, str(a["n_obs"]), fmt(p.get("rmse")), fmt(a["rmse"]), fmt(a.get("spread")))
    console = Console()
    console.print(table)
    if summary.get("frames"):
        frames = [str(t)[:16].replace(" ", "T") for t in summary["frames"]]
        shown = ", ".join(frames) if len(frames) <= 8 else f"{', '.join(frames[:3])}, ..., {', '.join(frames[-2:])}"
        console.print(f"trajectory: {len(frames)} frames in {summary.get('windows', 1)} window(s): {shown}")
    if summary["dropped"]:
        console.print(f"dropped observation rows: {summary['dropped']}")
    sampling = summary["seconds_analysis"] + summary["seconds_prior"]
    compile_s = summary.get("seconds_compile", 0.0)
    console.print(
        f"time: total {summary['seconds_total']:.1f} s = compile {compile_s:.1f} s (analysis and prior at once) "
        f"+ sampling {sampling:.1f} s + loading/writing {summary['seconds_total'] - sampling - compile_s:.1f} s"
    )




def print_window_demo_summary(summary: dict[str, Any], seconds: float) -> None:
    """`jaxguide demo --window`: skill per frame against the exact smoother, and the files written."""
    from rich.console import Console
    from rich.table import Table

    cfg, w = summary["config"], summary["window"]
    table = Table(title=(f"jaxguide demo --window: {summary['n_obs']} observations in frames 0-"
                         f"{cfg['observed_frames'] - 1} of {w['frames']} ({w['time_step_hours']:g} h apart), "
                         f"{cfg['members']} members, {cfg['steps']} steps; RMS over channels and pixels, K"))
    table.add_column("frame", no_wrap=True)
    table.add_column("hour", justify="right")
    table.add_column("obs", justify="right")
    cols = {"rmse_mmps": "MMPS RMSE", "spread_mmps": "MMPS spread", "rmse_exact": "exact RMSE",
            "std_exact": "exact std", "rmse_prior": "prior RMSE", "mean_error_vs_exact": "err. vs exact",
            "spread_ratio_vs_exact": "spread ratio"}
    for c in cols.values():
        table.add_column(c, justify="right")
    for r in summary["frames"]:
        table.add_row(str(r["frame"]), f"{r['hours']:g}", "yes" if r["observed"] else "no",
                      *(f"{r[k]:.2f}" for k in cols))
    table.caption = ("err. vs exact: RMS of (MMPS mean - exact posterior mean) / prior std; spread ratio: MMPS "
                     "std / exact posterior std")
    con = Console()
    con.print(table)
    ex = summary["exact_posterior"]["mmps"]
    con.print(f"MMPS vs the exact posterior over the window: mean error {ex['mean_error_prior_std']:.3f} prior std "
              f"(Monte-Carlo floor {ex['mc_floor_prior_std']:.3f}), spread ratio {ex['spread_ratio']:.3f}; "
              f"time correlation exp(-lag / {cfg['correlation_hours']:g} h)")
    files = summary["files"]
    con.print(f"wrote {', '.join(Path(v).name for v in files.values())} to {Path(files['summary']).parent} "
              f"in {seconds:.1f} s")


def print_demo_summary(summary: dict[str, Any], seconds: float) -> None:
    """`jaxguide demo`: skill of each method against held-out observations and the exact posterior."""
    from rich.console import Console
    from rich.table import Table

    from jaxguide.demo.experiment import summary_rows

    cfg, ex = summary["config"], summary["exact_posterior"]
    table = Table(title=(f"jaxguide demo: {summary['n_obs']['assimilated']} assimilated / "
                         f"{summary['n_obs']['held_out']} held-out observations, {cfg['members']} members, "
                         f"{cfg['steps']} steps"))
    table.add_column("method", no_wrap=True)
    table.add_column("set", no_wrap=True)
    for col in ("RMSE held out (K)", "RMSE assim. (K)", "CRPS held out (K)", "spread / skill held out",
                "mean err. vs exact (prior std)", "spread ratio vs exact"):
        table.add_column(col, justify="right")
    for r in summary_rows(summary):
        table.add_row(r["method"], r["set"], *(f"{r[k]:.3f}" for k in (
            "rmse_held_out", "rmse_assimilated", "crps_held_out", "spread_skill_held_out", "mean_error_vs_exact",
            "spread_ratio_vs_exact")))
    con = Console()
    con.print(table)
    mc = summary["methods"]["mmps"]["exact_posterior"]["all"]["mc_floor_prior_std"]
    con.print(f"exact posterior mean: RMSE held-out {ex['held_out_rmse_of_mean']:.3f} K, assimilated "
              f"{ex['assimilated_rmse_of_mean']:.3f} K; Monte-Carlo floor of the mean error {mc:.3f} prior std")
    con.print(f"spread-skill includes the observation error; MMPS cg_iters={cfg['cg_iters']}; regression scale "
              f"{summary['methods']['regression']['options']['scale']:.4g} "
              f"({summary['methods']['regression']['options']['scale_rule']})")
    files = summary["files"]
    out_dir = Path(files["summary"]).parent
    con.print(f"wrote {', '.join(Path(v).name for k, v in files.items() if k != 'plots')} "
              f"and {len(files['plots'])} plots to {out_dir} in {seconds:.1f} s")


# --------------------------------------------------------------------------------------
# era5-obs



def print_evaluation(result) -> None:
    """`jaxguide evaluate`: two tables (they fit 80 columns), ensemble mean and spread, then the
    proper scores; then the time rule and a table per frame of a trajectory."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def fmt(v):
        return "-" if v is None else f"{v:.4g}"

    def table(title: str, cols: tuple[str, ...], row) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD)
        for col in ("set", "variable", *cols):
            t.add_column(col, justify="left" if col in ("set", "variable") else "right", no_wrap=True)
        for set_name, per_var in result.metrics.items():
            for var, s in per_var.items():
                t.add_row(set_name, var, *(fmt(v) if not isinstance(v, str) else v for v in row(s)))
        return t

    console = Console()
    console.print(table(
        f"analysis verification (observation operator: {result.operator})",
        ("n", "RMSE", "bias", "spread", "spread/skill"),
        lambda s: (str(s["n_obs"]), s["rmse"], s["bias"], s.get("spread"), s.get("spread_skill_obs", s.get("spread_skill"))),
    ))
    console.print(table(
        "proper scores (lower is better)",
        ("CRPS", "energy score", "variogram score"),
        lambda s: (s["crps"], s["energy_score"], s.get("variogram_score")),
    ))
    if result.time_rule != "single":
        how = ("linearly between the two frames around each observation" if result.time_rule == "linear"
               else "at the frame nearest each observation")
        console.print(f"time interpolation: {result.time_rule} (the trajectory is read {how}, as assimilate did); "
                      "per frame: the observations nearest each frame")
    for set_name, frames in result.per_frame.items():
        t = Table(title=f"{set_name} per frame (each observation at its nearest frame)", box=box.SIMPLE_HEAD)
        for col in ("frame (UTC)", "variable", "n", "RMSE", "spread", "CRPS"):
            t.add_column(col, justify="left" if col in ("frame (UTC)", "variable") else "right", no_wrap=True)
        for frame, per_var in frames.items():
            for var, s in per_var.items():
                t.add_row(frame[:16], var, str(s["n_obs"]), fmt(s["rmse"]), fmt(s.get("spread")), fmt(s["crps"]))
        console.print(t)
    if any(s.get("obs_noise_in_scores") for per in result.metrics.values() for s in per.values()):
        console.print("At observations, CRPS, energy and variogram scores and rank histograms score the members plus "
                      "N(0, sigma^2) noise, and spread/skill = sqrt((M+1)/M spread^2 + sigma^2) / RMSE. The energy "
                      "and variogram (p = 0.5) scores treat a set's observations of a variable as one vector.")


def print_campaign_summary(summary: dict[str, Any], out: Path, *, who: str = "", is_main: bool = True) -> None:
    """`jaxguide campaign`: this process's times and seconds, skipped times, and (process 0) the store's totals."""
    mine = summary["this_process"]
    secs = [e["seconds"] for e in mine]
    typer.echo(f"{who}{len(mine)} times in {summary['seconds_total']:.1f} s"
               + (f" (first {secs[0]:.1f} s incl. compilation, then {sum(secs[1:]) / max(len(secs) - 1, 1):.2f} s per time)"
                  if secs else ""))
    for e in mine:
        if e["status"] == "skipped":
            typer.echo(f"skipped {e['time']}: {e['reason']}")
    if is_main:
        typer.echo(f"store {out}: {summary['analysed']} analysed, {summary['skipped']} skipped, "
                   f"{summary['incomplete']} incomplete of {summary['times']} times")
