"""The warm interpreter of a rehearsal: one server process that has imported
torch, timm and the per-run scripts' modules once, and forks a job from that
state for every request of :mod:`.warm_client` (docs/rehearsal.md, "The warm
interpreter"). A rehearsal job then costs its work (~1 s) instead of its
imports (~5 s of CPU time).

Two halves, both importable without torch:

* the workflow side (the Snakemake main process, when a rehearsal executes
  locally): :func:`start` launches the server and waits until it listens,
  :func:`write_launcher` writes the executable that jobs run as
  ``$TOKENREDUCTION_PYTHON``, :func:`stop` ends the server;
* the server (``python -m tokenreduction.rehearsal.warm serve ...``):
  :func:`serve`. Its parent process stays single-threaded (BLAS and OpenMP
  pools at 1 thread) and never runs a torch op, so that forking is safe. Per
  request it forks a supervisor; the supervisor forks the job (its own process
  group), reports the job's exit status or signal to the client, forwards the
  client's signals, and kills the job's group when the client goes away. The
  server exits when the process that started it dies, after ``idle_timeout``
  seconds without a request, or on SIGTERM.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# scripts/ entry points of the per-run rules (finetune, evaluate, mae_finetune,
# mae_evaluate, ots_sweep, sd_generate, sd_fid); the aggregation rules run the
# plain interpreter so their benchmark files record their own memory
SERVED_SCRIPTS = ("train.py", "evaluate.py", "ots_sweep.py", "sd_generate.py", "sd_fid.py")
# imported by the server before it listens ("module" or "module:attribute");
# one that fails to import is logged and left to the job
PRELOAD = (
    "torch",
    "torchvision.ops",
    "torch._dynamo",
    "timm",
    "numpy",
    "PIL.Image",
    "tokenreduction.train",
    "tokenreduction.train.runtime",
    "tokenreduction.evaluate",
    "tokenreduction.ots",
    "tokenreduction.io",
    # imported inside the jobs' functions (found by diffing sys.modules around a job)
    "timm.loss",
    "timm.optim",
    "timm.scheduler",
    "timm.data",
    "tokenreduction.data",
    "tokenreduction.clca",
    "tokenreduction.patterns",
    "tokenreduction.metrics",
    "PIL.JpegImagePlugin",
    "PIL.PngImagePlugin",
)
PRELOAD_DIFFUSION = ("tokenreduction.diffusion", "diffusers:StableDiffusionPipeline", "cleanfid")
MAX_SOCKET_PATH = 100  # AF_UNIX allows 107 bytes
IDLE_TIMEOUT_S = 1800
KILL_GRACE_S = 5.0
SINGLE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


class WarmError(RuntimeError):
    """The warm interpreter could not be started."""


# --------------------------------------------------------------------------
# workflow side (standard library only)


def state_dir(results: str | os.PathLike) -> Path:
    """``<results>/.warm``: the launcher, the server's log and (when its path
    is short enough) the socket."""
    return Path(os.path.abspath(results)) / ".warm"


def socket_path(results: str | os.PathLike, pid: int) -> str:
    """The server's socket for the run of Snakemake process `pid`:
    ``<results>/.warm/s<pid>.sock``, or, when that is longer than an AF_UNIX
    path may be, ``/tmp/tokenreduction-warm-<hash of results>/s<pid>.sock``."""
    path = str(state_dir(results) / f"s{pid}.sock")
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    key = hashlib.sha1(str(state_dir(results)).encode()).hexdigest()[:16]
    return f"/tmp/tokenreduction-warm-{key}/s{pid}.sock"


def write_launcher(path: Path, python: str, sock: str, scripts_dir: str | os.PathLike,
                   served=SERVED_SCRIPTS) -> Path:
    """Write the executable a job runs as ``$TOKENREDUCTION_PYTHON``: a
    ``/bin/sh`` line that execs :mod:`.warm_client` with a fast-starting
    interpreter (``-S -I``: no site-packages). Written atomically."""
    client = Path(__file__).with_name("warm_client.py")
    words = [python, "-S", "-I", str(client), sock, python, os.path.abspath(scripts_dir), ",".join(served)]
    text = "#!/bin/sh\n# the warm interpreter's client (tokenreduction.rehearsal.warm)\nexec " + " ".join(
        shlex.quote(w) for w in words) + ' "$@"\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


@dataclass
class Server:
    """A started server: its process, socket, launcher and log."""

    process: subprocess.Popen
    socket: str
    launcher: Path
    log: Path


def start(python: str, src: str | os.PathLike, results: str | os.PathLike, scripts_dir: str | os.PathLike,
          preload=PRELOAD, served=SERVED_SCRIPTS, parent_pid: int | None = None,
          idle_timeout: float = IDLE_TIMEOUT_S, ready_timeout: float = 300.0) -> Server:
    """Start the server with `python` (``src`` first on its PYTHONPATH) and
    wait until it listens; write the launcher. Raises :class:`WarmError`
    naming the log when it does not come up."""
    parent_pid = os.getpid() if parent_pid is None else parent_pid
    folder = state_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    sock = socket_path(results, parent_pid)
    Path(sock).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(sock):
        os.unlink(sock)  # left by a killed run of the same pid
    log = folder / f"server-{parent_pid}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)}
    command = [python, "-m", "tokenreduction.rehearsal.warm", "serve", "--socket", sock,
               "--parent-pid", str(parent_pid), "--idle-timeout", str(idle_timeout), "--preload", *preload]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + ready_timeout
    while not os.path.exists(sock):
        if process.poll() is not None:
            raise WarmError(f"the warm interpreter's server exited with {process.returncode} before it listened; see {log}")
        if time.monotonic() > deadline:
            process.kill()
            raise WarmError(f"the warm interpreter's server did not listen within {ready_timeout:.0f} s; see {log}")
        time.sleep(0.05)
    launcher = write_launcher(folder / f"python-{parent_pid}", python, sock, scripts_dir, served)
    return Server(process, sock, launcher, log)


def stop(server: Server, timeout: float = 10.0) -> None:
    """SIGTERM the server (it ends the jobs it still runs), wait for it, and
    remove its socket and launcher."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    for path in (server.socket, server.launcher):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------
