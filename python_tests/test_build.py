"""What was built, and how the package behaves without it."""
import os
import subprocess
import sys

import pytest
import torch

from effssl_kernels import _backend


def test_extension_built():
    assert _backend.HAS_EXT, _backend._EXT_ERROR


@pytest.mark.skipif(os.environ.get("EFFSSL_EXPECT_CUDA") != "1", reason="EFFSSL_EXPECT_CUDA=1 not set (CI sets it)")
def test_cuda_kernels_compiled_in():
    # CI builds the .cu sources without a GPU so they never rot: check they really are in _C.
    assert _backend.HAS_CUDA_KERNELS
    assert "9.0" in _backend._C.cuda_archs()


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "effssl_kernels.info"], capture_output=True, text=True, check=True).stdout
    assert "compiled extension (_C)" in out and "block_match on cpu" in out
    fields = {line[:24].strip(): line[25:] for line in out.strip().splitlines()}  # "{key:24s} {value}"
    assert fields["other kernels on cpu"] in ("cpp", "reference", "triton")
    assert fields["stride-1 tile convs"].startswith(("halo_gather + cuDNN", "Triton implicit GEMM"))
    if not _backend.HAS_CUDA_KERNELS:
        assert fields["built for archs"] == "none (CPU-only build)"
    if not torch.cuda.is_available():
        assert fields["GPU"].startswith("none")


def test_info_shows_bad_settings():
    # the diagnostic tool reports a wrong EFFSSL_BACKEND or EFFSSL_TILE_CONV instead of dying on it
    env = {**os.environ, "EFFSSL_BACKEND": "bogus", "EFFSSL_TILE_CONV": "winograd"}
    out = subprocess.run([sys.executable, "-m", "effssl_kernels.info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "EFFSSL_BACKEND           bogus" in out.stdout
    assert "block_match on cpu       unavailable (EFFSSL_BACKEND='bogus'" in out.stdout
    assert "other kernels on cuda    unavailable (EFFSSL_BACKEND='bogus'" in out.stdout
    assert "stride-1 tile convs      invalid (EFFSSL_TILE_CONV='winograd'" in out.stdout


def test_import_without_extension_gives_rebuild_hint():
    code = (
        "import sys; sys.modules['effssl_kernels._C'] = None\n"
        "import torch, effssl_kernels as ek\n"
        "assert not ek._backend.HAS_EXT\n"
        "try:\n"
        "    ek.block_match(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), 4, 1)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install --no-build-isolation' in str(e), e\n"
        "    print('ok')\n"
    )
    env = {**os.environ, "EFFSSL_BACKEND": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ok", out.stderr


def test_import_before_torch_loads_the_extension():
    # _C links against libc10: the package must load torch before it, whatever the user imports first.
    code = "import effssl_kernels as ek; assert ek._backend.HAS_EXT, ek._backend._EXT_ERROR; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.stdout.strip() == "ok", out.stderr


def test_backend_choice(monkeypatch):
    # Triton-only ops run Triton on CUDA tensors whatever EFFSSL_BACKEND names (but 'reference').
    for name in ("auto", "cuda", "triton"):
        monkeypatch.setenv("EFFSSL_BACKEND", name)
        assert _backend.choose("cuda", cuda_kernel=False) == "triton"
    monkeypatch.setenv("EFFSSL_BACKEND", "reference")
    assert _backend.choose("cuda", cuda_kernel=False) == "reference"
    assert _backend.choose("cpu") == "reference"
    monkeypatch.setenv("EFFSSL_BACKEND", "auto")
    assert _backend.choose("cpu") == "cpp"
    monkeypatch.setenv("EFFSSL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EFFSSL_BACKEND"):
        _backend.choose("cpu")


def test_cpu_tensors_run_triton_only_under_the_interpreter(monkeypatch):
    # EFFSSL_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1: compiled Triton has no CPU target
    monkeypatch.setenv("EFFSSL_BACKEND", "triton")
    monkeypatch.setattr(_backend, "HAS_TRITON", True)
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    for cuda_kernel in (True, False):
        with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
            _backend.choose("cpu", cuda_kernel)
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", True)
    assert _backend.choose("cpu") == "triton"


@pytest.mark.parametrize("triton", [True, False])
def test_backend_without_cuda_kernels_names_the_way_out(monkeypatch, triton):
    # a build without CUDA kernels: EFFSSL_BACKEND=cuda on CUDA tensors says what to use instead,
    # and blames Triton only when Triton is really missing
    monkeypatch.setattr(_backend, "HAS_CUDA_KERNELS", False)
    monkeypatch.setattr(_backend, "HAS_TRITON", triton)
    monkeypatch.setenv("EFFSSL_BACKEND", "cuda")
    msg = "EFFSSL_BACKEND=auto or triton" if triton else "Triton is not installed"
    with pytest.raises(RuntimeError, match=msg):
        _backend.choose("cuda")
    monkeypatch.setenv("EFFSSL_BACKEND", "auto")
    if triton:
        assert _backend.choose("cuda") == "triton"


def test_sdist_holds_every_source_and_header(tmp_path):
    # setuptools puts only the extension's sources in an sdist (and which ones depends on
    # EFFSSL_SKIP_CUDA): without MANIFEST.in the headers were missing and it could not build
    import shutil
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    shutil.copytree(os.path.join(root, "csrc"), src / "csrc")
    shutil.copytree(os.path.join(root, "effssl_kernels"), src / "effssl_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(root, f), src / f)
    env = {**os.environ, "EFFSSL_SKIP_CUDA": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, env=env,
                   check=True, capture_output=True)
    (sdist,) = (tmp_path / "dist").iterdir()
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, "csrc"))
            for f in fs if f.endswith((".h", ".cpp", ".cu"))}
    assert want and not want - names, sorted(want - names)
    assert {"setup.py", "pyproject.toml", "README.md", "effssl_kernels/__init__.py"} <= names
