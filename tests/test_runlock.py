"""One run, one owner (lora_zoo/runlock.py): a run folder's claim is exclusive across processes and threads,
names its holder, survives its own process reading it, and passes to the next claimant when its holder is
killed (the kernel drops the lock). Other processes are real subprocesses taking real POSIX locks.
"""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lora_zoo import runlock
from lora_zoo.errors import RunClaimedError
from lora_zoo.runlock import CLAIM_FILE, Holder, claim, claimed_by

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys\nfrom lora_zoo.runlock import claim\nwith claim(sys.argv[1]) as me:\n"
        "    print(me.pid, me.since, flush=True)\n    sys.stdin.read()\n")  # holds until stdin closes or it is killed
TRY = ("import sys\nfrom lora_zoo.errors import RunClaimedError\nfrom lora_zoo.runlock import claim, claimed_by\n"
       "print(claimed_by(sys.argv[1]), flush=True)\ntry:\n    with claim(sys.argv[1]) as me:\n"
       "        print('took', me.pid)\nexcept RunClaimedError as err:\n    print(err)\n    sys.exit(3)\n")


def python(code: str, *args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def try_elsewhere(folder) -> tuple[int, list[str]]:
    """Another process asks ``claimed_by`` then tries ``claim``: (its exit status, its output lines)."""
    proc = python(TRY, folder)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 3), err
    return proc.returncode, out.splitlines()


@pytest.fixture
def holder_process(tmp_path):
    """A subprocess holding the claim of ``tmp_path``: (the process, the pid and since it reported)."""
    proc = python(HOLD, tmp_path)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    pid, since = line.split()
    yield proc, int(pid), since
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def record(folder) -> dict:
    """The claim file's record. Never called in a block that holds the claim: opening the file would drop it."""
    return json.loads((Path(folder) / CLAIM_FILE).read_text())


def test_claim_records_its_holder_and_release_keeps_the_file_marked_released(tmp_path):
    assert claimed_by(tmp_path) is None  # never claimed: no file yet
    with claim(tmp_path) as me:
        assert me.host == socket.gethostname() and me.pid == os.getpid()
        assert claimed_by(tmp_path) == me
    assert (tmp_path / CLAIM_FILE).exists()  # never deleted: see the module docstring for the race
    released = record(tmp_path)
    assert released.pop("released") >= me.since and released == me._asdict()
    assert claimed_by(tmp_path) is None  # a released record is not a holder
    status, lines = try_elsewhere(tmp_path)  # another process takes it after us, and marks it released too
    assert status == 0 and lines == ["None", f"took {record(tmp_path)['pid']}"] and record(tmp_path)["pid"] != me.pid


def test_another_process_is_refused_while_this_one_holds_it_and_told_who(tmp_path):
    with claim(tmp_path) as me:
        status, lines = try_elsewhere(tmp_path)
        assert status == 3
        assert lines[0] == repr(me)  # its claimed_by reads our record
        assert lines[1] == (f"{tmp_path} is being trained elsewhere "
                            f"(host {socket.gethostname()}, pid {os.getpid()}, since {me.since})")
        assert claimed_by(tmp_path) == me  # its failed attempt (open, lock refused, close) left our claim alone
    status, lines = try_elsewhere(tmp_path)
    assert status == 0 and lines[0] == "None" and lines[1].startswith("took ")


def test_this_process_is_refused_while_another_holds_it(tmp_path, holder_process):
    proc, pid, since = holder_process
    expected = Holder(socket.gethostname(), pid, since)
    assert claimed_by(tmp_path) == expected
    with pytest.raises(RunClaimedError) as refused:
        with claim(tmp_path):
            pass
    assert str(refused.value) == f"{tmp_path} is being trained elsewhere ({expected.describe()})"
    assert refused.value.holder == expected
    copy = pickle.loads(pickle.dumps(refused.value))  # as it crosses from a --jobs worker
    assert str(copy) == str(refused.value) and copy.holder == expected
    proc.stdin.close()  # the holder leaves its block normally
    assert proc.wait(timeout=60) == 0
    assert claimed_by(tmp_path) is None and record(tmp_path)["pid"] == pid and "released" in record(tmp_path)


