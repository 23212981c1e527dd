"""Running model-written programs against a benchmark's tests: the metric of the code tasks (``xd_humaneval``,
``xd_mbpp``), pass@1 under greedy decoding.

Every program runs in its own fresh Python interpreter (``python -I``: no ``PYTHON*`` variables, no user site, no
script folder on ``sys.path``), started in a new temporary working directory that is deleted afterwards, with an
empty environment, no stdin, and these limits set inside the child before the program starts:

- wall clock: ``timeout_s`` (the whole process group is killed when it passes);
- CPU time: ``RLIMIT_CPU`` at the wall-clock limit + 1 s;
- memory: ``RLIMIT_AS`` (address space) at ``memory_mb``; an allocation beyond it raises ``MemoryError``;
- files: ``RLIMIT_FSIZE`` at ``file_mb`` per written file; no core dumps.

Nothing of the parent's state reaches it: the program is never ``exec``-ed in this process, the child shares no
memory or open files with it, and only its exit status and the tail of its output come back. What this sandbox does
not do: it does not cut the network (that needs OS support such as network namespaces or a container, which is not
portable) and does not hide the file system (the program runs as the same user and can read or write what that user
can). Run untrusted models' code inside a container or VM without network access when that matters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runs in the child: set the limits, then run the program as __main__ (argv: memory bytes, cpu seconds, file bytes).
_LAUNCHER = """\
import resource, runpy, sys
memory, cpu, fsize = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["program.py"]
runpy.run_path("program.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run."""

    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write
    output_chars: int = 2000  # tail of stdout + stderr kept in the result


@dataclass(frozen=True)
class ExecResult:
    """How one program ended: ``passed`` (exit status 0), ``failed`` (an exception, a failed assert, a crash, a
    limit other than the clock) or ``timeout``."""

    status: str
    returncode: int | None
    output: str  # the tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run ``program`` (Python source) in a separate sandboxed interpreter (module docstring) and say how it ended."""
    mb = 1024 * 1024
    cpu = int(limits.timeout_s) + 1
    with tempfile.TemporaryDirectory(prefix="xd-code-") as folder:
        Path(folder, "program.py").write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", "-c", _LAUNCHER, str(limits.memory_mb * mb), str(cpu), str(limits.file_mb * mb)]
        proc = subprocess.Popen(command, cwd=folder, env={"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: killed together with its children
        try:
            out, _ = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant outside the killed process group still holds the output pipe
                out = b""
            return ExecResult("timeout", None, _tail(out, limits.output_chars))
        finally:
            _kill_group(proc)  # whatever the program left running in its group
    status = "passed" if proc.returncode == 0 else "failed"
    return ExecResult(status, proc.returncode, _tail(out, limits.output_chars))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(data: bytes | None, chars: int) -> str:
    return (data or b"").decode("utf-8", errors="replace")[-chars:]


# ---------------------------------------------------------------------------------------------- lm-eval hooks
# The task YAMLs name these with ``!function``. lm-eval calls a metric once per document with
# ``references=[target]`` and ``predictions=[result]`` (the result: a string, or a list of strings after a filter
# that returns one list per document).

LIMITS = SandboxLimits()
"""The limits the code tasks run their programs under."""


def humaneval_programs(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[str]]:
    """Filter of ``xd_humaneval`` (lm-eval's ``build_predictions``): the prompt (signature and docstring) followed by
    each completion; the test code comes from the task's target."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_1(references: list[str], predictions: list[str] | list[list[str]]) -> float:
    """1.0 when the (first) program followed by the test code runs to the end in the sandbox, else 0.0."""
    program = predictions[0]
    if isinstance(program, (list, tuple)):
        program = program[0]
    return float(run_program(f"{program}\n\n{references[0]}\n", LIMITS).passed)