# server side


def _log(message: str) -> None:
    sys.stderr.write(f"[warm {time.strftime('%H:%M:%S')} pid {os.getpid()}] {message}\n")
    sys.stderr.flush()


def _preload(names) -> None:
    import importlib

    for name in names:
        module, _, attribute = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if attribute:
                getattr(loaded, attribute)
        except Exception as err:  # the job meets the same error and reports it
            _log(f"preload {name}: {type(err).__name__}: {err}")


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def _recv_exact(conn: socket.socket, size: int, data: bytes = b"") -> bytes:
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection mid-request")
        data += chunk
    return data


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    if len(fds) != 3:
        raise ConnectionError(f"expected 3 file descriptors, got {len(fds)}")
    header = _recv_exact(conn, 8, header)
    (size,) = struct.unpack("!Q", header)
    return json.loads(_recv_exact(conn, size)), fds


def _exit_code(err: SystemExit) -> int:
    """The exit status the interpreter gives `sys.exit(code)`."""
    code = err.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:  # stdout first, as the interpreter does
        sys.stdout.flush()
        sys.stderr.write(f"{code}\n")
    except Exception:
        pass
    return 1


def _std_stream(fd: int, mode: str, line_buffering: bool):
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    raw = io.FileIO(fd, mode, closefd=False)
    if mode == "r":
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="strict")
    return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding="utf-8",
                            errors="backslashreplace" if fd == 2 else "strict",
                            line_buffering=line_buffering, write_through=unbuffered)


