"""The warm interpreter of a rehearsal (tokenreduction.rehearsal.warm and its
client): a script run through the client behaves as under the plain
interpreter (output, exit status, files), the client's death ends the job, an
unreachable server falls back visibly, and the server never outlives the
process that started it. The slow test runs a cut rehearsal through Snakemake
with and without the warm interpreter and compares the results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenreduction.rehearsal import warm
from workflow_utils import REPO, load_config, snakemake, write_config

PYTHON = sys.executable
SRC = REPO / "src"

JOB = r'''
import os, sys, time
mode = sys.argv[1]
print("argv", sys.argv[1:], "cwd", os.getcwd(), "X", os.environ.get("WARM_TEST_X"))
print("to stderr", file=sys.stderr)
with open("made_by_job.txt", "w") as f:
    f.write(" ".join(sys.argv[1:]))
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "message":
    sys.exit("a message to stderr")
if mode == "raise":
    raise ValueError("boom")
if mode == "signal":
    os.kill(os.getpid(), int(sys.argv[2]))
if mode == "stdin":
    print("read", sys.stdin.read().strip())
if mode == "sleep":
    with open(sys.argv[2], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    print("not reached")
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server (nothing preloaded: the mechanics only) serving job.py of a
    scripts folder; yields (server, scripts folder)."""
    root = tmp_path_factory.mktemp("warm")
    scripts = root / "scripts"
    scripts.mkdir()
    (scripts / "job.py").write_text(JOB)
    (scripts / "other.py").write_text("import sys\nprint('other', sys.argv[1:])\n")
    server = warm.start(PYTHON, SRC, root / "results", scripts, preload=(), served=("job.py",))
    yield server, scripts
    warm.stop(server)
    assert server.process.returncode is not None
    assert not os.path.exists(server.socket)


def _run(interpreter, args, cwd, stdin=None, env_x="x value"):
    """Run `interpreter args` the way a rule's shell line does (redirected
    into a log), returning (exit status, log text, file the job wrote)."""
    log = cwd / "job.log"
    made = cwd / "made_by_job.txt"
    made.unlink(missing_ok=True)
    command = f'WARM_TEST_X="$X" "$INTERPRETER" "$@" > {log} 2>&1'
    if stdin is not None:
        command = f'echo {stdin} | {command}'
    proc = subprocess.run(["bash", "-c", command, "bash", *args], cwd=cwd, timeout=120,
                          env={**os.environ, "X": env_x, "INTERPRETER": str(interpreter)})
    return proc.returncode, log.read_text(), made.read_text() if made.exists() else None


CASES = {
    "argv, cwd, env": ["ok", "two words", "--flag=1"],
    "nonzero exit": ["exit", "3"],
    "exit with a message": ["message"],
    "uncaught exception": ["raise"],
    "SIGTERM": ["signal", str(int(signal.SIGTERM))],
    "SIGKILL": ["signal", str(int(signal.SIGKILL))],
    "stdin": ["stdin"],
}


@pytest.mark.parametrize("case", CASES)
def test_client_runs_a_script_as_the_plain_interpreter_does(served, tmp_path, case):
    server, scripts = served
    args = [str(scripts / "job.py"), *CASES[case]]
    plain = tmp_path / "plain"
    client = tmp_path / "client"
    plain.mkdir()
    client.mkdir()
    expected = _run(PYTHON, args, plain, stdin="hello" if case == "stdin" else None)
    got = _run(server.launcher, args, client, stdin="hello" if case == "stdin" else None)
    assert got == (expected[0], expected[1].replace(str(plain), str(client)), expected[2])
    if case == "uncaught exception":
        assert got[0] == 1 and "Traceback (most recent call last)" in got[1] and "ValueError: boom" in got[1]
        assert "runpy" not in got[1] and "warm.py" not in got[1]
    if case.startswith("SIG"):
        assert got[0] == 128 + int(CASES[case][1])
    if case == "argv, cwd, env":
        assert f"cwd {client}" in got[1] and "X x value" in got[1] and "'two words'" in got[1]
    assert "warm interpreter" not in got[1]


