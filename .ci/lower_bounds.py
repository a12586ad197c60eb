"""Print pip constraints that pin every dependency of pyproject.toml (test extra included) to the lowest
version its range admits: `make test-lower` installs the package with them, so the suite also runs
against the oldest releases the package claims to work with. torch and torchvision are left out: the
Makefile's TORCH pin installs them (other releases are several GB of downloads on the team's machines)."""

import re
import sys
from pathlib import Path

import tomllib

SKIP = {"torch", "torchvision"}

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
for requirement in requirements:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)", requirement)
    name, spec = m.group(1), m.group(2)
    lowest = re.search(r">=\s*([0-9][^,;\s]*)", spec)
    if name.lower() in SKIP:
        continue
    if lowest is None:
        sys.exit(f"{name}: no lower bound (>=) in pyproject.toml; add one so the lowest release can be tested")
    print(f"{name}=={lowest.group(1)}")
