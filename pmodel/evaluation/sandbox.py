"""Run untrusted Python (model-written code) in a separate, confined process.

The evaluating process never executes generated code: :func:`run_python` writes the program into
a fresh temporary directory and starts a new interpreter (``python -I``, a minimal environment)
running :mod:`pmodel.evaluation._sandbox_child`, which confines it before running it:

* **separate process** in its own session; stdout / stderr go to files the parent reads back
  (truncated to ``output_bytes``);
* **namespaces** (Linux, where the kernel allows unprivileged user namespaces): new user, mount,
  network and PID namespaces. The network namespace has only a loopback device, which is down:
  no connection to anything, including the evaluating machine's localhost. Every mount is
  read-only except the temporary directory. The program runs as an unprivileged uid (``nobody``
  when the evaluator is root) inside a nested user namespace, so it cannot remount anything;
* **resource limits** (``setrlimit``): CPU seconds, address space, open files, processes, file
  size, no core dumps;
* **wall-clock timeout**: the supervisor kills the PID namespace's init, and the kernel kills
  every process in it (a fork bomb included); the evaluator then kills the session's process
  group as a second line.

What it does **not** do: no seccomp syscall filter, no cgroup (memory is bounded per process by
the address-space limit, so ``processes x memory_bytes`` is the worst case), and the program can
read any file the unprivileged uid can read. Where namespaces are unavailable the run is refused
(:class:`SandboxUnavailable`) unless ``allow_unsandboxed=True``, which keeps the separate
process, the temporary directory, the limits and the timeout but has **no** network or filesystem
isolation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SandboxLimits", "SandboxResult", "SandboxUnavailable", "run_python", "sandbox_available"]

_CHILD = Path(__file__).with_name("_sandbox_child.py")
_SETUP_EXIT = 97
_TIMEOUT_EXIT = 124


class SandboxUnavailable(RuntimeError):
    """The kernel refused the namespaces the sandbox needs (and unsandboxed runs were not allowed)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Limits for one sandboxed run.

    Attributes:
      timeout_s: wall-clock seconds before the whole process tree is killed.
      cpu_s: CPU seconds (``RLIMIT_CPU``; SIGKILL one second after).
      memory_bytes: address space per process (``RLIMIT_AS``).
      open_files: file descriptors per process (``RLIMIT_NOFILE``).
      processes: processes of the sandbox's uid in its namespace (``RLIMIT_NPROC``), the program
        itself included.
      file_size_bytes: largest file the program may write (``RLIMIT_FSIZE``; also bounds its output).
      output_bytes: stdout / stderr bytes kept in the result.
    """

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 2 << 30
    open_files: int = 64
    processes: int = 16
    file_size_bytes: int = 16 << 20
    output_bytes: int = 64 << 10

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"SandboxLimits.{f.name} must be > 0, got {getattr(self, f.name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxResult:
    """What a sandboxed run did.

    Attributes:
      status: ``"passed"`` (exit 0), ``"failed"`` (non-zero exit: an exception, a failed assert,
        a limit hit) or ``"timed out"``.
      returncode: the program's exit code (128 + signal number when killed by a signal).
      stdout, stderr: the program's output (truncated).
      wall_s: seconds from start to the end of cleanup.
      isolated: whether the namespaces were in place.
    """

    status: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    isolated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _read(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    return text + ("\n[... truncated]" if len(data) > limit else "")


def _run(code: str, limits: SandboxLimits, isolate: bool) -> SandboxResult:
    t0 = time.perf_counter()
    ctl = Path(tempfile.mkdtemp(prefix="pmodel-sbx-ctl-"))   # the evaluator's: config and output
    work = Path(tempfile.mkdtemp(prefix="pmodel-sbx-"))       # the program's: its only writable dir
    try:
        work.chmod(0o700)
        prog = work / "program.py"
        prog.write_text(code, encoding="utf-8")
        cfg = {"workdir": str(work), "program": str(prog), "isolate": isolate,
               "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes,
               "open_files": limits.open_files, "processes": limits.processes,
               "file_size_bytes": limits.file_size_bytes, "stage": str(ctl / "stage"),
               "expose": sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
                                 str(_CHILD.parent.resolve())})}
        (ctl / "config.json").write_text(json.dumps(cfg))
        ctl.chmod(0o755)
        (ctl / "config.json").chmod(0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        with open(ctl / "stdout", "wb") as out, open(ctl / "stderr", "wb") as err:
            p = subprocess.Popen([sys.executable, "-I", str(_CHILD), str(ctl / "config.json")], cwd=str(work),
                                 env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=limits.timeout_s + 5.0)  # the supervisor enforces timeout_s itself
            except subprocess.TimeoutExpired:
                rc = _TIMEOUT_EXIT
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # whatever is left in the session
                except ProcessLookupError:
                    pass
                p.wait()
        stdout = _read(ctl / "stdout", limits.output_bytes)
        stderr = _read(ctl / "stderr", limits.output_bytes)
        if rc == _SETUP_EXIT and "SANDBOX-SETUP:" in stderr:
            raise SandboxUnavailable(stderr.split("SANDBOX-SETUP:", 1)[1].strip().splitlines()[0])
        status = "passed" if rc == 0 else "timed out" if rc == _TIMEOUT_EXIT else "failed"
        return SandboxResult(status=status, returncode=rc, stdout=stdout, stderr=stderr,
                             wall_s=time.perf_counter() - t0, isolated=isolate)
    finally:
        shutil.rmtree(ctl, ignore_errors=True)
        _rmtree_any_owner(work)


def _rmtree_any_owner(path: Path) -> None:
    # Files the program wrote belong to the sandbox uid; as root we can remove them, otherwise
    # they belong to us through the user namespace mapping.
    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


def sandbox_available() -> str | None:
    """None when the namespaces the sandbox needs can be created here, else the kernel's reason."""
    try:
        _run("pass\n", SandboxLimits(timeout_s=20.0), True)
    except SandboxUnavailable as e:
        return str(e)
    return None


def run_python(code: str, *, limits: SandboxLimits = SandboxLimits(), allow_unsandboxed: bool = False
               ) -> SandboxResult:
    """Run the Python program ``code`` in the sandbox.

    Args:
      code: a complete program; it passes when it exits with status 0.
      limits: the :class:`SandboxLimits`.
      allow_unsandboxed: where the kernel refuses the namespaces, run with only the separate process,
        temporary directory, limits and timeout (no network or filesystem isolation) instead of
        raising :class:`SandboxUnavailable`.

    Returns:
      A :class:`SandboxResult`.
    """
    try:
        return _run(code, limits, True)
    except SandboxUnavailable:
        if not allow_unsandboxed:
            raise
    return _run(code, limits, False)
