"""jax.distributed with 2 CPU processes on one machine (gloo collectives)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from jaxguide.cli import app

from jaxguide.campaign.distributed import (
    DistributedError,
    ProcessInfo,
    barrier_timeout,
    detected_launcher,
    initialize,
    my_share,
)

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, sys
    from jaxguide.campaign.distributed import initialize, barrier, my_share
    info = initialize(coordinator=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(jnp.array([info.index + 1.0]))
    barrier("probe", info)
    print(json.dumps({"index": info.index, "count": info.count, "local": jax.local_device_count(),
                      "global": jax.device_count(), "gathered": gathered.ravel().tolist(),
                      "share": my_share(list(range(5)), info),
                      "collectives": jax.config.jax_cpu_collectives_implementation}))
    jax.distributed.shutdown()
""")


# process 1 comes late to barrier "b" (process 0, started with a 1 s barrier timeout, times
# out naming it); both meet at "b2";
# then process 0 fails inside abort_on_error and process 1, at barrier "c", stops at once naming it
FAULTS = textwrap.dedent("""
    import json, sys, time
    from jaxguide.campaign import distributed as d
    me = int(sys.argv[2])
    info = d.initialize(coordinator=sys.argv[1], num_processes=2, process_id=me,
                        barrier_timeout_s=1.0 if me == 0 else None)
    out = {}
    d.barrier("a", info, timeout_s=60)
    t0 = time.monotonic()
    if info.index == 0:
        try:
            d.barrier("b", info)  # the timeout given to initialize (--barrier-timeout)
        except d.BarrierTimeoutError as e:
            out["timeout"] = [str(e), time.monotonic() - t0]
        d.barrier("b2", info, timeout_s=60)
        time.sleep(0.5)
        try:
            with d.abort_on_error(info, "at analysis time 2020-01-01 06:00:00"):
                raise ValueError("boom")
        except d.CampaignAbortedError as e:
            out["own"] = [str(e), e.failed_process, type(e.__cause__).__name__]
    else:
        time.sleep(2.5)
        d.barrier("b", info, timeout_s=60)  # process 0's arrival is recorded: passes
        d.barrier("b2", info, timeout_s=60)
        t0 = time.monotonic()
        try:
            d.barrier("c", info, timeout_s=60)
        except d.CampaignAbortedError as e:
            out["other"] = [str(e), e.failed_process, time.monotonic() - t0]
        try:
            d.check_abort(info)
        except d.CampaignAbortedError as e:
            out["check"] = e.failed_process
    print(json.dumps(out), flush=True)
    import jax
    jax.distributed.shutdown()  # a barrier: process 0 (the coordinator) waits for process 1
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_cpu_processes():
    addr = f"localhost:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(var, None)
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, addr, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for i, o in enumerate(outs):
        assert (o["index"], o["count"], o["local"], o["global"]) == (i, 2, 1, 2)
        assert o["gathered"] == [1.0, 2.0]
        assert o["collectives"] == "gloo"
    assert outs[0]["share"] == [0, 2, 4] and outs[1]["share"] == [1, 3]


def test_single_process_and_bad_options(monkeypatch):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert detected_launcher() is None
    assert initialize("auto") == ProcessInfo(0, 1)
    assert initialize("off") == ProcessInfo(0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detected_launcher() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detected_launcher() == "slurm"
    with pytest.raises(DistributedError, match="need all of --coordinator"):
        initialize(coordinator="localhost:1234")
    with pytest.raises(DistributedError, match=r"\[0, 2\)"):
        initialize(coordinator="localhost:1234", num_processes=2, process_id=2)
    with pytest.raises(DistributedError, match="HOST:PORT"):
        initialize(coordinator="localhost", num_processes=2, process_id=0)
    assert my_share(list("abcde"), ProcessInfo(1, 2)) == ["b", "d"]


@pytest.mark.slow  # ~20 s on 2 cores (two processes start JAX): in the `-m slow` set that CI also runs
def test_barrier_timeout_and_abort_two_processes():
    """The barrier's timeout names the missing process; a failure in one process stops
    the other at its barrier at once, naming the process and time (no collective, no hang)."""
    addr = f"localhost:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(var, None)
    procs = [subprocess.Popen([sys.executable, "-c", FAULTS, addr, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text, waited = outs[0]["timeout"]
    assert "process(es) [1] did not reach barrier 'b'" in text and "--barrier-timeout" in text
    assert 1.0 <= waited < 2.5
    said = "process 0 of 2 failed at analysis time 2020-01-01 06:00:00: ValueError: boom"
    assert outs[0]["own"][0].startswith(said) and outs[0]["own"][1:] == [0, "ValueError"]
    text, failed, waited = outs[1]["other"]
    assert text.startswith(said) and "process 1 stopped too" in text and "--resume" in text
    assert failed == 0 and waited < 2.0
    assert outs[1]["check"] == 0


def test_barrier_timeout_setting(monkeypatch):
    monkeypatch.delenv("JAXGUIDE_BARRIER_TIMEOUT", raising=False)
    assert barrier_timeout() == 1800.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DistributedError, match="barrier timeout must be a number of seconds > 0"):
            initialize(barrier_timeout_s=bad)
    res = CliRunner().invoke(app, ["campaign", "--model", "m", "--obs", "o.csv", "--out", "s.zarr", "--times",
                                   "2020-01-01T00/2020-01-01T06/PT6H", "--barrier-timeout", "0"])
    assert "barrier timeout must be a number of seconds > 0, got 0" in one_line_error(res)
    monkeypatch.setenv("JAXGUIDE_BARRIER_TIMEOUT", "2.5")
    assert barrier_timeout() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("JAXGUIDE_BARRIER_TIMEOUT", bad)
        with pytest.raises(DistributedError, match="JAXGUIDE_BARRIER_TIMEOUT must be a number of seconds > 0"):
            barrier_timeout()
