"""Config tree: YAML + overrides, strict checking. Run: pytest tests/test_config.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from vae_dist.config import Config, ConfigError, OptimConfig, load_config, shipped_configs

SHIPPED = REPO / "vae_dist" / "configs"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_the_shipped_configs_are_the_yaml_files_in_the_package() -> None:
    assert shipped_configs() == sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    assert {"mnist", "smoke", "iwae_paper_iwae"} <= set(shipped_configs())


def test_configs_folder_links_every_shipped_config() -> None:
    """configs/NAME.yaml in a clone is a relative link to vae_dist/configs/NAME.yaml, so the commands
    that name configs/mnist.yaml keep working; configs/accelerate/ holds the launcher files."""
    links = sorted((REPO / "configs").glob("*.yaml"))
    assert [p.stem for p in links] == shipped_configs()
    for link in links:
        assert link.is_symlink() and not Path(link.readlink()).is_absolute(), link
        assert link.resolve() == (SHIPPED / link.name).resolve(), link


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_by_name_is_the_file(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: only the package has them
    by_path = load_config(SHIPPED / f"{name}.yaml", ["train.epochs=2"])
    assert load_config(name, ["train.epochs=2"]) == by_path
    assert load_config(f"{name}.yaml", ["train.epochs=2"]) == by_path


def test_an_existing_file_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist.yaml").write_text("train:\n  epochs: 7\n")
    assert load_config("mnist.yaml").train.epochs == 7
    assert load_config("mnist").train.epochs == 40  # no file named "mnist" here: the shipped one


@pytest.mark.parametrize("value", ["mnsit", "configs/nosuch.yaml", "elsewhere/mnist.yaml", "mnist.yml"])
def test_neither_file_nor_shipped_name_lists_the_choices(value: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(value)
    message = str(err.value)
    assert f"--config {value} is neither a file nor a shipped config" in message
    assert "the shipped configs are " + ", ".join(shipped_configs()) in message
    assert "e.g. --config mnist" in message


def test_mnist_yaml_is_the_reference_experiment() -> None:
    cfg = load_config(REPO / "configs" / "mnist.yaml")
    assert (cfg.model.z_dim, cfg.model.hidden_dims, cfg.optim.lr) == (2, [512, 256], 1e-3)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.data.binarize, cfg.model.objective) == (100, 40, "none", "elbo")
    assert cfg.optim.schedule == "constant" and cfg.train.precision == "no"


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "optim.lr=2e-3",
            "model.hidden_dims=[64, 32]",
            "tracking.mode=off",
            "train.max_steps=null",
            "run.dir=2024",
            "optim.grad_clip=1",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.optim.lr == 2e-3 and cfg.model.hidden_dims == [64, 32]
    assert cfg.tracking.mode == "off" and cfg.train.max_steps is None and cfg.run.dir == "2024"
    assert isinstance(cfg.optim.grad_clip, float)


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.epochs=-1", ["train.epochs=-1", ">= 1"]),
        ("model.z_dim=abc", ["model.z_dim='abc'", "an integer"]),
        ("optim.lrr=1", ["optim.lrr is not a config key", "lr"]),
        ("data.dataset=cifar", ["data.dataset='cifar'", "mnist, fashion_mnist, kmnist"]),
        ("train.precision=fp8", ["train.precision", "no, fp16, bf16"]),
        ("nosuch.key=1", ["nosuch is not a config section", "train"]),
        ("train.epochs", ["section.key=value"]),
        ("model.hidden_dims=[0]", ["model.hidden_dims", "integers >= 1"]),
        ("train.eval_batch_size=true", ["train.eval_batch_size=True", "an integer"]),
    ],
)
def test_bad_override_names_key_and_allowed(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_all_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=0", "optim.lr=-1"])
    assert "train.epochs=0" in str(err.value) and "optim.lr=-1" in str(err.value)


def test_accumulation_arithmetic() -> None:
    cfg = load_config(None, ["train.batch_size=100", "train.micro_batch_size=25"])
    assert cfg.train.accumulation_steps(2) == 2 and cfg.train.micro_batch(2) == 25
    assert load_config(None, ["train.batch_size=100"]).train.accumulation_steps(4) == 1
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, ["train.batch_size=100", "train.micro_batch_size=30"]).train.accumulation_steps(1)
    with pytest.raises(ConfigError, match="over 3 processes; use a multiple of 3 \\(e.g. 99 or 102\\)"):
        load_config(None, ["train.batch_size=100"]).train.accumulation_steps(3)


@pytest.mark.parametrize("override", ["train.epochs=-1", "model.z_dim=abc", "optim.lrr=1", "optim.lr=inf"])
def test_cli_bad_override_exits_with_one_line_and_writes_nothing(override: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vae_dist.cli.train",
            "--config",
            str(REPO / "configs" / "mnist.yaml"),
            f"run.dir={run_dir}",
            override,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0]
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_cli_config_by_name_outside_a_clone(tmp_path: Path) -> None:
    """`vae-train --config smoke` from a folder with no configs/: the name is found in the package
    (the bad override then stops it); an unknown name is one line that lists the shipped configs."""
    cmd = [sys.executable, "-m", "vae_dist.cli.train", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([*cmd, "--config", "smoke", "train.epochs=-1"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "vae-train: error: train.epochs=-1: must be >= 1."
    ]
    proc = subprocess.run([*cmd, "--config", "mnsit"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--config mnsit is neither a file nor a shipped config" in line and "mnist, mnist_recipe, smoke" in line
    assert not (tmp_path / "run").exists()


# inf and nan in every spelling, as an override and in a file, stop the run with the key named.
NON_FINITE = [  # (spelling, how the message shows it)
    (".inf", "inf"),
    ("-.inf", "-inf"),
    (".nan", "nan"),
    (".NaN", "nan"),
    ("1e400", "inf"),  # beyond float range: YAML reads inf
    ("1.0e+400", "inf"),
    ("-1e400", "-inf"),
    ("inf", "inf"),  # YAML leaves these strings, but float() would accept them
    ("nan", "nan"),
    ("-inf", "-inf"),
    ("Infinity", "Infinity"),
    ("NaN", "NaN"),
]


@pytest.mark.parametrize("spelling, shown", NON_FINITE, ids=[s for s, _ in NON_FINITE])
def test_non_finite_override_is_refused(spelling: str, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"optim.lr={spelling}"])
    assert f"optim.lr={shown}: must be a finite number" in str(err.value)
    assert "e.g. optim.lr=0.001" in str(err.value)


@pytest.mark.parametrize("spelling, shown", NON_FINITE, ids=[s for s, _ in NON_FINITE])
def test_non_finite_in_config_file_is_refused(spelling: str, shown: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  lr: {spelling}\n  weight_decay: {spelling}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for key in ("lr", "weight_decay"):
        assert f"optim.{key}={shown}: must be a finite number" in str(err.value)


def test_integer_too_large_for_a_float_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=1" + "0" * 400])
    assert "optim.lr=10000000000000000000... (401 characters): must be a finite number" in str(err.value)


@pytest.mark.parametrize("betas", ["[0.9, .nan]", "[.inf, 0.999]", "[0.9, 1e400]", "[0.9, nan]"])
def test_non_finite_inside_a_list_is_refused(betas: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"optim.betas={betas}"])
    assert "optim.betas=[" in str(err.value) and "must be a list of finite numbers" in str(err.value)
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  betas: {betas}\n")
    with pytest.raises(ConfigError, match=r"optim\.betas=\[.*\]: must be a list of finite numbers"):
        load_config(path)


def test_non_finite_leaves_ints_and_finite_floats_alone() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs=inf: must be an integer\."):
        load_config(None, ["train.epochs=.inf"])
    cfg = load_config(None, ["optim.lr=1e-300", "optim.betas=[0, 0.5]", "train.epochs=7", "optim.grad_clip=1e308"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.train.epochs, cfg.optim.grad_clip) == (1e-300, [0.0, 0.5], 7, 1e308)


def test_non_finite_collected_with_every_other_problem() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=.nan", "optim.step_gamma=inf", "model.z_dim=abc", "optim.lrr=1", "nodot=1"])
    message = str(err.value)
    for fragment in ("optim.lr=nan", "optim.step_gamma=inf", "model.z_dim='abc'", "optim.lrr", "'nodot=1'"):
        assert fragment in message


def test_range_check_refuses_nan_on_a_dataclass_built_directly() -> None:
    # NaN passes every comparison, so problems() needs its own finiteness check.
    assert OptimConfig(lr=float("nan")).problems() == ["optim.lr=nan: must be a finite number."]
    assert OptimConfig(grad_clip=float("inf")).problems() == ["optim.grad_clip=inf: must be a finite number."]


@pytest.mark.parametrize("text", ["", "   \n\t\n", "# only a comment\n\n# and another\n", "---\n"])
def test_empty_config_file_is_refused(text: str, tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"config file {path} is empty" in message
    assert "copy configs/mnist.yaml" in message and "drop --config" in message


@pytest.mark.parametrize(
    "text, kind", [("- data\n- model\n", "a list"), ("42\n", "a number"), ("just words\n", "a string")]
)
def test_top_level_that_is_not_a_mapping_is_refused(text: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"config file {path} holds {kind} at the top level, but it must be a mapping of sections" in str(err.value)


@pytest.mark.parametrize("text, kind", [("optim: [1, 2]\n", "a list"), ("optim: 3\n", "a number")])
def test_section_that_is_not_a_mapping_is_refused_with_other_problems(text: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text + "train:\n  epochs: abc\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.z_dim=0"])
    message = str(err.value)
    assert f"{path}: section 'optim' holds {kind}, but it must be a mapping of key: value lines" in message
    assert "train.epochs='abc'" in message


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1\n betas: [1\n")
    with pytest.raises(ConfigError, match=r"is not readable YAML \(.* at line 3, column 2\)"):
        load_config(path)


def test_learning_rate_schedule_is_a_function_of_the_step() -> None:
    o = load_config(None, ["optim.warmup_steps=10", "optim.schedule=cosine", "optim.min_lr_ratio=0.1"]).optim
    assert [o.lr_at(s, 110) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])  # linear warm-up
    assert o.lr_at(10, 110) == pytest.approx(1e-3) and o.lr_at(60, 110) == pytest.approx(0.55e-3)
    assert o.lr_at(110, 110) == pytest.approx(1e-4) and o.lr_at(500, 110) == pytest.approx(1e-4)  # min_lr_ratio
    s = load_config(None, ["optim.schedule=step", "optim.step_every=100", "optim.step_gamma=0.5"]).optim
    assert [s.lr_at(k, 1000) for k in (0, 99, 100, 250)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    assert load_config(None, []).optim.lr_at(12345, 100) == 1e-3  # constant


def test_iwae_paper_schedule_at_its_stage_boundaries() -> None:
    """3,280 steps, one a paper epoch: stage i (lr 1e-3 * 10^(-i/7)) starts after (3^i - 1) / 2 epochs,
    at 0, 1, 4, 13, 40, 121, 364 and 1093, and runs to the end at stage 7 (lr 1e-4)."""
    optim = OptimConfig(schedule="iwae_paper", lr=1e-3)
    starts = [(3**i - 1) // 2 for i in range(8)]
    assert starts == [0, 1, 4, 13, 40, 121, 364, 1093]
    for i, start in enumerate(starts):
        assert optim.lr_at(start, 3280) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
        if start > 0:  # the step before is the last of stage i - 1
            assert optim.lr_at(start - 1, 3280) == pytest.approx(1e-3 * 10 ** (-(i - 1) / 7), rel=1e-12)
    assert optim.lr_at(3279, 3280) == pytest.approx(1e-4, rel=1e-12)


def test_iwae_paper_schedule_compresses_to_the_run() -> None:
    """The stages keep their share of the run, 3^i / 3280: with 3280 epochs of 600 steps the paper's
    epoch boundaries land on whole epochs; a run of 32,800 steps ends stage 0 after 10 steps; after
    an lr warm-up the schedule starts where the warm-up ends."""
    optim = OptimConfig(schedule="iwae_paper")
    total = 3280 * 600
    assert [optim.lr_at(s, total) for s in (599, 600)] == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7)])
    assert [optim.lr_at(s, total) for s in (1093 * 600 - 1, 1093 * 600)] == pytest.approx([1e-3 * 10 ** (-6 / 7), 1e-4])
    assert [optim.lr_at(s, 32_800) for s in (9, 10)] == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7)])
    warm = OptimConfig(schedule="iwae_paper", warmup_steps=100)
    assert warm.lr_at(99, 3380) == pytest.approx(1e-3)
    assert [warm.lr_at(s, 3380) for s in (100, 101)] == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7)])


def test_recipe_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.activation='gelu': must be one of relu, tanh"):
        load_config(None, ["model.activation=gelu"])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.eps=0", "model.kl_warmup_steps=-1", "model.estimator=dreg"])
    text = str(err.value)
    for fragment in ("optim.eps=0.0: must be > 0", "model.kl_warmup_steps=-1", "model.estimator=dreg"):
        assert fragment in text, fragment
    cfg = load_config(REPO / "configs" / "iwae_paper_iwae.yaml", ["model.estimator=dreg"])
    assert (cfg.model.activation, cfg.model.hidden_dims, cfg.model.z_dim) == ("tanh", [200, 200], 50)
    assert (cfg.optim.eps, cfg.optim.schedule, cfg.train.batch_size, cfg.train.epochs) == (1e-4, "iwae_paper", 20, 3280)


def test_a_folder_as_config_names_its_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 1\n")
    (tmp_path / "b.yaml").write_text("train:\n  epochs: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"--config .* is a folder \(it holds a.yaml, b.yaml\); pass one YAML file, e.g. --config .*a.yaml",
    ):
        load_config(tmp_path)
