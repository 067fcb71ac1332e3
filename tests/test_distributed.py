"""jax.distributed with 2 CPU processes on one machine (gloo collectives)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxguide.campaign.distributed import DistributedError, ProcessInfo, detected_launcher, initialize, my_share

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
