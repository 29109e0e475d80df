"""The warm interpreter's client: what a rehearsal's per-run jobs run in place
of the Python interpreter (docs/rehearsal.md, "The warm interpreter").

Standard library only, started with ``python -S -I`` by the launcher that
:func:`tokenreduction.rehearsal.warm.write_launcher` writes, so that it starts
in ~40 ms instead of the ~5 s a job spends importing torch and timm::

    python -S -I warm_client.py SOCKET REAL_PYTHON SCRIPTS_DIR SERVED [ARGS...]

``ARGS`` is what the job passes to the interpreter. When ``ARGS`` runs a
script of ``SCRIPTS_DIR`` whose file name is in ``SERVED`` (comma-separated),
the client sends the arguments, its working directory and environment to the
server at ``SOCKET``, with its stdin, stdout and stderr file descriptors
(SCM_RIGHTS), so the job's redirections hold. It forwards the signals it gets
to the job and exits with the job's exit status (128 + n after signal n, as a
shell reports it). If the client dies, the server kills the job.

Any other form (``-m torch.distributed.run``, ``-c``, another script) execs
``REAL_PYTHON`` directly. So does an unreachable server, after one line on
stderr that says so.
"""
import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PREFIX = "warm interpreter:"


def _exec_real(real_python, args, why=None):
    if why:
        sys.stderr.write(f"{PREFIX} {why}; running {real_python} instead\n")
        sys.stderr.flush()
    os.execv(real_python, [real_python, *args])


def _served(args, scripts_dir, served):
    if not args or args[0].startswith("-"):
        return False
    script = os.path.abspath(args[0])
    return os.path.basename(script) in served and os.path.dirname(script) == scripts_dir


def _std_fds():
    """fds 0-2, /dev/null in place of a closed one (as the job would see it)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def main(argv):
    sock_path, real_python, scripts_dir, served = argv[1:5]
    args = argv[5:]
    if not _served(args, os.path.abspath(scripts_dir), set(served.split(","))):
        _exec_real(real_python, args)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        payload = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [struct.pack("!Q", len(payload))], _std_fds())
        conn.sendall(payload)
    except OSError as err:
        conn.close()
        _exec_real(real_python, args, f"the server at {sock_path} is unreachable ({err.strerror or err})")

    def forward(signo, frame):
        try:
            conn.sendall(b"kill %d\n" % signo)
        except OSError:
            pass

    for signo in FORWARDED:
        signal.signal(signo, forward)
    started = False
    buffer = b""
    while True:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            if not started:  # the job never ran: the plain interpreter runs it
                _exec_real(real_python, args, f"the server at {sock_path} closed the connection before the job started")
            sys.stderr.write(f"{PREFIX} the server at {sock_path} closed the connection while the job ran\n")
            os._exit(1)
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            word, _, value = line.decode().partition(" ")
            if word == "started":
                started = True
            elif word == "exit":
                os._exit(int(value))
            elif word == "signal":
                os._exit(128 + int(value))


if __name__ == "__main__":
    main(sys.argv)
