"""The package as a user gets it: build the sdist and, from it, the wheel; install the wheel in a fresh
virtual environment outside the clone; train three steps from a folder that has no configs/, naming
the shipped config (`--config smoke`); `vae-evaluate --help` runs there too.

    .venv/bin/python -m pytest -q tests/test_wheel.py    # ~2 min on 2 idle cores, ~6 GB in a temp folder

The fresh environment installs the torch release the Makefile pins (TORCH) with the wheel, from the
package index like any user's install: nothing of the test's own environment or of the clone is on
its path. The environment is removed at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, make_mnist

pytestmark = pytest.mark.slow

SHIPPED = sorted(p.name for p in (REPO / "vae_dist" / "configs").glob("*.yaml"))


def makefile_torch() -> list[str]:
    """The requirements of the Makefile's `TORCH ?= ...` line, e.g. ['torch==2.14.1', 'torchvision==0.29.1']."""
    m = re.search(r"^TORCH \?= (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "the Makefile has no `TORCH ?= ...` line"
    return m.group(1).split()


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`cmd` with no trace of the clone or the test's environment in PATH or PYTHONPATH; the output is
    in the assertion message when it fails."""
    env = cpu_env()
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.startswith(str(REPO)))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_wheel_installs_and_trains_outside_the_clone(tmp_path: Path) -> None:
    assert REPO not in tmp_path.parents, "the fresh install must live outside the clone"
    dist, venv, elsewhere = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # sdist, then the wheel from the unpacked sdist: what a release would upload.
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("vae_dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.removeprefix("vae_dist/configs/") for n in names if n.startswith("vae_dist/configs/")) == SHIPPED
    assert "vae_dist/config_load.py" in names and "vae_dist/cli/train.py" in names

    try:
        run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
        python, bin_dir = venv / "bin" / "python", venv / "bin"
        # --no-compile: byte-compiling all of torch takes longer than installing it; what runs compiles on import.
        run(
            [str(python), "-m", "pip", "install", "-q", "--no-compile", str(wheel), *makefile_torch()],
            cwd=tmp_path,
            timeout=480,
        )

        # The package that runs is the wheel's, in the fresh environment, not the clone.
        probe = (
            "import json, importlib.metadata as md, importlib.resources as r, vae_dist;"
            "print(json.dumps({'file': vae_dist.__file__, 'direct_url': md.distribution('vae_dist').read_text('direct_url.json'),"
            "'smoke': (r.files('vae_dist') / 'configs' / 'smoke.yaml').is_file()}))"
        )
        where = json.loads(run([str(python), "-c", probe], cwd=elsewhere, timeout=60).stdout)
        assert Path(where["file"]).is_relative_to(venv) and where["smoke"], where
        assert json.loads(where["direct_url"])["url"].endswith(wheel.name), where  # installed from the wheel file

        data, run_dir = make_mnist(tmp_path / "data"), tmp_path / "run"
        overrides = [f"data.root={data}", "data.download=false", f"run.dir={run_dir}", "train.max_steps=3"]
        overrides += ["tracking.mode=off", "train.device=cpu", "model.hidden_dims=[16]", "train.eval_batch_size=64"]
        run([str(bin_dir / "vae-train"), "--config", "smoke", *overrides], cwd=elsewhere, timeout=300)
        assert (run_dir / "model.safetensors").is_file() and (run_dir / "config.yaml").is_file()
        assert "max_steps: 3" in (run_dir / "config.yaml").read_text()

        help_text = run([str(bin_dir / "vae-evaluate"), "--help"], cwd=elsewhere, timeout=120).stdout
        assert "usage: vae-evaluate" in help_text
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~6 GB of torch and CUDA libraries
