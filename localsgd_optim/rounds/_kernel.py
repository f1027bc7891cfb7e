"""The compressors' fused CPU encode/decode (``_codec.c``: chunked and int8), compiled on first use and cached.

Eager PyTorch spends 10 to 20 passes over a bucket to encode it and 5 per rank to decode it; the C
file does each in one (see its header for why it agrees with the eager path bit for bit, and the one
rare exception). It is plain C, no Python or torch headers: the system's C compiler builds it in
well under a second, into ``$LOCALSGD_OPTIM_CACHE`` (default ``~/.cache/localsgd_optim``), keyed by
the source, the flags, the compiler and the CPU (it is built for the CPU it runs on), and loaded
with :mod:`ctypes`. The kernels run on one thread (``ctypes`` releases the GIL during a call).

Where there is no compiler (or ``LOCALSGD_OPTIM_KERNELS=0``), the rounds run the eager path, with one
warning; CUDA tensors always do.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["codec", "pointer"]

SOURCE = Path(__file__).with_name("_codec.c")
#: -ffp-contract=off: no fused multiply-adds (the eager path rounds every product); no -ffast-math
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fno-strict-aliasing", "-fPIC", "-shared", "-std=c11")

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lsgd_dense_encode": (_P, _P, _F32, _I64, _I64, _P, _P, _INT, _F32, _INT, _P, _P, _P, _P),
    "lsgd_dense_decode": (_P, _P, _I64, _I64, _P, _P, _INT, _P, _P, _F32),
    "lsgd_topk_encode": (_P, _P, _F32, _I64, _P, _P, _P, _I64, _INT, _F32, _INT, _INT, _P, _P, _P, _P, _P),
    "lsgd_topk_decode": (_I64, _P, _P, _INT, _INT, _P, _P, _P, _P, _I64, _P, _P),
    "lsgd_int8_encode": (_P, _P, _F32, _I64, _P, _P, _INT, _P, _P),
    "lsgd_int8_decode": (_P, _P, _I64, _P, _P, _P, _F32),
}

_loaded: dict[str, Any] = {}


def codec(device: torch.device) -> Any | None:
    """The compiled kernels for tensors on ``device``, or None (not a CPU, disabled, or no compiler)."""
    if device.type != "cpu" or os.environ.get("LOCALSGD_OPTIM_KERNELS", "1") == "0":
        return None
    if "lib" not in _loaded:
        _loaded["lib"] = _load()
    return _loaded["lib"]


def pointer(t: torch.Tensor | None) -> int | None:
    """A contiguous tensor's first element's address (None passes NULL)."""
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu", "the C kernels take contiguous CPU tensors"
    return t.data_ptr()


def _load() -> Any | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        if compiler is None:
            raise OSError("no C compiler on PATH (cc, gcc or clang; or set CC)")
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        warnings.warn(f"localsgd_optim: the compressors' C kernels could not be built ({e}); compressed rounds run "
                      "the eager PyTorch path, the same arithmetic but several times slower. Install a C compiler "
                      "(or set CC) to build them; LOCALSGD_OPTIM_KERNELS=0 silences this", stacklevel=3)
        return None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(args), (ctypes.c_int if name == "lsgd_topk_encode" else None)
    return lib


def _cpu() -> str:
    """What the build depends on besides the source: the machine and its instruction set."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache() -> Path:
    """``$LOCALSGD_OPTIM_CACHE``, else ``~/.cache/localsgd_optim``, else (no home, or not writable) a folder in
    the temp dir."""
    given, user = os.environ.get("LOCALSGD_OPTIM_CACHE"), getattr(os, "getuid", lambda: 0)()
    try:
        home = [Path.home() / ".cache" / "localsgd_optim"]
    except RuntimeError:  # no HOME and no passwd entry
        home = []
    for folder in [Path(given)] if given else home + [Path(tempfile.gettempdir()) / f"localsgd_optim-{user}"]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError(f"no writable folder for the build: {given or Path.home() / '.cache'} (set LOCALSGD_OPTIM_CACHE)")


def _build(compiler: str) -> Path:
    """The library built by ``compiler`` (a command: ``CC="ccache gcc"`` is two words) from :data:`SOURCE`."""
    source, command = SOURCE.read_bytes(), shlex.split(compiler)
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), version.encode(),
                                     _cpu().encode()])).hexdigest()[:16]
    cache = _cache()
    path = cache / f"codec-{key}.so"
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # built aside, then renamed: ranks may race here
    os.close(fd)
    try:
        for flags in (FLAGS, tuple(f for f in FLAGS if f != "-march=native")):  # (a compiler without it)
            done = subprocess.run([*command, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # (mkstemp made it the owner's only: a shared cache serves everyone)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
