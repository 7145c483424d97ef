"""Give concurrent jobs on one multi-GPU machine disjoint GPUs.

Snakemake's ``--resources gpu=8`` only *counts* GPUs: it starts up to eight 1-GPU jobs (or two
4-GPU trainings) at once but does not tell any of them *which* GPUs are theirs, so without
``CUDA_VISIBLE_DEVICES`` they all pile onto GPU 0 (or GPUs 0..3) and run out of memory. This
launcher claims N free GPUs, sets ``CUDA_VISIBLE_DEVICES`` to them and runs the command::

    python -m simlm_core.gpu_slots --gpus N -- <command> [args...]

Nothing is claimed, and the command runs unchanged, when N is 0, when ``CUDA_VISIBLE_DEVICES``
is already set (the user chose, or a scheduler did), when ``SLURM_JOB_ID`` is set (SLURM sets
``CUDA_VISIBLE_DEVICES`` per job itself), or when the machine has fewer than 2 GPUs (nothing to
spread over; a warning is printed if the job asks for more GPUs than exist).

GPU count: ``SIMLM_GPU_COUNT`` if set (tests; or restrict the pipeline to GPUs 0..k-1), else the
number of ``nvidia-smi --list-gpus`` lines, else 0.

Claiming: GPU ``i`` is held by whoever holds an exclusive ``flock`` on ``<lock dir>/gpu<i>.lock``
(lock dir: ``SIMLM_GPU_LOCK_DIR``, default ``/tmp/simlm-gpu-locks-<uid>``, created mode 0o700).
Indices are tried in order and the first N free ones are taken; if fewer than N are free, the
partial claim is released (so two jobs each holding half of what they need cannot deadlock), and
the claim is retried after a short, jittered sleep (jitter so two such jobs do not stay in
lockstep). A job needing many GPUs can therefore be overtaken by 1-GPU jobs for a while; with
Snakemake's own ``gpu`` accounting the total asked never exceeds the machine, so it gets them as
soon as the running jobs finish.

Holding: the lock file descriptors are made inheritable and the launcher ``exec``s the command,
so the locks live in the command's own process (same PID, so Snakemake's kill/exit status still
reach the real job) and the kernel drops them when that process exits, however it ends (normal
exit, crash, SIGKILL). There is no wrapper process to forward signals or leak locks. Children the
command forks inherit the descriptors too, so a GPU stays claimed while any of them lives
(conservative: they may still be using it). Python's ``subprocess``/``multiprocessing`` close
inherited descriptors by default, so torchrun's workers do not extend the claim.

Stale locks cannot happen: a ``flock`` belongs to the open file, not to the file on disk, so a
lock file left behind by a dead process is just an empty file that the next claimer locks at
once. Nothing needs cleaning up.

The lock dir must be on a local filesystem (``/tmp``): ``flock`` on NFS and other shared
filesystems is emulated or not enforced between machines, and GPUs are per machine anyway.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from typing import Mapping, Sequence

_PREFIX = "gpu_slots:"


def default_lock_dir() -> str:
    """``$SIMLM_GPU_LOCK_DIR``, else ``/tmp/simlm-gpu-locks-<uid>`` (per user, so no other user
    can create or hold our lock files)."""
    return os.environ.get("SIMLM_GPU_LOCK_DIR") or f"/tmp/simlm-gpu-locks-{os.getuid()}"


def detect_gpu_count() -> int:
    """GPUs on this machine: ``$SIMLM_GPU_COUNT`` if set, else ``nvidia-smi --list-gpus`` lines,
    else 0 (no nvidia-smi, or it fails, e.g. no driver)."""
    env = os.environ.get("SIMLM_GPU_COUNT")
    if env is not None and env.strip() != "":
        try:
            count = int(env)
        except ValueError:
            raise ValueError(f"SIMLM_GPU_COUNT must be an integer >= 0, got {env!r}") from None
        if count < 0:
            raise ValueError(f"SIMLM_GPU_COUNT must be an integer >= 0, got {env!r}")
        return count
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    # Lines look like "GPU 0: NVIDIA H100 ... (UUID: GPU-...)"; MIG instances are indented
    # "  MIG 1g.10gb Device 0: ..." lines under their GPU and are not counted.
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _ensure_lock_dir(lock_dir: str) -> None:
    """Create the lock dir (0o700) if missing; refuse a default dir that another user owns."""
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    st = os.lstat(lock_dir)
    # Only the default /tmp path is checked: someone else could have pre-created it (or a symlink
    # with that name) to hold our locks or see our jobs. An explicit SIMLM_GPU_LOCK_DIR may be a
    # deliberately shared dir, which is the user's call.
    if "SIMLM_GPU_LOCK_DIR" not in os.environ and lock_dir == default_lock_dir():
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(
                f"GPU lock dir {lock_dir} is not a directory owned by uid {os.getuid()}; "
                "remove it or set SIMLM_GPU_LOCK_DIR"
            )


def _try_lock(path: str) -> int | None:
    """Open ``path`` and take an exclusive non-blocking flock; the fd, or None if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def release(fds: Sequence[int]) -> None:
    """Release claimed GPUs: closing the descriptor drops its flock."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed: nothing held through it any more


def claim_gpus(
    n: int, count: int | None = None, lock_dir: str | None = None, poll_s: float = 1.0
) -> tuple[list[int], list[int]]:
    """Claim ``n`` distinct GPU indices out of ``range(count)``, waiting until that many are free.

    Returns ``(indices, fds)``: the claimed indices in increasing order and the open lock file
    descriptors holding them (close-on-exec; pass them to :func:`release`, or make them
    inheritable before an exec so the command holds them). ``count`` defaults to
    :func:`detect_gpu_count`, ``lock_dir`` to :func:`default_lock_dir`. Retries every ``poll_s``
    seconds (jittered); never busy-spins. Raises ValueError if ``n`` exceeds ``count``, as the
    wait could never end.
    """
    if count is None:
        count = detect_gpu_count()
    if n < 0:
        raise ValueError(f"cannot claim a negative number of GPUs ({n})")
    if n > count:
        raise ValueError(f"asked for {n} GPU(s) but this machine has {count}")
    if n == 0:
        return [], []
    lock_dir = lock_dir or default_lock_dir()
    _ensure_lock_dir(lock_dir)
    announced = False
    while True:
        indices: list[int] = []
        fds: list[int] = []
        try:
            for i in range(count):
                fd = _try_lock(os.path.join(lock_dir, f"gpu{i}.lock"))
                if fd is not None:
                    indices.append(i)
                    fds.append(fd)
                    if len(indices) == n:
                        return indices, fds
        except BaseException:
            release(fds)
            raise
        # Too few free: give back the partial claim, so that two jobs each holding part of what
        # they need cannot block each other forever, then wait.
        release(fds)
        if not announced:
            print(
                f"{_PREFIX} waiting for {n} free GPU(s) out of {count} (lock dir {lock_dir})",
                file=sys.stderr,
                flush=True,
            )
            announced = True
        time.sleep(poll_s * random.uniform(0.5, 1.5))


def _exec(cmd: Sequence[str], env: dict[str, str]) -> None:
    """Replace this process by ``cmd``; exit 127 (shell convention) if it cannot be started."""
    try:
        os.execvpe(cmd[0], list(cmd), env)
    except OSError as e:
        print(f"{_PREFIX} cannot run {cmd[0]!r}: {e}", file=sys.stderr, flush=True)
        sys.exit(127 if isinstance(e, FileNotFoundError) else 126)


def someone_else_decides(n: int, env: Mapping[str, str]) -> bool:
    """No claim to make: the job needs no GPU, or its GPUs are already chosen (a preset
    ``CUDA_VISIBLE_DEVICES``: the user or a scheduler; ``SLURM_JOB_ID``: SLURM sets it per job)."""
    return n == 0 or "CUDA_VISIBLE_DEVICES" in env or bool(env.get("SLURM_JOB_ID"))


_HELD: list[int] = []
"""Lock descriptors held by this process for :func:`claim_for_this_process` (closed at exit)."""


def claim_for_this_process(n: int, poll_s: float = 1.0) -> list[int]:
    """:func:`main`'s claim for code that runs in this process (a Snakemake ``script:`` rule): the
    same rules for when nothing is claimed; otherwise claims ``n`` GPUs, sets this process's
    ``CUDA_VISIBLE_DEVICES`` (call it before anything initialises CUDA) and holds the locks until
    the process exits. Returns the claimed indices ([] when nothing was claimed). Raises
    ValueError when the machine has fewer GPUs than ``n`` (and at least 2)."""
    n = int(n or 0)
    if someone_else_decides(n, os.environ):
        return []
    count = detect_gpu_count()
    if count <= 1:
        return []
    indices, fds = claim_gpus(n, count=count, poll_s=poll_s)
    _HELD.extend(fds)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    print(f"{_PREFIX} claimed GPU(s) {os.environ['CUDA_VISIBLE_DEVICES']} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    return indices


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``--gpus N -- <command> [args...]``; never returns (execs or exits)."""
    parser = argparse.ArgumentParser(
        prog="python -m simlm_core.gpu_slots",
        description="Claim N free GPUs, set CUDA_VISIBLE_DEVICES to them, exec the command.",
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the command needs (>= 0)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between claim retries")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command [args...]")
    args = parser.parse_args(argv)
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("no command given (usage: --gpus N -- command [args...])")
    if args.gpus < 0:
        parser.error(f"--gpus must be >= 0, got {args.gpus}")

    env = dict(os.environ)
    n = args.gpus
    if someone_else_decides(n, env):
        _exec(cmd, env)  # someone else decided (or nothing to decide)

    try:
        count = detect_gpu_count()
    except ValueError as e:
        parser.error(str(e))
    if count <= 1:
        if n > count:
            print(
                f"{_PREFIX} WARNING: the job asks for {n} GPU(s) but this machine has {count}; "
                "running it unchanged",
                file=sys.stderr,
                flush=True,
            )
        _exec(cmd, env)
    if n > count:
        # Waiting would never end, and running anyway would overlap other jobs' GPUs (and
        # `torchrun --nproc_per_node N` would fail on a missing device): stop with a clear reason.
        print(
            f"{_PREFIX} ERROR: the job asks for {n} GPU(s) but this machine has {count} "
            "(lower resources.train_gpus / encode_gpus, or check SIMLM_GPU_COUNT)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)

    indices, fds = claim_gpus(n, count=count, poll_s=args.poll)
    for fd in fds:
        os.set_inheritable(fd, True)  # the exec'd command holds the locks until it exits
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    print(
        f"{_PREFIX} claimed GPU(s) {env['CUDA_VISIBLE_DEVICES']} (pid {os.getpid()}) "
        f"for: {' '.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    _exec(cmd, env)


if __name__ == "__main__":
    main()
