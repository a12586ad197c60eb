"""Every Python block of README.md, RESULTS.md and the docs/ pages runs as shown; every file, config and
command that their shell blocks name exists; the README stays a short front page that links every docs/
page, and every relative link of these pages leads to a file (and heading) that exists.
Run: .venv/bin/python -m pytest tests/test_readme.py

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

DOCS = [REPO / "README.md", REPO / "RESULTS.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
README_MAX_LINES = 250  # a front page: what it is, install, quick start, the main commands, where to read more


def name(doc: Path) -> str:
    return doc.relative_to(REPO).as_posix()


def blocks(language: str) -> list[tuple[str, int, str]]:
    """(file name, line number, code) of every fenced block of `language` in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                found.append((name(doc), text[: m.start()].count("\n") + 1, m.group(2)))
    return found


PYTHON_BLOCKS = blocks("python")


def test_the_docs_have_the_python_blocks_this_test_runs() -> None:
    # A regex that stopped matching would let the test below pass on nothing.
    assert len(PYTHON_BLOCKS) >= 3, PYTHON_BLOCKS
    assert any("VAE.from_pretrained" in code for _, _, code in PYTHON_BLOCKS)
    # ... and a glob that stopped finding docs/ would let both tests pass on the README alone.
    assert any(doc.startswith("docs/") for doc, _, _ in PYTHON_BLOCKS), PYTHON_BLOCKS
    assert any(doc.startswith("docs/") for doc, _, _ in blocks("bash"))


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
        env = {}
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
            key, _, value = words[0].partition("=")
            env[key] = value
            words = words[1:]
        if "CONFIG" in env and not config_exists(env["CONFIG"]):  # the launch scripts' --config
            problems.append(f"{doc}:{line}: CONFIG={env['CONFIG']}: {NO_CONFIG}")
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
            if words[i - 1] == "--config":
                if not config_exists(word):
                    problems.append(f"{doc}:{line}: --config {word}: {NO_CONFIG}")
            elif words[i - 1] == "--config_file":
                if not (REPO / word).is_file():
                    problems.append(f"{doc}:{line}: {word} does not exist")
            elif re.fullmatch(r"(vae_dist|launch|slurm|tests|configs)/[\w/.-]+\.(py|sh|sbatch|yaml)", word):
                if not (REPO / word).is_file():
                    problems.append(f"{doc}:{line}: {word} does not exist")
            elif words[i - 1] == "-m" and word.startswith("vae_dist."):
                if not (REPO / (word.replace(".", "/") + ".py")).is_file():
                    problems.append(f"{doc}:{line}: module {word} does not exist")
        if head == "make" and len(words) > 1 and not re.search(rf"^{re.escape(words[1])}:", makefile, re.M):
            problems.append(f"{doc}:{line}: the Makefile has no target {words[1]}")
        problems += config_problems(doc, line, words, env.get("CONFIG"))
    assert not problems, "\n".join(problems)


def is_config_name(value: str) -> bool:
    return "/" not in value and not value.endswith((".yaml", ".yml"))


NO_CONFIG = "neither a config that ships with the package (vae_dist/configs/NAME.yaml) nor a file of the repository"


def config_exists(value: str) -> bool:
    """`--config VALUE` as the docs use it: a bare name of a shipped config, or a path from the repository root."""
    if is_config_name(value):
        return (REPO / "vae_dist" / "configs" / f"{value}.yaml").is_file()
    return (REPO / value).is_file()


def config_problems(doc: str, line: int, words: list[str], env_config: str | None = None) -> list[str]:
    """A training command's config (by name or file; `CONFIG=` for the launch scripts) and its
    section.key=value overrides load (keys, types, ranges)."""
    from vae_dist.config import ConfigError, load_config

    if not any(
        w.endswith(
            (
                "vae_dist/train.py",
                "vae_dist.train",
                "vae_dist.cli.train",
                "vae-train",
                "vae-seeds",
                ".sbatch",
                "_box.sh",
            )
        )
        for w in words
    ):
        return []
    config = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"), env_config)
    if config is not None and not config_exists(config):
        return []  # reported by the test above
    overrides = [w for w in words if re.fullmatch(r"[a-z_]+\.[a-z_]+=.*", w)]
    try:
        load_config(config if config is None or is_config_name(config) else REPO / config, overrides)
    except ConfigError as err:
        return [f"{doc}:{line}: {' '.join(words)}: {err}"]
    return []


def test_the_readme_is_a_short_front_page_that_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    lines = readme.count("\n")  # as wc -l counts them
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail into a docs/ page"
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert pages, "no docs/*.md pages"
    unlinked = [p for p in pages if not re.search(rf"\]\(docs/{re.escape(p)}(#[^)]*)?\)", readme)]
    assert not unlinked, f"README.md links no docs/ page {unlinked}: add it to 'Where to read more'"


HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(doc: Path) -> set[str]:
    """The #fragments GitHub gives the headings of a Markdown page (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", doc.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    problems = []
    for doc in DOCS:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), doc.read_text())  # code is not linked
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:: not checked here
                continue
            line = text[: m.start()].count("\n") + 1
            path, _, fragment = target.partition("#")
            file = (doc.parent / path) if path else doc
            if not file.exists():
                problems.append(f"{name(doc)}:{line}: {target}: no file {path}")
            elif fragment and file.suffix == ".md" and fragment not in heading_anchors(file):
                problems.append(f"{name(doc)}:{line}: {target}: {path or name(doc)} has no heading #{fragment}")
    assert not problems, "\n".join(problems)


def test_the_layout_page_names_every_module_once() -> None:
    """docs/layout.md's trees list each module of the package and of its programs: a module added or
    removed without the page is caught here."""
    text = (REPO / "docs" / "layout.md").read_text()
    named = re.findall(r"[├└]── (\S+\.py)", text)
    library = sorted(p.name for p in (REPO / "vae_dist").glob("*.py") if p.name != "__init__.py")
    programs = sorted(p.name for p in (REPO / "vae_dist" / "cli").glob("*.py") if p.name != "__init__.py")
    assert sorted(named) == sorted(library + programs), set(named) ^ set(library + programs)


def test_no_library_module_imports_a_program() -> None:
    """A library with thin programs on top: vae_dist's modules never import vae_dist.cli."""
    import ast

    offenders = []
    for path in sorted((REPO / "vae_dist").glob("*.py")):
        if path.name == "train.py":  # the file `accelerate launch vae_dist/train.py` runs: it hands over to the program
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("vae_dist.cli")]
    assert not offenders, offenders
