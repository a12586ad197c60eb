"""Every Python block of README.md and RESULTS.md runs as shown; every file, config and command that
their shell blocks name exists. Run: .venv/bin/python -m pytest tests/test_readme.py

The Python blocks run in a folder laid out as the README assumes: a repository root holding
`runs/mnist`, written here by a real (tiny, offline-tracked) training run, with `../shared/data`
beside it holding tiny generated MNIST files, so no block is skipped and no real data is needed.
"""

from __future__ import annotations

import re
import shlex
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import REPO, make_mnist, train_in_process

DOCS = [REPO / "README.md", REPO / "RESULTS.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[tuple[str, int, str]]:
    """(file name, line number, code) of every fenced block of `language` in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                found.append((doc.name, text[: m.start()].count("\n") + 1, m.group(2)))
    return found


PYTHON_BLOCKS = blocks("python")


def test_the_docs_have_the_python_blocks_this_test_runs() -> None:
    # A regex that stopped matching would let the test below pass on nothing.
    assert len(PYTHON_BLOCKS) >= 3, PYTHON_BLOCKS
    assert any("VAE.from_pretrained" in code for _, _, code in PYTHON_BLOCKS)


def needs_wandb(code: str) -> bool:
    return "read_wandb_run" in code or "local_runs" in code


@pytest.fixture(scope="module")
def readme_layout(tmp_path_factory: pytest.TempPathFactory):
    """layout(tracking): a repository root with runs/mnist from a 1-epoch run of a tiny model, and
    ../shared/data beside it; tracking.mode=offline (a W&B run to read back, ~8 s more) or off."""
    made: dict[str, Path] = {}

    def layout(tracking: str) -> Path:
        if tracking not in made:
            base = tmp_path_factory.mktemp(f"layout-{tracking}")
            root = base / "repo"
            root.mkdir()
            make_mnist(base / "shared" / "data")
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(root)
                mp.setenv("WANDB_SILENT", "true")
                train_in_process(
                    [
                        "data.root=../shared/data",
                        "data.download=false",
                        "run.dir=runs/mnist",
                        "train.epochs=1",
                        "train.batch_size=100",
                        "train.eval_batch_size=150",
                        "model.hidden_dims=[16]",
                        f"tracking.mode={tracking}",
                        "train.device=cpu",
                    ]
                )
            if tracking == "offline":  # wandb's service writes the run's last records after finish() returns
                wait_for_exit_record(root / "runs" / "mnist")
            made[tracking] = root
        return made[tracking]

    return layout


def wait_for_exit_record(run_dir: Path, timeout: float = 20.0) -> None:
    """As a user reads the run after the training process exited: the W&B run complete on disk."""
    from vae_dist.tracking import local_runs, read_wandb_run

    deadline = time.monotonic() + timeout
    while not read_wandb_run(local_runs(run_dir)[-1])["exited"] and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize(
    "doc, line, code",
    [pytest.param(*b, marks=[pytest.mark.slow] if needs_wandb(b[2]) else []) for b in PYTHON_BLOCKS],
    ids=[f"{d}:{n}" for d, n, _ in PYTHON_BLOCKS],
)
def test_python_block_runs_as_shown(readme_layout, monkeypatch, doc: str, line: int, code: str) -> None:
    root = readme_layout("offline" if needs_wandb(code) else "off")
    monkeypatch.chdir(root)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"{doc}:{line}", "exec"), namespace)
    if "write_figures" in code:  # what the block promises: the figures, in the folder it names
        assert sorted(p.name for p in (root / "pictures").glob("*.png")) == [
            "latent.png",
            "loss.png",
            "manifold.png",
            "prior.png",
            "recon.png",
        ]
    if needs_wandb(code):
        assert namespace["run"]["history"] and namespace["run"]["config"]


def shell_words() -> list[tuple[str, int, list[str]]]:
    """The words of every command in the docs' bash blocks (continuation lines joined, comments cut)."""
    found = []
    for doc, line, code in blocks("bash"):
        for command in code.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(command, comments=True)
            except ValueError:  # an unbalanced quote in a command: reported by the test below
                words = [command]
            if words:
                found.append((doc, line, words))
    return found


def test_shell_blocks_name_files_configs_and_commands_that_exist() -> None:
    """A newcomer's command fails first on a path or command that is not there; this catches those.
    Paths of run outputs (runs/...) and data (../shared/...) are made by earlier commands."""
    scripts = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("vae_dist.")}
    assert "vae-train" in scripts  # the project is installed (make venv)
    commands = scripts | {"make", "python", "accelerate", "wandb", "sbatch", "squeue", "tail", "scontrol", "scancel"}
    commands.add("source")  # source .venv/bin/activate, which make creates
    makefile = (REPO / "Makefile").read_text()
    problems = []
    for doc, line, words in shell_words():
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
            words = words[1:]
        if words[:1] == ["sudo"]:
            words = words[1:]
        if not words:
            continue
        head = words[0]
        if "/" in head:  # a script of the repository
            if not (REPO / head).is_file():
                problems.append(f"{doc}:{line}: {head} does not exist")
        elif head not in commands:
            problems.append(f"{doc}:{line}: unknown command {head}")
        for i, word in enumerate(words):
            value = word.split("=", 1)[1] if word.startswith("CONFIG=") else word
            if words[i - 1] in ("--config", "--config_file") or word.startswith("CONFIG="):
                if not (REPO / value).is_file():
                    problems.append(f"{doc}:{line}: {value} does not exist")
            elif re.fullmatch(r"(vae_dist|launch|slurm|tests|configs)/[\w/.-]+\.(py|sh|sbatch|yaml)", word):
                if not (REPO / word).is_file():
                    problems.append(f"{doc}:{line}: {word} does not exist")
            elif words[i - 1] == "-m" and word.startswith("vae_dist."):
                if not (REPO / (word.replace(".", "/") + ".py")).is_file():
                    problems.append(f"{doc}:{line}: module {word} does not exist")
        if head == "make" and len(words) > 1 and not re.search(rf"^{re.escape(words[1])}:", makefile, re.M):
            problems.append(f"{doc}:{line}: the Makefile has no target {words[1]}")
        problems += config_problems(doc, line, words)
    assert not problems, "\n".join(problems)


def config_problems(doc: str, line: int, words: list[str]) -> list[str]:
    """A training command's config file and section.key=value overrides load (keys, types, ranges)."""
    from vae_dist.config import ConfigError, load_config

    if not any(
        w.endswith(("vae_dist/train.py", "vae_dist.train", "vae-train", "vae-seeds", ".sbatch", "_box.sh"))
        for w in words
    ):
        return []
    config = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"), None)
    overrides = [w for w in words if re.fullmatch(r"[a-z_]+\.[a-z_]+=.*", w)]
    try:
        load_config(REPO / config if config else None, overrides)
    except ConfigError as err:
        return [f"{doc}:{line}: {' '.join(words)}: {err}"]
    return []
