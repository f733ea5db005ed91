"""The sandbox supervisor: run as ``python -I _sandbox_child.py CONFIG.json`` by :mod:`.sandbox`.

Never imported by the evaluating process. It is a fresh interpreter, so the untrusted program
never shares memory, file descriptors or threads with the evaluator.

With ``isolate`` (the default) it:

1. started as root: makes a new mount namespace (as real root, so the program can never remount
   it), exposes the interpreter's prefixes to ``nobody`` (a closed ancestor such as ``/root`` is
   covered by a tmpfs with only the prefixes bound back), remounts every mount read-only except
   the run's temporary directory, drops to ``nobody`` (root is exempt from ``RLIMIT_NPROC``) and
   enters new user, network and PID namespaces. Started as another user: enters new user, mount,
   network and PID namespaces and does the same remounts there;
2. forks the namespace's init (PID 1, this file's trusted code) which forks the program
   (PID 2); the program's process applies the resource limits, enters one more user namespace (so
   it holds no capability over the namespaces above) and runs the program. When init exits, the
   kernel kills every process left in the PID namespace;
3. kills init (hence the namespace) when the wall-clock timeout passes.

Exit status of the supervisor: the program's (0 = passed); 124 = timed out; 97 = the sandbox
could not be set up (the reason on stderr, prefixed ``SANDBOX-SETUP:``).
"""
import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
NOBODY = 65534
_FLAG_OF = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}


class SetupError(Exception):
    pass


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(e)}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unescape(s):
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit() and len(s[i + 1:i + 4]) == 3:
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _mounts():
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fstype = parts[parts.index("-") + 1]
            res.append((_unescape(parts[4]), parts[5].split(","), fstype))
    return res


def _mount_fn(libc):
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return mount


def _read_only_except(mount, workdir):
    """Bind ``workdir`` onto itself, then make every mount read-only except it."""
    wd = os.fsencode(workdir)
    _check(mount(wd, wd, None, MS_BIND | MS_REC, None), f"bind-mount {workdir}")
    for mp, opts, fstype in _mounts():
        # procfs stays as is: the user-namespace maps are written through it, and what it lets
        # an unprivileged uid write is its own process's state.
        if mp == workdir or fstype == "proc":
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in opts:
            flags |= _FLAG_OF.get(o, 0)
        if mount(None, os.fsencode(mp), None, flags, None) != 0:
            e = ctypes.get_errno()
            # A mount point hidden under another mount cannot be reached (ENOENT), so cannot be
            # written either; any other failure is a mount we could not protect: refuse.
            if e != 2:
                raise SetupError(f"remount {mp} read-only: {os.strerror(e)}")
    _check(mount(None, wd, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV, None), f"keep {workdir} writable")


def _closed_ancestor(path):
    """The top-most ancestor of ``path`` that others cannot enter (e.g. /root, mode 0700), or None."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    cur = ""
    for p in parts:
        cur += os.sep + p
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _expose(mount, dirs, stage):
    """Make ``dirs`` (the interpreter's prefixes) readable by an unprivileged uid, hiding their
    closed ancestor's other contents: the ancestor is bind-mounted aside, a tmpfs covers it and
    only ``dirs`` are bound back into the tmpfs."""
    by_anc = {}
    for d in dirs:
        a = _closed_ancestor(d)
        if a is not None:
            by_anc.setdefault(a, []).append(d)
    for i, (anc, ds) in enumerate(sorted(by_anc.items())):
        st = os.path.join(stage, str(i))
        os.makedirs(st, exist_ok=True)
        _check(mount(os.fsencode(anc), os.fsencode(st), None, MS_BIND | MS_REC, None), f"bind {anc} aside")
        _check(mount(b"tmpfs", os.fsencode(anc), b"tmpfs", 0, b"mode=0755"), f"cover {anc} with a tmpfs")
        for d in ds:
            rel = os.path.relpath(d, anc)
            target = os.path.join(anc, rel)
            os.makedirs(target, mode=0o755, exist_ok=True)
            _check(mount(os.fsencode(os.path.join(st, rel)), os.fsencode(target), None, MS_BIND | MS_REC, None),
                   f"expose {d}")


def _enter_namespaces(libc, cfg):
    workdir = cfg["workdir"]
    mount = _mount_fn(libc)
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        # Root is exempt from RLIMIT_NPROC and owns most files: the program runs as nobody. The
        # mount namespace is made here, by real root (so the unprivileged program can never
        # remount it); the interpreter's prefixes are exposed to nobody.
        _check(libc.unshare(CLONE_NEWNS), "unshare(mount namespace)")
        _check(mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
        _expose(mount, cfg["expose"], cfg["stage"])
        _read_only_except(mount, workdir)
        os.chown(workdir, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        libc.prctl(PR_SET_DUMPABLE, 1)  # a uid change clears it; /proc/self/* must stay ours
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID), "unshare(user, network, pid namespaces)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {NOBODY} 1")
        _write("/proc/self/gid_map", f"0 {NOBODY} 1")
        return
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID),
           "unshare(user, mount, network, pid namespaces)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    _check(mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    _read_only_except(mount, workdir)


def _limits(cfg):
    cpu = int(cfg["cpu_s"])
    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),
                            (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
                            (resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"]),
                            (resource.RLIMIT_NPROC, cfg["processes"], cfg["processes"]),
                            (resource.RLIMIT_FSIZE, cfg["file_size_bytes"], cfg["file_size_bytes"]),
                            (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(res, (soft, hard))


def _run_program(path):
    sys.argv = [path]
    sys.path.insert(0, os.path.dirname(path))
    with open(path, encoding="utf-8") as f:
        src = f.read()
    code = compile(src, path, "exec")
    g = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    exec(code, g)  # noqa: S102 - this *is* the sandboxed process


def _program(cfg, libc, isolated):
    """In the program's process: limits, drop namespace privileges, run."""
    try:
        if isolated:
            # A nested user namespace: no capability over the mount / network namespaces above.
            _check(libc.unshare(CLONE_NEWUSER), "unshare(user namespace) to drop privileges")
        _limits(cfg)
    except BaseException as e:  # noqa: BLE001
        sys.stderr.write(f"SANDBOX-SETUP: {e}\n")
        os._exit(97)
    import traceback
    try:
        _run_program(cfg["program"])
    except SystemExit as e:
        sys.stdout.flush()
        sys.stderr.flush()
        code = e.code
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _wait(pid, deadline):
    """Exit status of ``pid`` or None at the deadline."""
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _init(cfg, libc, isolated):
    """PID 1 of the new namespace: run the program, reap, exit with its status."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the supervisor dies -> so does the namespace
    pid = os.fork()
    if pid == 0:
        _program(cfg, libc, isolated)
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if got == pid:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    libc = _libc()
    os.chdir(cfg["workdir"])
    isolated = bool(cfg["isolate"])
    if isolated:
        try:
            _enter_namespaces(libc, cfg)
        except (SetupError, OSError) as e:
            sys.stderr.write(f"SANDBOX-SETUP: {e}\n")
            sys.stderr.flush()
            os._exit(97)
        os.chdir(cfg["workdir"])  # the cwd opened before the bind mount points to the read-only view
    deadline = time.monotonic() + float(cfg["timeout_s"])
    pid = os.fork()
    if pid == 0:
        _init(cfg, libc, isolated)
    code = _wait(pid, deadline)
    if code is None:
        os.kill(pid, signal.SIGKILL)  # init: the kernel kills the whole PID namespace with it
        os.waitpid(pid, 0)
        os._exit(124)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
