"""Helpers of the tests that train: a small config, the checkpoint and metrics readers, and
`python train.py` run as a user does, in a subprocess.

The subprocesses share the tests' persistent compilation cache, so after the first run of a
program shape a run costs start-up, tracing and the steps, not an XLA compile.
"""
import json
import os
import subprocess
import sys
import time

import jax
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import common, tiny  # noqa: E402


RUN_TIMEOUT = 900  # s per train.py run: a cold compilation cache on 2 busy cores takes minutes


def distill_spec(**fields):
    """The train step's spec of configs/common.py's defaults, with ``fields`` replaced (and checked)."""
    import dataclasses
    from lcm_jax import distill
    return dataclasses.replace(distill.DistillSpec.from_config(common.base_config()), **fields)


def data_config(**keys) -> dict:
    """A data config as a plain dict: configs/common.py's defaults with ``keys`` set."""
    return {**common.base_config().data.to_dict(), **keys}


def small_config(teacher, **overrides):
    c = tiny.get_config()
    c.pretrained = teacher
    c.tiny_teacher = False
    c.num_steps = 3
    c.batch_size = 8
    c.log_every = 1
    c.checkpoint_every = 2
    c.sample_prompts = ("a handwritten digit seven",)
    c.sample_steps = ()  # no grids (a sampler compile each); the export test asks for one
    c.mesh.data = 1
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def read_state(workdir, step=None):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data", "config"))
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    mngr.close()
    return out["state"], out["data"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
                JAX_DEFAULT_MATMUL_PRECISION="highest",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                PYTHONUNBUFFERED="1")


def cmd(workdir, teacher=None, *extra, num_steps: int = 4, checkpoint_every: int = 2) -> list:
    """train.py on configs/tiny.py; ``teacher``: an existing teacher folder instead of making one."""
    flags = dict(num_steps=num_steps, batch_size=8, log_every=1, checkpoint_every=checkpoint_every,
                 sample_steps="()")
    if teacher:
        flags.update(pretrained=teacher, tiny_teacher=False)
    return [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}", "--alsologtostderr",
            *[f"--config.{k}={v}" for k, v in flags.items()], *extra]


def start(command, log, devices: int) -> subprocess.Popen:
    """train.py in the background, stdout+stderr to ``log`` (a file: nothing blocks on a pipe)."""
    with open(log, "w") as f:
        return subprocess.Popen(command, cwd=ROOT, env=env(devices), stdout=f, stderr=subprocess.STDOUT)


def tail(log, n=4000) -> str:
    with open(log) as f:
        return f.read()[-n:]


def run(command, log, devices: int, expect: int = 0) -> str:
    """train.py to completion with exit code ``expect``; returns its output."""
    proc = start(command, log, devices)
    try:
        rc = proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == expect, f"train.py exited with {rc}, expected {expect}:\n{tail(log)}"
    return tail(log, 10**7)


def wait_until(predicate, proc, log, what):
    deadline = time.monotonic() + RUN_TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"train.py exited with {proc.returncode} before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {RUN_TIMEOUT}s:\n{tail(log)}")
        time.sleep(0.02)


def finished_steps(workdir) -> list:
    """Checkpoint steps orbax has committed (it writes '<step>.orbax-checkpoint-tmp-*' then renames)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def rows(workdir, offset=0) -> list:
    """metrics.jsonl rows from byte ``offset`` on (a killed run may leave a torn last line before it)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def size(path) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def resumed_from(output) -> int:
    marker = "resumed from step "
    assert marker in output, f"the rerun did not resume:\n{output[-4000:]}"
    return int(output.split(marker)[1].split()[0])
