"""Stderr hygiene for the commands, TensorFlow-free (it must run before TensorFlow loads).

TensorFlow (2.21) writes its start-up lines from C++ through absl logging before absl is
initialised ("WARNING: All log messages before absl::InitializeLog() ...", the oneDNN and
CUDA-driver notices), so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them; cpu_feature_guard's
notice and the failed ``cuInit`` of a machine without a GPU come later (TensorFlow 2.21 even
prints the pre-initialisation lines twice, with ``TF_CPP_MIN_LOG_LEVEL=3`` too).
``quiet_tensorflow`` sets ``TF_CPP_MIN_LOG_LEVEL=2`` (C++ INFO and WARNING off, errors on)
unless the user exported a level, which is kept, and, for a command's own process, passes
its stderr through a small filter process that drops those lines and nothing else: a separate
process, so that a crash's last words still reach the terminal. The filter drops the start-up
lines whatever the level, and other C++ log lines below the level in force (as TensorFlow
itself does once absl is initialised); only ``--verbose`` leaves everything as TensorFlow
prints it.

``without_lines`` holds back, for the length of a block, C-level stderr lines that the
caller reports better itself (libjpeg's "Premature end of JPEG file", which names no file,
while the builder quarantines each truncated JPEG with its reason).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
#: absl's C++ log line: severity letter, date, time, thread, file:line]
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] ")
_NOISE_TEXT = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    # cpu_feature_guard's second line
    "To enable the following instructions:",
)
#: ERROR-level lines that are notices, not errors: (source file, text in the line).
_BENIGN_ERRORS = (
    ("util.cc", "Falling back to the default Eigen-based implementation"),  # oneDNN, uint8
)
#: the C++ sources of TensorFlow's start-up INFO/WARNING lines (oneDNN, CUDA runtime stub,
#: CPU instruction notice): dropped even where the user's level asks for INFO lines
_STARTUP_SOURCES = ("port.cc", "cudart_stub.cc", "cpu_feature_guard.cc")
_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3 hides the severities before it
DEFAULT_LEVEL = 2


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver loaded (a failed cuInit is then an error)."""
    return Path("/proc/driver/nvidia").exists()


def log_level(value: str | None) -> int:
    """``TF_CPP_MIN_LOG_LEVEL``'s value as TensorFlow reads it: 0..3, else the default (2)."""
    try:
        return min(max(int(str(value).strip()), 0), 3)
    except ValueError:
        return DEFAULT_LEVEL


def is_startup_noise(line: str, gpu_expected: bool = False, level: int = DEFAULT_LEVEL) -> bool:
    """Whether ``line`` (from stderr) is TensorFlow chatter to drop: a start-up line (absl's
    pre-initialisation notice, the oneDNN, CUDA-stub and cpu_feature_guard notices, oneDNN's
    uint8 fall-back notice, or, on a machine without an NVIDIA driver (``gpu_expected``
    False), the failed ``cuInit``) whatever ``level`` says, or a C++ log line of a severity
    that ``TF_CPP_MIN_LOG_LEVEL=level`` hides (INFO and WARNING at 2, also lines printed
    before TensorFlow reads it). FATAL lines always pass."""
    text = line.rstrip("\r\n")
    if text.startswith(_NOISE_TEXT):
        return True
    m = _ABSL_LINE.match(text)
    if m is None:
        return False
    severity, source = m.groups()
    if severity in "IW" and source in _STARTUP_SOURCES:
        return True
    if severity != "F" and _SEVERITIES.index(severity) < level:
        return True
    if any(source == f and text_in in text for f, text_in in _BENIGN_ERRORS):
        return True
    return not gpu_expected and source == "cuda_platform.cc" and "failed call to cuInit" in text


def _filter_loop(read_fd: int, write_fd: int, gpu_expected: bool, level: int) -> None:
    """Copy ``read_fd`` to ``write_fd`` line by line, dropping start-up noise, until EOF."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(
            line + b"\n"
            for line in lines
            if not is_startup_noise(line.decode(errors="replace"), gpu_expected, level)
        )
        if out:
            os.write(write_fd, out)
    if pending and not is_startup_noise(pending.decode(errors="replace"), gpu_expected, level):
        os.write(write_fd, pending)


def _filter_stderr(level: int) -> None:
    """Route fd 2 through a forked filter process (POSIX only; before any thread starts)."""
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    real = os.dup(2)
    gpu_expected = nvidia_driver_present()
    pid = os.fork()
    if pid == 0:  # the filter: keeps only the pipe and the real stderr
        # Slurm's SIGTERM (preemption) and a terminal's Ctrl-C reach the whole process group:
        # the filter outlives them and ends at EOF, when the command itself has ended, so the
        # command's last words (the checkpoint it saved, a traceback) still get through.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(write_fd)
        for fd in (0, 1):
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, fd)
            os.close(devnull)
        lo = 3
        for keep in sorted((read_fd, real)):
            os.closerange(lo, keep)
            lo = keep + 1
        os.closerange(lo, 1 << 16)
        os.dup2(real, 2)
        try:
            _filter_loop(read_fd, real, gpu_expected, level)
        finally:
            os._exit(0)
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def restore() -> None:  # at exit: give the filter EOF and let it write the rest first
        sys.stderr.flush()
        os.dup2(real, 2)
        deadline = time.monotonic() + 2.0  # a child that still holds the pipe: stop waiting
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.01)

    atexit.register(restore)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:  # e.g. started with stderr closed: nothing to filter
        return False
    return True


def quiet_tensorflow(verbose: bool = False, filter_stderr: bool = False) -> str:
    """Keep TensorFlow's start-up chatter out of the output (see the module docstring);
    returns what was done. ``filter_stderr`` only for the command's own process (it forks)."""
    if verbose:
        return "verbose: TensorFlow's log lines shown as it prints them"
    if LEVEL_ENV in os.environ:  # the user's level is kept; the start-up lines still go
        done = f"{LEVEL_ENV}={os.environ[LEVEL_ENV]} (set by the environment) kept"
    else:
        os.environ[LEVEL_ENV] = str(DEFAULT_LEVEL)
        done = f"{LEVEL_ENV}={DEFAULT_LEVEL}"
    if filter_stderr and hasattr(os, "fork") and "tensorflow" not in sys.modules and _open(2):
        _filter_stderr(log_level(os.environ[LEVEL_ENV]))
        return f"{done} and start-up lines filtered"
    return done


@contextlib.contextmanager
def without_lines(drop: Callable[[str], bool]):
    """Inside the block, fd 2 goes to a temporary file; afterwards every captured line that
    ``drop`` does not claim is written to stderr (nothing is lost, only the order against
    stdout). Yields a text stream on the real stderr, for progress bars meant to be seen."""
    sys.stderr.flush()
    real = os.dup(2)
    stream = os.fdopen(os.dup(real), "w", buffering=1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield stream
        finally:
            stream.close()
            sys.stderr.flush()
            os.dup2(real, 2)
            os.close(real)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not drop(line))
            if kept:
                os.write(2, kept.encode())