def _print_uncaught(err: BaseException, script: str) -> None:
    """The interpreter's report of an uncaught exception (sys.excepthook),
    from the script's frame on (runpy's own frames left out)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    tb = tb or err.__traceback__
    try:  # stdout first, as the interpreter does
        sys.stdout.flush()
    except Exception:
        pass
    sys.excepthook(type(err), err.with_traceback(tb), tb)


def _run_job(request: dict, fds: list[int]) -> None:
    """In the job process: take the client's fds, cwd and environment, run
    the script as ``__main__`` with its argv, exit with its status."""
    import atexit
    import runpy
    import tempfile
    import traceback

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # TMPDIR is the job's
    sys.stdin = sys.__stdin__ = _std_stream(0, "r", False)
    sys.stdout = sys.__stdout__ = _std_stream(1, "w", os.isatty(1))
    sys.stderr = sys.__stderr__ = _std_stream(2, "w", True)
    torch = sys.modules.get("torch")
    if torch is not None:
        threads = request["env"].get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else (os.cpu_count() or 1))
    argv = request["argv"]
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as err:
        code = _exit_code(err)
    except KeyboardInterrupt as err:
        _print_uncaught(err, argv[0])
        code = -signal.SIGINT
    except BaseException as err:
        _print_uncaught(err, argv[0])
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if code == -signal.SIGINT:  # as the interpreter does: die of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _die_with_parent(parent: int) -> None:
    """The job gets SIGKILL when its supervisor dies (even of SIGKILL), so
    that no job outlives the connection that reports it (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _kill_group(pid: int, signo: int) -> None:
    try:
        os.killpg(pid, signo)
    except ProcessLookupError:
        pass


def _supervise(conn: socket.socket) -> None:
    """In the supervisor: start the job, relay signals, report its status."""
    try:
        request, fds = _receive_request(conn)
    except (OSError, ValueError) as err:
        _log(f"bad request: {err}")
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            conn.close()
            os.setpgid(0, 0)
            _die_with_parent(supervisor)
            _run_job(request, fds)
        finally:
            os._exit(1)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the job did it first, or has exited already
    for fd in fds:
        os.close(fd)

    def end(signo, frame):  # the server is stopping: end the job
        _kill_group(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, end)
    try:
        conn.sendall(b"started %d\n" % pid)
    except OSError:
        pass
    watch = selectors.DefaultSelector()
    pidfd = os.pidfd_open(pid)
    watch.register(pidfd, selectors.EVENT_READ, "job")
    watch.register(conn, selectors.EVENT_READ, "client")
    buffer = b""
    while True:
        for key, _ in watch.select():
            if key.data == "job":
                _, status, usage = os.wait4(pid, 0)
                if os.WIFSIGNALED(status):
                    message = b"signal %d\n" % os.WTERMSIG(status)
                else:
                    message = b"exit %d\n" % os.waitstatus_to_exitcode(status)
                # what the job's benchmark file cannot record (it measures the client)
                _log(f"job {pid} {os.path.basename(request['argv'][0])}: {message.decode().strip()},"
                     f" wall {time.monotonic() - started:.2f} s, cpu {usage.ru_utime + usage.ru_stime:.2f} s,"
                     f" max rss {usage.ru_maxrss / 1024:.0f} MB")
                try:
                    conn.sendall(message)
                except OSError:
                    pass
                os._exit(0)
            try:
                data = conn.recv(256)
            except OSError:
                data = b""
            if not data:  # the client is gone: so goes the job
                watch.unregister(conn)
                _kill_group(pid, signal.SIGTERM)
                if not watch.select(KILL_GRACE_S):
                    _kill_group(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os._exit(0)
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                word, _, value = line.decode(errors="replace").partition(" ")
                if word == "kill" and value.isdigit():
                    _kill_group(pid, int(value))


class _Stop(Exception):
    pass


def _raise_stop(signo, frame):
    raise _Stop


def serve(sock: str, parent_pid: int, idle_timeout: float = IDLE_TIMEOUT_S, preload=PRELOAD) -> None:
    """Import `preload`, listen at `sock`, fork a supervisor per connection.
    Returns when `parent_pid` dies, after `idle_timeout` s without requests
    and jobs, or on SIGTERM; ends its running jobs and removes the socket."""
    for name in SINGLE_THREAD_ENV:
        os.environ[name] = "1"  # no BLAS / OpenMP pools in the forking parent
    signal.signal(signal.SIGTERM, _raise_stop)
    started = time.monotonic()
    _preload(preload)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    threads = _thread_count()
    _log(f"imported {len(sys.modules)} modules in {time.monotonic() - started:.1f} s; {threads} thread(s)"
         + ("" if threads == 1 else " (expected 1: forking a multi-threaded process is unsafe)"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{sock}.{os.getpid()}.tmp"
    listener.bind(staging)
    listener.listen(128)
    os.rename(staging, sock)  # clients see the socket only once it listens
    _log(f"listening at {sock}")
    children: set[int] = set()
    served = 0
    last = time.monotonic()
    watch = selectors.DefaultSelector()
    watch.register(listener, selectors.EVENT_READ)
    try:
        while True:
            ready = watch.select(1.0)
            while children:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                children.discard(pid)
                last = time.monotonic()
            if os.getppid() != parent_pid:
                _log(f"the process that started the server ({parent_pid}) is gone: stopping")
                break
            if not children and time.monotonic() - last > idle_timeout:
                _log(f"no request for {idle_timeout:.0f} s: stopping")
                break
            if not ready:
                continue
            conn, _ = listener.accept()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                try:
                    listener.close()
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    _supervise(conn)
                finally:
                    os._exit(1)
            conn.close()
            children.add(pid)
            served += 1
            last = time.monotonic()
    except _Stop:
        _log("SIGTERM: stopping")
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        _log(f"served {served} job(s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenreduction.rehearsal.warm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the server")
    run.add_argument("--socket", required=True)
    run.add_argument("--parent-pid", type=int, required=True)
    run.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S)
    run.add_argument("--preload", nargs="*", default=list(PRELOAD))
    args = parser.parse_args(argv)
    serve(args.socket, args.parent_pid, args.idle_timeout, args.preload)


if __name__ == "__main__":
    main()
