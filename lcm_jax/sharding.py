"""Mesh ('data', 'fsdp', 'tensor'), partition rules for params, and multi-host set-up.

Rules are (regex on the '/'-joined param path, PartitionSpec) pairs, first match wins, as
in big_vision; they are applied to params, optimizer state (whose leaves end in the same
paths) and the frozen teacher alike. An axis that does not divide a dimension is dropped
for that leaf (replicated along it), so one rule set serves every model size and mesh.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Specs are right-aligned to a leaf's shape: ("fsdp", "tensor") on a conv kernel
# [kh, kw, in, out] shards (in, out), on a Dense kernel [in, out] the same two dims.
# LoRA factors (lcm_jax.lora) split as the kernel they adapt: down [..., in, r] over fsdp on
# `in`, up [r, out] over tensor on `out`, so down @ up comes out laid out as the kernel.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"kernel$", P("fsdp", "tensor")),
    (r"(^|/)down$", P("fsdp", None)),
    (r"(^|/)up$", P(None, "tensor")),
    (r"embedding$", P("tensor", "fsdp")),  # [vocab, dim]
    (r".*", P()),                          # biases, norms, scalars: replicated
)


def init_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, auto: bool = False) -> None:
    """Start JAX's distributed runtime when several processes take part.

    Explicit flags win; ``auto`` (or a SLURM job with several tasks) lets JAX detect the
    cluster itself (SLURM, Cloud TPU, Open MPI). One process needs nothing.
    """
    if coordinator_address or (num_processes or 1) > 1:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Block until every process reaches the barrier ``name`` (a no-op with one process).

    A key-value barrier of the distributed runtime, not a device collective: XLA:CPU's gloo
    collectives fail after 30 s when one process reaches its first collective that much
    later than another (compiling slower, or writing files the others then read).
    """
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def make_mesh(mesh_config, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Mesh over AXES from ``config.mesh`` (sizes; one of them may be -1 = the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) < len(devices):
        logging.warning("mesh %s uses %d of the %d devices", dict(zip(AXES, sizes)),
                        int(np.prod(sizes)), len(devices))
        devices = devices[:int(np.prod(sizes))]
    from jax.experimental import mesh_utils
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, AXES)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """The PartitionSpec of one leaf: the first matching rule, fitted to ``shape``."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        spec = P()
    spec = tuple(spec)[-len(shape):] if shape else ()
    spec = (None,) * (len(shape) - len(spec)) + spec  # right-aligned
    fitted = []
    for dim, axis in zip(shape, spec):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axis if names and size > 1 and dim % size == 0 else None)
    return P(*fitted)


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(name, shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Examples split over data x fsdp, everything else whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def sampling_mesh(mesh: Any = "auto") -> Optional[Mesh]:
    """The mesh a pipeline samples over. A Mesh over AXES: as given; ``"auto"``: this process's devices
    on the data axis when they are several accelerators (CPU devices share the host's cores, so none);
    None: one device. Each process samples its own batch on its own devices."""
    if mesh is None or isinstance(mesh, Mesh):
        if mesh is not None and tuple(mesh.axis_names) != AXES:
            raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected {AXES} (sizes may be 1)")
        return mesh
    if mesh != "auto":
        raise ValueError(f"mesh={mesh!r}: expected 'auto', None or a jax.sharding.Mesh over {AXES}")
    devices = jax.local_devices()
    if len(devices) < 2 or devices[0].platform == "cpu":
        return None
    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def batch_multiple(mesh: Optional[Mesh]) -> int:
    """The number a sharded batch is padded to a multiple of (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax.Arrays sharded over data x fsdp."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


def put(tree: Any, shardings: Any) -> Any:
    """Host (numpy) pytree -> device arrays with the given shardings (every process holds all)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)