def test_job_runs_in_a_process_of_the_server(served, tmp_path):
    """The job is a fork of the server (it did not start its own interpreter)."""
    server, scripts = served
    script = scripts / "job.py"
    pid_file = tmp_path / "pid"
    client = subprocess.Popen([str(server.launcher), str(script), "sleep", str(pid_file)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        job = _wait_for_pid(pid_file)
        assert _parent(_parent(job)) == server.process.pid
    finally:
        client.kill()
        client.wait()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_killed_supervisor_takes_its_job_along(served, tmp_path):
    """SIGKILL to the process between server and job: the job dies too, and
    the client says the connection was lost (status 1)."""
    server, scripts = served
    pid_file = tmp_path / "pid"
    client = subprocess.Popen([str(server.launcher), str(scripts / "job.py"), "sleep", str(pid_file)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = _wait_for_pid(pid_file)
    supervisor = _parent(job)
    assert _parent(supervisor) == server.process.pid
    os.kill(supervisor, signal.SIGKILL)
    _, err = client.communicate(timeout=30)
    assert _gone(job)
    assert client.returncode == 1
    assert f"warm interpreter: the server at {server.socket} closed the connection while the job ran" in err


def _wait_for_pid(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"the job did not write {path}")


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # gone between the lookup and the read
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_killing_the_client_kills_the_job(served, tmp_path):
    server, scripts = served
    pid_file = tmp_path / "pid"
    client = subprocess.Popen([str(server.launcher), str(scripts / "job.py"), "sleep", str(pid_file)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = _wait_for_pid(pid_file)
    client.kill()  # SIGKILL: the client cannot tell anyone
    client.wait()
    assert _gone(job), "the job outlived its client"


def test_a_signal_to_the_client_reaches_the_job(served, tmp_path):
    server, scripts = served
    pid_file = tmp_path / "pid"
    client = subprocess.Popen([str(server.launcher), str(scripts / "job.py"), "sleep", str(pid_file)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job = _wait_for_pid(pid_file)
    client.send_signal(signal.SIGTERM)
    out, _ = client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGTERM
    assert b"not reached" not in out
    assert _gone(job)


def test_unserved_forms_run_the_plain_interpreter(served, tmp_path):
    server, scripts = served
    for args in (["-c", "import sys; print('c', sys.argv[1:])", "a"], [str(scripts / "other.py"), "b"]):
        expected = _run(PYTHON, args, tmp_path)
        assert _run(server.launcher, args, tmp_path) == expected
        assert "warm interpreter" not in expected[1]


def test_unreachable_server_says_so_and_runs_the_plain_interpreter(served, tmp_path):
    _, scripts = served
    missing = str(tmp_path / "no.sock")
    launcher = warm.write_launcher(tmp_path / "python", PYTHON, missing, scripts, ("job.py",))
    args = [str(scripts / "job.py"), "exit", "4"]
    expected = _run(PYTHON, args, tmp_path)
    code, log, made = _run(launcher, args, tmp_path)
    first, rest = log.split("\n", 1)
    assert first == f"warm interpreter: the server at {missing} is unreachable (No such file or directory); running {PYTHON} instead"
    assert (code, rest, made) == expected


def test_server_exits_when_its_parent_dies(tmp_path):
    starter = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tokenreduction.rehearsal import warm;"
        "s = warm.start(sys.executable, sys.argv[1], sys.argv[2], sys.argv[2], preload=());"
        "print(s.process.pid, s.socket, flush=True);"
        "import time; time.sleep(120)"
    )
    parent = subprocess.Popen([PYTHON, "-c", starter, str(SRC), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    pid, sock = parent.stdout.readline().split()
    assert os.path.exists(sock)
    parent.kill()
    parent.wait()
    assert _gone(int(pid)), "the server outlived the process that started it"
    assert not os.path.exists(sock)


def test_server_exits_when_idle(tmp_path):
    server = warm.start(PYTHON, SRC, tmp_path, tmp_path, preload=(), idle_timeout=1)
    assert server.process.wait(timeout=30) == 0
    assert "no request for 1 s" in server.log.read_text()
    warm.stop(server)


def test_socket_path_stays_under_the_af_unix_limit(tmp_path):
    short = warm.socket_path(tmp_path, 123)
    assert short == str(tmp_path.resolve() / ".warm" / "s123.sock") or len(short) <= warm.MAX_SOCKET_PATH
    deep = tmp_path / ("d" * 90) / "results"
    path = warm.socket_path(deep, 123)
    assert len(path.encode()) <= warm.MAX_SOCKET_PATH and path.startswith("/tmp/tokenreduction-warm-")
    assert path == warm.socket_path(deep, 123) and path != warm.socket_path(tmp_path / "other", 123)


# ---------------------------------------------------------------- a rehearsal through Snakemake


def _cut_which_tokens(folder: Path) -> Path:
    """which-tokens on NABirds, one backbone, the baseline + 2 methods at one keep rate (28 jobs)."""
    cfg = load_config("which-tokens.yaml")
    (folder / "nabirds").mkdir(parents=True, exist_ok=True)
    cfg["datasets"] = {"nabirds": {**cfg["datasets"]["nabirds"], "root": str(folder / "nabirds")}}
    cfg["backbones"] = {"tiny": cfg["backbones"]["tiny"]}
    cfg["methods"] = {k: cfg["methods"][k] for k in ("deit", "topk", "tome")}
    cfg["experiments"] = [{"datasets": ["nabirds"], "backbones": ["tiny"], "methods": ["topk", "tome"],
                           "keep_rates": [0.5]}]
    return write_config(folder / "cut.yaml", cfg)


def _close(a, b, path=""):
    """Equal JSON values, floats within 1e-5 (relative) or 1e-6 (absolute)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


TIMING_KEYS = {"throughput", "throughput_img_s", "seconds", "time_s", "wall_s", "elapsed_s", "img_per_s"}


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items()
                if k not in TIMING_KEYS and "throughput" not in k and not k.endswith(("_s", "_seconds", "time"))}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


@pytest.mark.slow
def test_rehearsal_through_the_warm_interpreter_matches_the_plain_one(tmp_path):
    runs = {}
    for name, extra in (("warm", []), ("plain", ["rehearse_warm=false"])):
        folder = tmp_path / name
        config = _cut_which_tokens(folder)
        proc = snakemake(["--configfile", str(config), "--config", "rehearse=true", *extra, "--cores", "2"], folder,
                         timeout=1500)
        runs[name] = folder / (load_config("which-tokens.yaml")["results"] + "-rehearsal")
        said = "run in the warm interpreter" in proc.stderr
        assert said == (name == "warm")
    warm_logs = list((runs["warm"] / "logs").rglob("*.log"))
    assert not any("warm interpreter:" in p.read_text() for p in warm_logs)  # no fallback happened
    assert list((runs["warm"] / ".warm").glob("*.sock")) == []  # the server stopped
    for kind in ("finetune", "eval"):
        files = sorted(p.relative_to(runs["plain"]) for p in (runs["plain"] / kind).rglob("*.json"))
        assert len(files) == 3
        for rel in files:
            _close(_strip_timing(json.loads((runs["warm"] / rel).read_text())),
                   _strip_timing(json.loads((runs["plain"] / rel).read_text())), str(rel))
    for rel in ("summary/metrics.csv",):
        assert (runs["warm"] / rel).is_file() and (runs["plain"] / rel).is_file()


def _workflow_rehearsal():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wf_rehearsal_for_test", REPO / "workflow" / "lib" / "rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("false", False),
                                             ("False", False), ("TRUE", True)])
def test_config_flags_read_as_snakemake_passes_them(value, expected):
    """`--config rehearse_warm=false` arrives as the string 'false'."""
    assert _workflow_rehearsal().flag({"rehearse_warm": value}, "rehearse_warm") is expected


def test_config_flag_that_is_not_true_or_false_is_refused():
    with pytest.raises(SystemExit, match="invalid config at rehearse_warm: 'maybe' is not true or false"):
        _workflow_rehearsal().flag({"rehearse_warm": "maybe"}, "rehearse_warm")


def test_no_rehearsal_leaves_the_config_and_wants_no_server():
    module = _workflow_rehearsal()
    config = {"rehearse": "false", "rehearse_warm": "true", "results": "r"}
    assert module.apply_rehearsal(config, REPO) == []
    assert config == {"rehearse": False, "rehearse_warm": True, "results": "r"}
    assert not module._WARM.get("wanted")


# ---- a cluster group job's own warm interpreter (workflow/lib/rehearsal.py)

@pytest.mark.parametrize("targets, inherited, deployments, expected", [
    (["finetune", "finetune"], None, set(), "start"),           # a group of runs
    (["finetune", "evaluate", "pattern_grid"], None, set(), "start"),
    (["finetune"], None, set(), "none"),                        # a job alone: a server would cost what it saves
    (["analysis_collate", "analysis_correlate"], None, set(), "none"),  # aggregation groups run plain
    (["finetune", "finetune"], None, {"conda"}, "none"),        # jobs in their own environments
    (["finetune"], "LAUNCHER", set(), "inherit"),               # a job's own Snakemake in its srun step
    (["finetune"], "/nonexistent/python-1", set(), "none"),      # a launcher of another node
])
def test_remote_warm_action(targets, inherited, deployments, expected, tmp_path):
    if inherited == "LAUNCHER":
        inherited = str(tmp_path / "python-1")
        Path(inherited).write_text("#!/bin/sh\n")
    assert _workflow_rehearsal().remote_warm_action(targets, inherited, deployments) == expected


class _RemoteWorkflow:
    """What warm_in_remote_job reads of Snakemake's workflow object."""

    def __init__(self, targets, remote=True):
        self.remote_exec = remote
        self.dag_settings = type("DAGSettings", (), {"target_jobs": targets})()


def test_target_rules_come_from_the_command_line_at_parse_time():
    """Snakemake sets workflow.dag_settings after parsing: the rules are read from argv."""
    module = _workflow_rehearsal()
    argv = ["snakemake", "--snakefile", "S", "--target-jobs", "finetune:seed=0,dataset=a", "evaluate:seed=1",
            "--allowed-rules", "finetune", "evaluate", "--mode", "remote"]
    parsing = type("Workflow", (), {"dag_settings": None})()
    assert module.target_rules(parsing, argv) == ["finetune", "evaluate"]
    assert module.target_rules(parsing, ["snakemake", "--cores", "2"]) == []
    assert module.target_rules(_RemoteWorkflow(["pattern_grid:dataset=a"]), argv) == ["pattern_grid"]


def test_group_job_starts_a_server_in_node_local_tmp_and_exports_its_launcher(tmp_path, monkeypatch):
    module = _workflow_rehearsal()
    module._WARM["wanted"] = True
    started = {}

    class FakeWarm:
        PRELOAD, PRELOAD_DIFFUSION, WarmError = ("torch",), ("diffusers",), RuntimeError

        @staticmethod
        def start(python, src, results, scripts, preload):
            started.update(python=python, results=Path(results), preload=preload)
            return warm.Server(None, str(tmp_path / "s.sock"), tmp_path / "python-7", tmp_path / "server.log")

    monkeypatch.setattr(module, "_load", lambda path, name: FakeWarm)
    monkeypatch.setattr(module.atexit, "register", lambda f: None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv(module.LAUNCHER_ENV, raising=False)
    monkeypatch.setenv("TOKENREDUCTION_PYTHON", "/usr/bin/python3")
    targets = ["finetune:dataset=nabirds,seed=0", "finetune:dataset=nabirds,seed=1"]  # the CLI text form
    module.warm_in_remote_job(_RemoteWorkflow(targets), {}, REPO, "/usr/bin/python3", set())
    assert started == {"python": "/usr/bin/python3", "results": tmp_path / "tokenreduction-warm-4242",
                       "preload": ("torch",)}
    assert os.environ["TOKENREDUCTION_PYTHON"] == os.environ[module.LAUNCHER_ENV] == str(tmp_path / "python-7")


def test_job_step_keeps_its_group_jobs_launcher(tmp_path, monkeypatch):
    module = _workflow_rehearsal()
    module._WARM["wanted"] = True
    launcher = tmp_path / "python-9"
    launcher.write_text("#!/bin/sh\n")
    monkeypatch.setenv(module.LAUNCHER_ENV, str(launcher))
    monkeypatch.setenv("TOKENREDUCTION_PYTHON", "/usr/bin/python3")  # as software.smk sets it at parse
    module.warm_in_remote_job(_RemoteWorkflow(["finetune:seed=0"]), {}, REPO, "/usr/bin/python3", set())
    assert os.environ["TOKENREDUCTION_PYTHON"] == str(launcher)


@pytest.mark.parametrize("remote, wanted", [(False, True), (True, False)])
def test_main_process_and_plain_runs_start_nothing_at_parse(remote, wanted, monkeypatch):
    module = _workflow_rehearsal()
    module._WARM["wanted"] = wanted
    monkeypatch.setattr(module, "_load", lambda path, name: pytest.fail("no server wanted here"))
    monkeypatch.delenv(module.LAUNCHER_ENV, raising=False)
    monkeypatch.setenv("TOKENREDUCTION_PYTHON", "/usr/bin/python3")
    module.warm_in_remote_job(_RemoteWorkflow(["finetune:a", "finetune:b"], remote), {}, REPO, "/usr/bin/python3",
                              set())
    assert os.environ["TOKENREDUCTION_PYTHON"] == "/usr/bin/python3"
