"""Hostile and damaged input: every entry point ends with one clear line (exit 2 on the CLI), writes nothing, and
stays within bounded memory and time. Fixtures are built on the fly; CLI runs happen in subprocesses under an
address-space limit."""
import functools
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchtn import MPOLinear, load_model, save_model, tensorize, tt_svd
from torchtn.data import load_cifar10, load_mnist, read_idx
from torchtn.io import ModelFileError

ROOT = Path(__file__).resolve().parents[1]
MEMORY_HEADROOM = 400 << 20  # bytes of address space allowed beyond a plain `torchtn --version` run
# The same address space on any machine: no GPU (under the limit CUDA's own initialization fails, with a warning of
# PyTorch's; the NVML check reads CUDA_VISIBLE_DEVICES without initializing CUDA) and two BLAS/OpenMP threads
# (OpenBLAS reserves a buffer per thread: 16 threads overrun the headroom).
LIMITED_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
               "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def _run_limited(args, limit_bytes, cwd, timeout=60):
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n"
            "from torchtn.cli import main\n"
            f"sys.exit(main({list(map(str, args))!r}))\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=LIMITED_ENV)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def memory_limit(tmp_path_factory):
    """Peak address space of importing torchtn and running `--version`, plus the allowed headroom."""
    code = ("import resource, sys\nfrom torchtn.cli import main\nmain(['--version'])\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=LIMITED_ENV).stdout
    return int(out.strip().splitlines()[-1]) * 1024 + MEMORY_HEADROOM


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")} \
        if path.exists() else {}


def _assert_refused(proc, words=()):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert err.count("\n") == 0 and err.startswith("torchtn: error:"), err
    for w in words:
        assert w in err, (w, err)


# ---------------------------------------------------------------------------------------------------- fixtures
def _idx_bytes(arr: np.ndarray, dims=None) -> bytes:
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    dims = arr.shape if dims is None else dims
    header = bytes([0, 0, codes[arr.dtype.type], len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _mnist_dir(directory: Path, n=24) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))))
        (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes((np.arange(n) % 10).astype(np.uint8))))
    return directory


def _gzip_bomb(path: Path, header: bytes, zeros: int) -> Path:
    """A small .gz whose payload is ``header`` followed by ``zeros`` zero bytes: concatenated gzip members (a valid
    gzip stream), one per MiB of zeros, each ~1 KB."""
    member = gzip.compress(bytes(1 << 20), compresslevel=9)
    path.write_bytes(gzip.compress(header) + member * (zeros >> 20))
    return path


# ---------------------------------------------------------------------------------------------------- data files
def test_idx_bombs_and_lies_are_refused_before_decompressing(tmp_path):
    huge_claim = _gzip_bomb(tmp_path / "claim.gz", bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**6, 10**3, 10**3), 0)
    with pytest.raises(ValueError, match="more than the"):
        read_idx(huge_claim)
    # a correct MNIST header followed by 256 MiB of zeros in a ~250 KB file: read stops after the promised bytes
    bomb = _gzip_bomb(tmp_path / "bomb.gz", bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28), 256 << 20)
    assert bomb.stat().st_size < 2 << 20
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="holds more data"):
        read_idx(bomb)
    assert time.perf_counter() - t0 < 2
    wrong = tmp_path / "wrong.gz"
    wrong.write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 20, 20), np.uint8))))
    with pytest.raises(ValueError, match=r"items of shape \(20, 20\), expected \(28, 28\)"):
        read_idx(wrong, expect_ndim=3, expect_tail=(28, 28))
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 28, 28), np.uint8)))[:-30])
    with pytest.raises(ValueError, match="corrupt|ends after"):
        read_idx(corrupt)


def test_mnist_labels_and_shapes_are_checked(tmp_path):
    d = _mnist_dir(tmp_path / "m")
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.full(24, 11, np.uint8))))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_mnist(d)
    d = _mnist_dir(tmp_path / "m2")
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((24, 28), np.uint8))))
    with pytest.raises(ValueError, match="2-dimensional data"):
        load_mnist(d)
    d = _mnist_dir(tmp_path / "m3")
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((0, 28, 28), np.uint8))))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(0, np.uint8))))
    with pytest.raises(ValueError, match="holds no images"):
        load_mnist(d)


def _cifar_dir(directory: Path, batch_for=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8), b"labels": list(range(10))}
        if batch_for is not None and name == "data_batch_1":
            batch = batch_for
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    return directory


