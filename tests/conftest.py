"""Shared fixtures: a tiny simulated world on disk and the path of ../shared/data."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

# Every test sees 8 CPU devices, as a small accelerator slice would give it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the test session and every process it starts (train.py, serve.py):
# a program compiled once (the tiny model's step, again in a resumed or second process) is read back, not
# compiled again. The same compiled program runs either way.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "homegen-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def shared_file(*parts: str) -> str:
    """Path of a file under ../shared/data, or skip the test with a message where it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (../shared/data is only on developer and CI machines)")
    return path


# Tests that train a model, simulate a world or start processes: `-m "not slow"` leaves them out (the quick
# subset a contributor runs before each commit; the full suite is what CI runs).
SLOW_FIXTURES = {"tiny_checkpoint", "tiny_semantic_checkpoint", "tiny_world_dir", "tfds_dir", "data_dir",
                 "propensity_logs", "served_logs", "installed"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Frees each test module's compiled XLA programs when it ends. Every CPU executable maps memory of its
    own, and one process running the whole suite otherwise passes the kernel's limit on memory maps
    (vm.max_map_count, 65,530), after which the next compile crashes with a segmentation fault."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> str:
    from homegen.data.simulator.simulate import write_world
    from homegen.data.simulator.world import WorldConfig

    out = str(tmp_path_factory.mktemp("world"))
    write_world(WorldConfig(num_items=600, num_users=120, seed=3), out, num_pages=3000, num_requests=50)
    return out


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """One TFDS folder for the whole session, so the tiny world is simulated and written once."""
    return str(tmp_path_factory.mktemp("tfds"))


TINY_STEPS = 200  # what `tiny_checkpoint` trains


def train_tiny_run(tfds_dir, tmp_path_factory, name: str, steps: int = 30, **data) -> str:
    """A run folder with a small model (with a value head) trained for `steps` steps on the tiny synthetic
    world, with `data` overriding the data config."""
    from homegen.configs.demo import get_config
    from homegen.training.loop import run

    cfg = get_config()
    cfg.data.update({"data_dir": tfds_dir, "seq_len": 96, **data})
    cfg.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                          value_head=True))
    cfg.train.update(dict(steps=steps, log_every=10, eval_every=steps, checkpoint_every=steps, eval_batches=1,
                          warmup_steps=5, learning_rate=3e-3))
    workdir = str(tmp_path_factory.mktemp(name))
    run(cfg, workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_checkpoint(tfds_dir, tmp_path_factory) -> str:
    """A run folder with a small model (with a value head) trained on the tiny synthetic world for 200 steps:
    enough for its pages to beat random ones by half (30 steps left them at random's level)."""
    return train_tiny_run(tfds_dir, tmp_path_factory, "tiny_run", steps=TINY_STEPS)


@pytest.fixture(scope="session")
def tiny_semantic_checkpoint(tfds_dir, tmp_path_factory) -> str:
    """`tiny_checkpoint` with semantic item IDs (2 levels of 16 codes and a collision code per item), trained
    without the items released in the world's last 10 days (new releases for a catalog refresh)."""
    return train_tiny_run(tfds_dir, tmp_path_factory, "tiny_semantic_run", seq_len=320, item_tokens="semantic",
                           semantic_levels=2, semantic_codes=16, semantic_dim=16, hold_out_release_days=10)


@pytest.fixture(scope="session")
def walks_file(tmp_path_factory) -> str:
    """Sequence text where each user walks forward through one of three rings of 20 items: the next item
    is predictable from the last one."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for user in range(240):
        ring, start, length = user % 3, rng.integers(20), rng.integers(6, 12)
        items = [ring * 20 + (start + k) % 20 + 1 for k in range(length)]
        lines.append(" ".join(map(str, [user + 1, *items])))
    path = tmp_path_factory.mktemp("walks") / "walks.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


TINY_MODEL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def tiny_config(data_dir, **train):
    """configs/demo.py with a tiny model and short training, on the session's TFDS folder."""
    from homegen.configs.demo import get_config

    cfg = get_config()
    cfg.data.data_dir = data_dir
    cfg.data.seq_len = 64
    for key, value in TINY_MODEL.items():
        cfg.model[key] = value
    cfg.train.update(dict(steps=12, batch_size=16, log_every=4, eval_every=6, checkpoint_every=4, eval_batches=2,
                          warmup_steps=2, learning_rate=3e-3))
    cfg.train.update(train)
    return cfg


def overrides(cfg) -> list[str]:
    """The command-line flags that turn configs/demo.py into `cfg`."""
    from homegen.configs.demo import get_config

    base, out = get_config(), []
    for section in ("data", "model", "train", "mesh"):
        for key, value in cfg[section].items():
            if base[section][key] != value:
                out.append(f"--config.{section}.{key}={value}")
    return out


def train_cli(workdir, cfg, extra=(), env=None, **kwargs):
    """train.py on configs/demo.py turned into `cfg` by flags, as a subprocess (stdout and stderr piped together)."""
    cmd = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(workdir), *overrides(cfg), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(engine, settings=None, make_engine=None, arm_engine=None):
    """serving/app.py's server for `engine` (warmed up if it has buckets) on a free port, in a thread: yields
    (base URL, app). `arm_engine(path)`: the engine of an experiment arm's checkpoint."""
    import threading

    import uvicorn

    from homegen.serving.app import ServerSettings, create_app
    from homegen.serving.worker import EngineSlot

    if engine.buckets:
        engine.warm_up()
    app = create_app(EngineSlot(engine, make_engine or (lambda step: engine)), settings or ServerSettings(),
                     arm_engine=arm_engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           http="h11", loop="asyncio", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture
def data_dir(tfds_dir):
    return tfds_dir


def params_of(workdir):
    """The parameters of a run folder's newest readable checkpoint, as numpy arrays."""
    import jax
    import numpy as np

    from homegen.training.checkpoints import Checkpoints

    _, params = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).restore_params(None)
    return jax.tree.map(np.asarray, params)


def assert_trees_equal(a, b):
    import jax
    import numpy as np

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
