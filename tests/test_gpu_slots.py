"""GPU slot launcher (simlm_core.gpu_slots): CPU only, GPUs faked with SIMLM_GPU_COUNT."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from simlm_core import gpu_slots
from simlm_core.gpu_slots import claim_gpus, release

PRINT_CVD = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'), flush=True)"


def _env(lock_dir, count: int | None = 4, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SIMLM_GPU_COUNT"):
        env.pop(key, None)
    env["SIMLM_GPU_LOCK_DIR"] = str(lock_dir)
    if count is not None:
        env["SIMLM_GPU_COUNT"] = str(count)
    env.update(extra)
    return env


def _launch(gpus: int, code: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simlm_core.gpu_slots", "--gpus", str(gpus), "--",
         sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=60, **kw,
    )


def _indices(line: str) -> list[int]:
    return [int(x) for x in line.strip().split(",")]


def test_two_claims_are_disjoint(tmp_path):
    a, fa = claim_gpus(2, count=4, lock_dir=str(tmp_path))
    b, fb = claim_gpus(2, count=4, lock_dir=str(tmp_path))
    try:
        assert len(set(a)) == 2 and len(set(b)) == 2
        assert set(a).isdisjoint(b)
        assert set(a) | set(b) == {0, 1, 2, 3}
    finally:
        release(fa + fb)
    # Released: all four are free again, at once.
    c, fc = claim_gpus(4, count=4, lock_dir=str(tmp_path), poll_s=10)
    release(fc)
    assert c == [0, 1, 2, 3]


def test_claim_waits_for_a_release_and_takes_the_freed_gpu(tmp_path, capfd):
    held, fds = claim_gpus(4, count=4, lock_dir=str(tmp_path))
    assert held == [0, 1, 2, 3]
    timer = threading.Timer(0.5, release, args=([fds[2]],))  # frees GPU 2 after 0.5 s
    timer.start()
    try:
        t0 = time.monotonic()
        got, gfd = claim_gpus(1, count=4, lock_dir=str(tmp_path), poll_s=0.05)
        waited = time.monotonic() - t0
    finally:
        timer.join()
        release([fd for i, fd in enumerate(fds) if i != 2])
    release(gfd)
    assert got == [2]
    assert waited >= 0.4
    assert "waiting for 1 free GPU(s)" in capfd.readouterr().err


def test_partial_claim_is_given_back_while_waiting(tmp_path):
    # GPUs 1 and 2 are busy; a job needing 3 waits. Meanwhile it must not sit on 0 and 3, else
    # two jobs each holding part of what they need would block each other forever.
    held, fds = claim_gpus(4, count=4, lock_dir=str(tmp_path))
    release([fds[0], fds[3]])
    result: list[list[int]] = []
    waiter = threading.Thread(
        target=lambda: result.append(claim_gpus(3, count=4, lock_dir=str(tmp_path), poll_s=0.05)),
        daemon=True,
    )
    waiter.start()
    got_one = None
    deadline = time.monotonic() + 5
    while got_one is None and time.monotonic() < deadline:
        time.sleep(0.02)
        got_one = gpu_slots._try_lock(str(tmp_path / "gpu0.lock"))
    assert got_one is not None, "the waiting claim kept GPU 0 locked"
    release([got_one, fds[1], fds[2]])
    waiter.join(timeout=10)
    assert result, "the waiting claim did not finish once GPUs were free"
    got, gfds = result[0]
    release(gfds)
    assert got == [0, 1, 2]


def test_claim_more_than_the_machine_has_raises(tmp_path):
    with pytest.raises(ValueError, match="asked for 5"):
        claim_gpus(5, count=4, lock_dir=str(tmp_path))
    assert claim_gpus(0, count=4, lock_dir=str(tmp_path)) == ([], [])


def test_lock_dir_is_created_private(tmp_path):
    d = tmp_path / "locks"
    _, fds = claim_gpus(1, count=2, lock_dir=str(d))
    release(fds)
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


def test_detect_gpu_count_env(monkeypatch):
    monkeypatch.setenv("SIMLM_GPU_COUNT", "3")
    assert gpu_slots.detect_gpu_count() == 3
    monkeypatch.setenv("SIMLM_GPU_COUNT", "three")
    with pytest.raises(ValueError, match="SIMLM_GPU_COUNT"):
        gpu_slots.detect_gpu_count()


def test_cli_sets_two_distinct_gpus(tmp_path):
    r = _launch(2, PRINT_CVD, _env(tmp_path))
    assert r.returncode == 0, r.stderr
    got = _indices(r.stdout)
    assert len(got) == 2 and len(set(got)) == 2 and set(got) <= {0, 1, 2, 3}
    assert re.search(r"claimed GPU\(s\) \d,\d", r.stderr)


def test_locks_are_held_across_exec(tmp_path):
    env = _env(tmp_path)
    code = PRINT_CVD + "; import time; time.sleep(30)"
    first = subprocess.Popen(
        [sys.executable, "-m", "simlm_core.gpu_slots", "--gpus", "2", "--",
         sys.executable, "-c", code],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = first.stdout.readline()  # printed by the exec'd command, so the claim is done
        a = _indices(line)
        # exec kept the PID: the locks now belong to the command itself, not to a wrapper.
        assert first.stderr.readline().count(f"pid {first.pid}") == 1
        r = _launch(2, PRINT_CVD, env)
        assert r.returncode == 0, r.stderr
        b = _indices(r.stdout)
        assert set(a).isdisjoint(b) and set(a) | set(b) == {0, 1, 2, 3}
        # The first job still holds its two: only two of four can be claimed now.
        c, cfd = claim_gpus(2, count=4, lock_dir=str(tmp_path))
        release(cfd)
        assert set(c) == set(b)
    finally:
        first.kill()  # SIGKILL: no cleanup code runs, the kernel drops the locks
        first.wait(timeout=30)
        first.stdout.close()
        first.stderr.close()
    got, fds = claim_gpus(4, count=4, lock_dir=str(tmp_path), poll_s=10)
    release(fds)
    assert got == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "gpus, extra, expected",
    [
        (2, {"CUDA_VISIBLE_DEVICES": "7"}, "7"),  # user / scheduler chose
        (2, {"CUDA_VISIBLE_DEVICES": ""}, ""),  # explicitly no GPU is a choice too
        (0, {}, "<unset>"),  # nothing to claim
        (2, {"SLURM_JOB_ID": "123"}, "<unset>"),  # SLURM sets it per job itself
    ],
)
def test_runs_unchanged_without_claiming(tmp_path, gpus, extra, expected):
    lock_dir = tmp_path / "locks"
    r = _launch(gpus, PRINT_CVD, _env(lock_dir, **extra))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    assert not lock_dir.exists()  # no lock taken


@pytest.mark.parametrize("count", [0, 1])
def test_small_machine_runs_unchanged_with_warning(tmp_path, count):
    lock_dir = tmp_path / "locks"
    r = _launch(2, PRINT_CVD, _env(lock_dir, count=count))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "<unset>"
    assert f"asks for 2 GPU(s) but this machine has {count}" in r.stderr
    assert not lock_dir.exists()
    r = _launch(1, PRINT_CVD, _env(lock_dir, count=1))
    assert r.stdout.strip() == "<unset>" and "WARNING" not in r.stderr


def test_more_gpus_than_a_multi_gpu_machine_has_fails_clearly(tmp_path):
    r = _launch(5, PRINT_CVD, _env(tmp_path, count=4))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "asks for 5 GPU(s) but this machine has 4" in r.stderr


@pytest.mark.parametrize("extra, gpus", [({}, 2), ({"CUDA_VISIBLE_DEVICES": "0"}, 2), ({}, 0)])
def test_exit_status_is_passed_through(tmp_path, extra, gpus):
    r = _launch(gpus, "import sys; sys.exit(3)", _env(tmp_path, **extra))
    assert r.returncode == 3, r.stderr


def test_missing_command_exits_127(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "simlm_core.gpu_slots", "--gpus", "1", "--",
         "no-such-command-simlm"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 127
    assert "cannot run" in r.stderr


def test_claim_for_this_process_holds_until_exit(tmp_path):
    """A script rule's in-process claim: CUDA_VISIBLE_DEVICES set in the process, the GPUs held
    while it lives (a launcher meanwhile gets the others) and free once it exits."""
    env = _env(tmp_path, count=3)
    code = ("import os, sys, time; from simlm_core.gpu_slots import claim_for_this_process as c; "
            "print(c(2), os.environ.get('CUDA_VISIBLE_DEVICES', '-'), flush=True); time.sleep(1.5)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = holder.stdout.readline().split()
        assert first[0] == "[0," and first[2] == "0,1"
        other = _launch(1, PRINT_CVD, env)
        assert other.stdout.strip() == "2"  # 0 and 1 are held by the script
    finally:
        holder.wait(timeout=30)
    assert _launch(2, PRINT_CVD, env).stdout.strip() == "0,1"  # released with the process
    # the same cases as the launcher claim nothing
    for extra in ({"CUDA_VISIBLE_DEVICES": "5"}, {"SLURM_JOB_ID": "1"}, {"SIMLM_GPU_COUNT": "1"}):
        out = subprocess.run([sys.executable, "-c", code.replace("time.sleep(1.5)", "")],
                             env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert out.stdout.split()[0] == "[]", (extra, out.stdout, out.stderr)