def test_cifar_reference_expansion_and_wrong_structures_are_refused(tmp_path):
    inner = [0] * 1000
    expanding = {b"data": np.zeros((10, 3072), np.uint8), b"labels": [inner] * 1000}  # tiny pickle, 10^6 ints
    assert len(pickle.dumps(expanding, protocol=2)) < 64_000
    with pytest.raises(ValueError, match="flat list of 10 integers"):
        load_cifar10(_cifar_dir(tmp_path / "a", expanding))
    with pytest.raises(ValueError, match="uint8 array"):
        load_cifar10(_cifar_dir(tmp_path / "b", {b"data": [[0] * 3072] * 10, b"labels": list(range(10))}))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_cifar10(_cifar_dir(tmp_path / "c", {b"data": np.zeros((10, 3072), np.uint8), b"labels": [99] * 10}))
    truncated = _cifar_dir(tmp_path / "d")
    (truncated / "test_batch").write_bytes((truncated / "test_batch").read_bytes()[:500])
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(truncated)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_data_files_fail_cleanly(tmp_path, data):
    valid_idx = gzip.compress(_idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)))
    raw_idx = _idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28))
    batch = pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2, 3]}, protocol=2)
    for name, blob in (("a.gz", valid_idx), ("b.idx", raw_idx), ("test_batch", batch)):
        mutated = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(1, len(mutated)))
        path = tmp_path / name
        path.write_bytes(bytes(mutated[:cut]))
        try:
            if name == "test_batch":
                from torchtn.data.datasets import _read_cifar_batch

                _read_cifar_batch(path)
            else:
                read_idx(path, expect_ndim=3, expect_tail=(28, 28))
        except (ValueError, pickle.UnpicklingError):
            pass  # the only ways allowed to fail


# ---------------------------------------------------------------------------------------------------- model files
def _model_file(tmp_path: Path) -> tuple[Path, dict, dict]:
    model = nn.Sequential(MPOLinear(16, 16, 2))
    path = save_model(model, tmp_path / "good.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    return path, meta, {k: v.contiguous() for k, v in model.state_dict().items()}


def _write(tmp_path: Path, name: str, tensors: dict, meta_text: str) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path, metadata={"torchtn": meta_text})
    return path


HOSTILE_META = {
    "not-json": lambda m: "{not json",
    "a-list": lambda m: "[1, 2]",
    "deep": lambda m: "[" * 100_000 + "]" * 100_000,
    "layers-a-string": lambda m: json.dumps({**m, "layers": "x"}),
    "record-no-spec": lambda m: json.dumps({**m, "layers": {"0": {"type": "MPOLinear"}}}),
    "unknown-type": lambda m: json.dumps({**m, "layers": {"0": {"type": "Evil", "spec": {}}}}),
    "huge-claim": lambda m: json.dumps({**m, "layers": {"0": {"type": "MPOLinear", "spec": {
        "in_shape": [2**31] * 64, "out_shape": [2**31] * 64, "ranks": [1] + [2**31] * 63 + [1], "bias": True}}}}),
    "too-many-modes": lambda m: json.dumps({**m, "layers": {"0": {"type": "MPOLinear", "spec": {
        "in_shape": [1] * 10_000, "out_shape": [1] * 10_000, "ranks": [1] * 10_001, "bias": True}}}}),
    "string-shape": lambda m: json.dumps({**m, "layers": {"0": {"type": "MPOLinear", "spec": {
        "in_shape": "4,4", "out_shape": [4, 4], "ranks": [1, 2, 1], "bias": True}}}}),
    "lying-ranks": lambda m: json.dumps({**m, "layers": {"0": {"type": "MPOLinear", "spec": {
        **m["layers"]["0"]["spec"], "ranks": [1, 2, 3, 2, 1]}}}}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_hostile_metadata_raises_model_file_error_fast(tmp_path, case):
    path, meta, tensors = _model_file(tmp_path)
    bad = _write(tmp_path, case, tensors, HOSTILE_META[case](meta))
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match=str(bad.name)):
        load_model(bad, nn.Sequential(nn.Linear(16, 16)))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("kind", ["nan", "int", "truncated", "not-safetensors"])
def test_damaged_tensors_raise_model_file_error(tmp_path, kind):
    path, meta, tensors = _model_file(tmp_path)
    if kind == "nan":
        tensors["0.cores.1"] = tensors["0.cores.1"].clone()
        tensors["0.cores.1"][0, 0, 0, 0] = float("nan")
        bad = _write(tmp_path, kind, tensors, json.dumps(meta))
    elif kind == "int":
        tensors["0.cores.1"] = tensors["0.cores.1"].to(torch.int32)
        bad = _write(tmp_path, kind, tensors, json.dumps(meta))
    elif kind == "truncated":
        bad = tmp_path / "truncated.safetensors"
        bad.write_bytes(path.read_bytes()[:-40])
    else:
        bad = tmp_path / "text.safetensors"
        bad.write_text("hello")
    skeleton = nn.Sequential(nn.Linear(16, 16))
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ModelFileError):
        load_model(bad, skeleton)
    assert isinstance(skeleton[0], nn.Linear) and all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


