"""Run by tests/test_signals.py: start `accelerate launch` (1 or 2 processes) training into RUN_DIR,
send SIGTERM to the launcher alone once training has started, and report what became of every
process, and how long the stop took, as one JSON line on stdout.

    python tests/launcher_probe.py NPROC RUN_DIR OUT_DIR overrides...

This process makes itself a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER), so a training
process that its launcher leaves behind is reparented here instead of to PID 1, and its exit status
can be read with waitpid: exactly what a supervisor that kills the launcher would never see.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

nproc, run_dir, out_dir, overrides = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, "prctl(PR_SET_CHILD_SUBREAPER) failed"

flags = ["--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
if nproc > 1:
    flags = ["--multi_gpu", *flags, "--main_process_port", sys.argv[0] and str(29500 + os.getpid() % 1000)]
cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "vae_dist.cli.train", *overrides]
out_dir.mkdir(parents=True, exist_ok=True)
with open(out_dir / "stdout", "w") as stdout, open(out_dir / "stderr", "w") as stderr:
    launcher = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
# PROBE_RECORDS: signal once metrics.jsonl holds that many lines; PROBE_AT_TEST=1: once it holds a test
# record (the epoch-end figures are then being drawn: the slowest moment to stop). Default: as soon
# as the file exists, plus 0.5 s.
records, metrics = int(os.environ.get("PROBE_RECORDS", "0")), run_dir / "metrics.jsonl"
at_test = os.environ.get("PROBE_AT_TEST") == "1"
deadline = time.time() + 600
while launcher.poll() is None and time.time() < deadline:
    lines = metrics.read_bytes().splitlines() if metrics.exists() else None
    if lines is not None and len(lines) >= records and (not at_test or any(b'"test"' in line for line in lines)):
        break
    time.sleep(0.02 if at_test else 0.1)
if not records and not at_test:
    time.sleep(0.5)  # a few steps into training
signalled = launcher.poll() is None
signalled_at = time.time()
if signalled:
    launcher.send_signal(signal.SIGTERM)
launcher_code = launcher.wait(timeout=180)
launcher_exited_at = time.time()

orphans = []  # processes reparented here after the launcher exited: (pid, exit code or -signal)
deadline = time.time() + 180
while time.time() < deadline:
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:  # no children left at all
        break
    if pid == 0:
        time.sleep(0.1)
        continue
    orphans.append({"pid": pid, "code": os.waitstatus_to_exitcode(status), "at": time.time() - signalled_at})
checkpoints = sorted((run_dir / "checkpoints").glob("step-*/state.json"))
print(
    json.dumps(
        {
            "signalled": signalled,
            "launcher_code": launcher_code,
            "orphans": orphans,
            # seconds from the signal: the newest checkpoint on disk, the launcher's exit
            "to_checkpoint": checkpoints[-1].stat().st_mtime - signalled_at if checkpoints else None,
            "to_launcher_exit": launcher_exited_at - signalled_at,
            "stdout": (out_dir / "stdout").read_text(),
            "stderr": (out_dir / "stderr").read_text()[-4000:],
        }
    )
)
