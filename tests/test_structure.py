"""The package stays readable: its size limits, and the path vae-train's arguments take through it.
Run: .venv/bin/python -m pytest tests/test_structure.py   (CPU)"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

from conftest import REPO, make_mnist

PACKAGE = REPO / "vae_dist"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_TRAINER_LINES = 200


def test_no_module_or_function_outgrows_one_reader() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                too_long.append(f"{name}:{node.lineno} {node.name}(): {lines} lines")
            if isinstance(node, ast.ClassDef) and node.name == "Trainer" and lines > MAX_TRAINER_LINES:
                too_long.append(f"{name}: class Trainer: {lines} lines")
    assert not too_long, "split these along the data flow: " + "; ".join(too_long)


def test_the_arguments_enter_each_file_at_most_twice(tmp_path: Path) -> None:
    """From vae-train's parsed arguments to a built Trainer: every call from one package file into
    another that is handed the arguments, the Config or one of its sections counts as entering the
    callee's file (imports aside). A component that reaches back into a file the walk has left shows here."""
    from vae_dist import config
    from vae_dist.cli.train import parse_args
    from vae_dist.trainer import Trainer

    root = str(PACKAGE) + "/"
    data = make_mnist(tmp_path / "data")
    args = parse_args(["--config", "smoke", f"data.root={data}", "data.download=false", f"run.dir={tmp_path / 'run'}",
                       "train.max_steps=1", "tracking.mode=off", "train.device=cpu"])  # fmt: skip
    carriers = (config.Config, *config.SECTIONS.values())
    given = {id(args), id(args.overrides), id(args.config)}
    entries: collections.Counter[str] = collections.Counter()
    walk: list[str] = []

    def profile(frame, event, arg) -> None:
        if event != "call" or frame.f_back is None or frame.f_code.co_name.startswith("<"):
            return
        callee, caller = frame.f_code.co_filename, frame.f_back.f_code.co_filename
        if not callee.startswith(root) or callee == caller:
            return
        values = frame.f_locals.values()
        if any(isinstance(v, carriers) or id(v) in given for v in values) or frame.f_code.co_name == "build_config":
            entries[callee[len(root) :]] += 1
            walk.append(f"{callee[len(root) :]}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        trainer = Trainer(config.load_config(args.config, args.overrides))
    finally:
        sys.setprofile(None)
    trainer.close()
    assert "config_load.py:load_config" in walk and "trainer.py:__init__" in walk  # the profile saw the walk
    assert max(entries.values()) <= 2, (dict(entries), walk)