@functools.lru_cache(maxsize=1)
def _valid_model_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return _model_file(Path(d))[0].read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_model_files_fail_cleanly(tmp_path, data):
    mutated = bytearray(_valid_model_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(mutated))
    try:
        load_model(bad, nn.Sequential(nn.Linear(16, 16)))
    except ModelFileError:
        pass


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_model(nn.Sequential(MPOLinear(16, 16, 2)), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and path.with_suffix(".json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------------- numerics
def test_non_finite_and_extreme_matrices():
    with pytest.raises(ValueError, match="NaN or infinite"):
        tt_svd(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), (2,), (2,))
    lin = nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        MPOLinear.from_dense(lin, rank=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        tensorize(nn.Sequential(lin), rank=2)
    for scale in (1e20, 1e-30):  # float32 near its limits: the rel_tol promise still holds
        w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * scale
        cores = tt_svd(w, (8, 8), (8, 8), rel_tol=0.5)
        from torchtn import tt_to_dense

        err = (tt_to_dense([c.double() for c in cores]) - w.double()).norm() / w.double().norm()
        assert err <= 0.5 * (1 + 1e-4) and cores[0].shape[3] > 1


# ---------------------------------------------------------------------------------------------------- the CLI
def test_bare_torchtn_prints_usage_to_stderr():
    proc = subprocess.run([sys.executable, "-m", "torchtn.cli"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith("usage: torchtn")


@pytest.mark.parametrize("case", ["idx-bomb", "hostile-model", "out-under-file", "huge-hidden", "huge-seed",
                                  "unreachable-ratio", "resume-nothing", "plot-nowhere"])
def test_cli_refuses_in_bounded_memory_writing_nothing(tmp_path, memory_limit, case):
    out = tmp_path / "out"
    if case == "idx-bomb":
        d = _mnist_dir(tmp_path / "mnist")
        _gzip_bomb(d / "train-images-idx3-ubyte.gz", bytes([0, 0, 8, 3]) + struct.pack(">3I", 24, 28, 28), 1 << 30)
        args, words = ["compress", "--dataset", "mnist", "--data-dir", d, "--out", out], ["holds more data"]
    elif case == "hostile-model":
        path, meta, tensors = _model_file(tmp_path)
        bad = _write(tmp_path, "huge", tensors, HOSTILE_META["huge-claim"](meta))
        args, words = ["inspect", bad, "--plot", tmp_path / "p.png"], ["huge.safetensors"]
    elif case == "out-under-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
        args, words = ["compress", "--out", out], ["is a file"]
    elif case == "huge-hidden":
        args, words = ["compress", "--hidden", str(2**31), "--out", out], ["--hidden"]
    elif case == "huge-seed":
        args, words = ["compress", "--seed", str(2**64), "--out", out], ["--seed"]
    elif case == "unreachable-ratio":
        args, words = ["compress", "--ratio", "1e9", "--out", out], ["unreachable"]
    elif case == "plot-nowhere":
        path, _, _ = _model_file(tmp_path)
        args, words = ["inspect", path, "--plot", tmp_path / "no" / "such" / "p.png"], ["not a writable directory"]
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args, words = ["compress", "--resume", "--out", out], ["holds no torchtn compress run"]
    before = _tree(tmp_path)
    proc, seconds = _run_limited(args, memory_limit, tmp_path)
    _assert_refused(proc, words)
    assert _tree(tmp_path) == before and seconds < 30


def test_resume_with_changed_settings_is_refused_before_writing(tmp_path):
    from torchtn.cli import main

    out = tmp_path / "run"
    base = ["compress", "--epochs", "1", "--finetune-epochs", "1", "--rank", "2", "--no-progress", "--out", str(out)]
    assert main(base) == 0
    before = _tree(out)
    for change, word in ((["--seed", "3"], "seed"), (["--lr", "0.01"], "lr"), (["--hidden", "64"], "hidden")):
        proc = subprocess.run([sys.executable, "-m", "torchtn.cli", *base, "--resume", *change], capture_output=True,
                              text=True, cwd=tmp_path)
        _assert_refused(proc, ["other settings", word])
        assert _tree(out) == before
    # a damaged checkpoint is refused with one line too
    ckpt = out / "checkpoints" / "rank-2.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    (out / ".rank-2.safetensors.abc.tmp").write_bytes(b"left by a kill")
    proc = subprocess.run([sys.executable, "-m", "torchtn.cli", *base, "--resume"], capture_output=True, text=True,
                          cwd=tmp_path)
    _assert_refused(proc, ["rank-2.safetensors"])