def test_claim_of_a_killed_holder_is_taken_over(tmp_path, holder_process):
    proc, pid, _ = holder_process
    assert claimed_by(tmp_path).pid == pid
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    stale = record(tmp_path)
    assert stale["pid"] == pid and "released" not in stale  # it never ran its release
    assert claimed_by(tmp_path) is None  # the kernel dropped its lock: the record alone is no claim
    with claim(tmp_path) as me:
        assert me.pid == os.getpid()
        assert try_elsewhere(tmp_path) == (3, [repr(me), f"{tmp_path} is being trained elsewhere ({me.describe()})"])


def test_a_second_claim_in_the_same_process_is_refused_and_leaves_the_first_held(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    with claim(tmp_path / "run") as me:
        for spelling in (tmp_path / "run", "run", "./link/"):  # POSIX locks would let each of them through
            with pytest.raises(RunClaimedError, match=r"already claimed by this process") as refused:
                with claim(spelling):
                    pytest.fail("a second claim of a held folder ran its block")
            assert refused.value.holder == me
            assert str(refused.value) == f"{spelling} is already claimed by this process ({me.describe()})"
        assert claimed_by("link") == me  # read through the held descriptor: opening the file again would drop it
        assert try_elsewhere(tmp_path / "run")[0] == 3  # still held after all of the above
    with claim("link") as again:  # released: claimable again, under any spelling
        assert again.pid == os.getpid()


def test_opening_the_claim_file_in_the_holding_process_drops_the_lock(tmp_path):
    """The POSIX pitfall the module works around (and documents): this is why only ``claimed_by`` may read it."""
    with claim(tmp_path):
        assert try_elsewhere(tmp_path)[0] == 3
        (tmp_path / CLAIM_FILE).read_text()  # open + close of another descriptor of the same file
        assert try_elsewhere(tmp_path)[0] == 0  # the lock is gone although the block still runs


def test_threads_racing_for_one_folder_get_it_once(tmp_path):
    start, results, inside = threading.Barrier(8), [], threading.Event()

    def contend():
        start.wait()
        try:
            with claim(tmp_path):
                inside.wait(timeout=30)  # hold until every thread has tried
                results.append("took")
        except RunClaimedError:
            results.append("refused")
            if results.count("refused") == 7:
                inside.set()

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == ["refused"] * 7 + ["took"]
    assert claimed_by(tmp_path) is None and runlock._held == {}


def test_a_forked_child_does_not_inherit_the_claim(tmp_path):
    read, write = os.pipe()
    with claim(tmp_path) as me:
        child = os.fork()
        if child == 0:  # the child: its copy of the held set must not make it think it holds the claim
            try:
                with claim(tmp_path):
                    message = "took"
            except RunClaimedError as err:
                message = str(err)
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(child, 0)
        message = os.read(read, 4096).decode()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0
        assert message == f"{tmp_path} is being trained elsewhere ({me.describe()})"
        assert try_elsewhere(tmp_path)[0] == 3  # the child's exit closed its descriptors: ours still holds


@pytest.mark.parametrize("content", [b"", b'{"host": "vm", "pi',
                                     b'{"host": "h", "pid": 1, "since": "t", "released": "u"}'])
def test_a_record_being_written_reads_as_unknown_values(tmp_path, content, monkeypatch):
    """A holder that has locked but not yet written: empty, half a record, or the previous owner's record."""
    monkeypatch.setattr(runlock, "READ_RETRIES", 2)
    (tmp_path / CLAIM_FILE).write_bytes(content)
    lock = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\nsys.stdin.read()\n")
    proc = python(lock, tmp_path / CLAIM_FILE)
    try:
        assert proc.stdout.readline() == "locked\n"
        assert claimed_by(tmp_path) == Holder(None, None, None)
        with pytest.raises(RunClaimedError) as refused:
            with claim(tmp_path):
                pass
        assert str(refused.value) == f"{tmp_path} is being trained elsewhere (host ?, pid ?, since ?)"
        assert refused.value.holder is None
    finally:
        proc.communicate(timeout=60)
    assert claimed_by(tmp_path) is None
    assert (tmp_path / CLAIM_FILE).read_bytes() == content  # a reader never writes


def test_without_a_known_flock_layout_the_shared_lock_probe_answers_the_same(tmp_path, holder_process, monkeypatch):
    monkeypatch.setattr(runlock, "_FLOCK_LAYOUT", None)
    proc, pid, since = holder_process
    assert claimed_by(tmp_path) == Holder(socket.gethostname(), pid, since)
    proc.stdin.close()
    proc.wait(timeout=60)
    assert claimed_by(tmp_path) is None  # the probe took a shared lock and released it: free for the next
    with claim(tmp_path) as me:
        assert try_elsewhere(tmp_path) == (3, [repr(me), f"{tmp_path} is being trained elsewhere ({me.describe()})"])


def test_a_folder_that_does_not_exist_is_refused_and_not_created(tmp_path):
    missing = tmp_path / "runs" / "lora"
    with pytest.raises(FileNotFoundError) as refused:
        with claim(missing):
            pytest.fail("claimed a folder that does not exist")
    assert str(refused.value) == f"run folder {missing} does not exist: create it before claiming it"
    assert not (tmp_path / "runs").exists()
    assert claimed_by(missing) is None  # nothing there: nobody holds it (the sweep's dry run asks this)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^cannot claim .*file: it is not a folder$"):
        with claim(tmp_path / "file"):
            pass
    assert claimed_by(tmp_path / "file") is None


@pytest.mark.parametrize("removals", [1, 3])
def test_a_claim_file_removed_between_open_and_lock_is_not_the_one_kept(tmp_path, monkeypatch, removals):
    """``rm`` of the claim file while a claimant is between ``open`` and ``lockf``: it must lock the new file."""
    real, removed = runlock.fcntl, []

    class RemoveBeforeLocking:  # the fcntl module, but its first ``removals`` lockf calls find the file removed
        def __getattr__(self, name):
            return getattr(real, name)

        def lockf(self, fd, cmd, *args):
            if len(removed) < removals:
                removed.append(os.fstat(fd).st_ino)
                (tmp_path / CLAIM_FILE).unlink()
            return real.lockf(fd, cmd, *args)

    monkeypatch.setattr(runlock, "fcntl", RemoveBeforeLocking())
    if removals == 3:  # removed at every attempt: refused, holding nothing
        with pytest.raises(OSError, match=rf"^cannot claim {tmp_path}: its .claim keeps being removed while it is"):
            with claim(tmp_path):
                pass
        assert runlock._held == {} and claimed_by(tmp_path) is None
        return
    with claim(tmp_path) as me:
        assert len(removed) == 1  # the first lock was on the removed file; the one held is on the new file
        assert try_elsewhere(tmp_path) == (3, [repr(me), f"{tmp_path} is being trained elsewhere ({me.describe()})"])


def test_the_claim_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError):
        with claim(tmp_path):
            raise KeyError("training failed")
    assert claimed_by(tmp_path) is None and "released" in record(tmp_path) and runlock._held == {}
    assert try_elsewhere(tmp_path)[0] == 0


def test_runlock_imports_nothing_heavy():
    code = "import json, sys, lora_zoo.runlock; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    loaded = {name.split(".")[0] for name in json.loads(proc.stdout)}
    assert "lora_zoo.runlock" in json.loads(proc.stdout)
    assert not loaded & {"torch", "numpy", "open_clip", "torchvision"}
