"""W&B tracking through Accelerate, offline: what a run stores, resume, failures, modes. No network.
Run: pytest tests/test_tracking.py"""

from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import fake_digits, train_in_process
from vae_dist import figures, tracking
from vae_dist.config import TrackingConfig, load_config
from vae_dist.model import VAE
from vae_dist.processes import usable_cores
from vae_dist.tracking import TrackingWarning, WandbTracker, start_tracker
from vae_dist.wandb_mode import log_with, resolve_mode
from vae_dist.wandb_runs import read_wandb_run

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # key-shaped, never valid


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials, no user settings, W&B's caches under tmp_path, nothing sent anywhere."""
    home = tmp_path / "wandb_home"
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")


def config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", "tracking.mode=offline", *overrides])


def accelerator(cfg):
    from accelerate import Accelerator

    return Accelerator(cpu=True, log_with=log_with(cfg.tracking))


def read_back(folder: Path, timeout: float = 20.0) -> dict:
    """The offline run as wandb stored it; wandb writes asynchronously, so wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_wandb_run(folder)
        if run["exited"] or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def log_epochs(tracker, steps: range, steps_per_epoch: int = 4) -> None:
    """What the trainer logs: train scalars every 2 steps, test scalars at each epoch's last step."""
    for step in steps:
        if step % 2 == 0:
            tracker.log({"train/elbo": 500.0 - step, "train/kl": 2.0, "train/epoch": step // steps_per_epoch}, step)
        if step % steps_per_epoch == 0:
            tracker.log({"test/elbo": 450.0 - step, "test/epoch": step // steps_per_epoch}, step)


# ------------------------------------------------------------------ modes
def test_resolve_mode_and_log_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auto = TrackingConfig(mode="auto")
    assert resolve_mode(auto) == "offline" and log_with(auto) == "wandb"  # no credentials: never a login prompt
    for mode in ("online", "offline", "off"):
        assert resolve_mode(TrackingConfig(mode=mode)) == mode
    assert log_with(TrackingConfig(mode="off")) is None
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode(auto) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "wandb_home" / "netrc"
    netrc.parent.mkdir(parents=True, exist_ok=True)
    netrc.write_text("machine example.org login me password secret\n")
    assert resolve_mode(auto) == "offline"  # credentials for another host do not count
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert resolve_mode(auto) == "online"
    for env, mode in (("offline", "offline"), ("disabled", "off"), ("online", "online")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_mode(auto) == mode
    assert resolve_mode(TrackingConfig(mode="offline")) == "offline"  # an explicit mode wins over WANDB_MODE


def test_off_writes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, "tracking.mode=off")
    acc = accelerator(cfg)
    tracker = start_tracker(cfg, acc, tmp_path / "run", None, {})
    assert type(tracker) is tracking.Tracker and tracker.run_id is None and acc.trackers == []
    tracker.log({"train/elbo": 1.0}, step=1)
    tracker.log_images({"recon": tmp_path / "missing.png"}, step=1)
    tracker.finish()
    acc.end_training()
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "wandb").exists()


# ------------------------------------------------------------------ what an offline run prints
def test_an_offline_run_ends_with_one_line_not_wandbs_summary(tmp_path: Path, monkeypatch, capfd) -> None:
    """W&B's ~30 lines of sparklines and summary would push the run's own summary off the screen."""
    monkeypatch.delenv("WANDB_SILENT")  # what a user's terminal gets
    cfg = config(tmp_path)
    acc = accelerator(cfg)
    run_dir = tmp_path / "run"
    tracker = start_tracker(cfg, acc, run_dir, None, {"num_processes": 1})
    log_epochs(tracker, range(1, 9))
    tracker.finish()
    acc.end_training()
    out, err = capfd.readouterr()
    assert "Run history" not in out + err and "Run summary" not in out + err and "sparkline" not in out + err
    hint = f"W&B: offline run in {tracker.local_dir}; upload it with `wandb sync {run_dir / 'wandb'}`"
    assert out.strip().splitlines()[-1] == hint, out
    assert read_back(tracker.local_dir)["history"]  # quiet on screen, complete on disk


def test_wandb_quiet_or_silent_set_by_the_user_decides(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_SILENT")
    assert tracking._settings("offline").quiet is True
    monkeypatch.setenv("WANDB_QUIET", "false")
    assert tracking._settings("offline").quiet is False


# ------------------------------------------------------------------ what an offline run stores
def test_offline_run_stores_config_history_images_and_model(tmp_path: Path) -> None:
    cfg = config(tmp_path, "tracking.name=tiny", "tracking.tags=[a, b]")
    acc = accelerator(cfg)
    run_dir = tmp_path / "run"
    info = {"num_processes": 1, "precision": "no", "accumulation_steps": 1, "device": "cpu"}
    tracker = start_tracker(cfg, acc, run_dir, None, info)
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline" and tracker.run_id
    assert tracker.local_dir.parent == run_dir / "wandb" and tracker.local_dir.name.endswith(tracker.run_id)

    log_epochs(tracker, range(1, 9))
    torch.manual_seed(0)
    model = VAE(hidden_dims=[16], z_dim=2)
    images, labels = fake_digits(60, seed=1)
    pngs = figures.write_figures(model, images.reshape(-1, 784), labels, [], tmp_path / "figs", seed=0)
    tracker.log_images(pngs, step=8)
    model.save_pretrained(tmp_path / "export")
    tracker.log_model(tmp_path / "export" / "model.safetensors")
    tracker.finish()
    acc.end_training()

    run = read_back(tracker.local_dir)
    assert run["run_id"] == tracker.run_id and run["exited"]
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [2, 4, 6, 8]  # one row per optimizer step that logged
    assert {"train/elbo", "train/kl", "train/epoch"} <= rows[2].keys() and "test/elbo" not in rows[2]
    assert rows[4]["test/elbo"] == 446 and rows[4]["test/epoch"] == 1 and rows[8]["test/epoch"] == 2
    for key in ("recon", "prior", "manifold", "latent"):
        stored = tracker.local_dir / "files" / rows[8][f"images/{key}/path"]
        assert stored.is_file() and stored.read_bytes() == pngs[key].read_bytes()
    # The resolved config and the run info are the run's config; the model is an artifact.
    assert run["config"]["model"]["z_dim"] == 2 and run["config"]["tracking"]["tags"] == ["a", "b"]
    runtime = run["config"]["runtime"]
    assert (
        runtime["device"] == "cpu"
        and runtime["num_processes"] == 1
        and runtime["torch"] == torch.__version__.split("+")[0]
    )
    assert run["artifacts"] == [f"model-{tracker.run_id}"]


def test_resumed_run_continues_the_same_run_without_duplicate_steps(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run_dir = tmp_path / "run"
    acc = accelerator(cfg)
    first = start_tracker(cfg, acc, run_dir, None, {})
    log_epochs(first, range(1, 11))  # crashed after step 10; the checkpoint was taken at step 8
    first.finish()
    read_back(first.local_dir)

    acc = accelerator(cfg)
    second = start_tracker(cfg, acc, run_dir, first.run_id, {})
    assert second.run_id == first.run_id and second.local_dir != first.local_dir
    assert second.logged_through == 10
    log_epochs(second, range(9, 17))  # replays 9..10, then new steps
    second.finish()
    acc.end_training()

    steps = [[row["_step"] for row in read_back(t.local_dir)["history"]] for t in (first, second)]
    assert steps == [[2, 4, 6, 8, 10], [12, 14, 16]]  # `wandb sync` uploads both, in start order, as one run
    assert tracking.local_runs(run_dir, first.run_id) == [first.local_dir, second.local_dir]


def test_offline_run_carries_its_sweep_group_and_seed_name_and_runtime_json_names_the_processor(
    tmp_path: Path,
) -> None:
    """What vae-seeds and slurm/train_seeds.sbatch give each seed: the sweep's group, a name saying its seed."""
    run_dir = tmp_path / "sweep" / "seed-3"
    cfg = load_config(None, [f"run.dir={run_dir}", "tracking.mode=offline", "tracking.group=sweep", "train.seed=3"])
    acc = accelerator(cfg)
    tracker = start_tracker(cfg, acc, run_dir, None, {"device": "cpu"})
    tracker.log({"train/elbo": 1.0}, step=1)
    tracker.finish()
    acc.end_training()
    run = read_back(tracker.local_dir)
    assert run["group"] == "sweep" and run["name"] == "seed-3" and run["exited"]
    runtime = json.loads((run_dir / "runtime.json").read_text())
    assert runtime["device"] == "cpu" and runtime["processor"].endswith(f" on {usable_cores()} cores")
    assert run["config"]["runtime"]["processor"] == runtime["processor"]


def test_history_reader_spans_many_log_blocks(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    acc = accelerator(cfg)
    tracker = start_tracker(cfg, acc, tmp_path / "run", None, {})
    for step in range(1, 601):  # ~100 KB of records: several 32 KiB blocks, records split across them
        tracker.log({"train/elbo": 1000.0 / step, "train/lr": 1e-3, "train/grad_norm": float(step)}, step)
    tracker.finish()
    run = read_back(tracker.local_dir)
    assert (tracker.local_dir / f"run-{tracker.run_id}.wandb").stat().st_size > 3 * tracking.WANDB_BLOCK
    assert [row["_step"] for row in run["history"]] == list(range(1, 601))
    assert run["history"][-1]["train/grad_norm"] == 600


# ------------------------------------------------------------------ failures never stop training
def test_a_failing_tracker_warns_once_and_becomes_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path)
    acc = accelerator(cfg)
    tracker = start_tracker(cfg, acc, tmp_path / "run", None, {})
    tracker.log({"train/elbo": 1.0}, step=1)

    def broken(*args, **kwargs):
        raise ConnectionError(f"upload refused for key {FAKE_KEY}")

    monkeypatch.setattr(tracker.tracker, "log", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (2, 3, 4):
            tracker.log({"train/elbo": 1.0}, step=step)
        tracker.log_images({"recon": tmp_path / "nothing.png"}, step=4)
        tracker.log_model(tmp_path / "nothing")
        tracker.finish()
        acc.end_training()  # the broken tracker was detached: end_training does not trip over it
    messages = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(messages) == 1 and "training goes on" in messages[0].lower() and "ConnectionError" in messages[0]
    assert FAKE_KEY not in messages[0]  # never print a key, even one inside an error
    assert tracker.broken and acc.trackers == []
    import wandb

    wandb.finish()


def test_a_tracker_that_cannot_start_warns_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("wandb service crashed")

    cfg = config(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(wandb, "init", refuse)
        acc = accelerator(cfg)
        with pytest.warns(TrackingWarning, match="tracking is off for this run.*wandb service crashed"):
            tracker = start_tracker(cfg, acc, tmp_path / "run", None, {})
        assert type(tracker) is tracking.Tracker and acc.trackers == []
        acc.end_training()
    with monkeypatch.context() as m:  # whatever fails inside start_tracker, it is a warning
        m.setattr(tracking, "library_versions", refuse)
        with pytest.warns(TrackingWarning, match="tracking is off"):
            assert type(start_tracker(cfg, accelerator(cfg), tmp_path / "run", None, {})) is tracking.Tracker
    from accelerate import Accelerator

    with pytest.warns(TrackingWarning, match="without log_with='wandb'"):  # a wiring mistake is not fatal either
        assert type(start_tracker(cfg, Accelerator(cpu=True), tmp_path / "run", None, {})) is tracking.Tracker


def test_online_without_a_reachable_server_falls_back_to_offline_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    cfg = config(tmp_path, "tracking.mode=online")
    acc = accelerator(cfg)
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = start_tracker(cfg, acc, tmp_path / "run", None, {})
    messages = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(messages) == 1 and "offline" in messages[0] and "wandb sync" in messages[0]
    assert FAKE_KEY not in messages[0]
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
    assert time.monotonic() - t0 < 15  # never wandb's 90 s init timeout
    tracker.finish()
    acc.end_training()

    monkeypatch.delenv("WANDB_API_KEY")  # online without credentials: no login prompt, offline too
    acc = accelerator(cfg)
    with pytest.warns(TrackingWarning, match="no W&B credentials"):
        tracker = start_tracker(cfg, acc, tmp_path / "run", None, {})
    assert tracker.mode == "offline"
    tracker.finish()


def test_unreachable_probe() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert tracking.unreachable(url) is None
    assert "127.0.0.1" in tracking.unreachable(url, timeout=1)  # closed now: refused
    assert tracking.unreachable("not a url") is not None


# ------------------------------------------------------------------ through the trainer
def test_a_short_offline_training_run_is_in_wandb_and_on_disk(tiny_overrides: list[str], tmp_path: Path) -> None:
    train_in_process(tiny_overrides + ["tracking.mode=offline"])
    run_dir = tmp_path / "run"
    folders = tracking.local_runs(run_dir)
    assert len(folders) == 1
    run = read_back(folders[0])
    steps = [row["_step"] for row in run["history"]]
    assert steps == sorted(set(steps)) and {2, 4, 8, 16} <= set(steps)
    rows = {row["_step"]: row for row in run["history"]}
    assert {"train/elbo", "train/recon", "train/kl", "train/lr"} <= rows[2].keys()
    assert rows[8]["test/epoch"] == 1 and rows[16]["test/epoch"] == 2 and "test/elbo" in rows[16]
    assert list((folders[0] / "files" / "media" / "images").rglob("*.png"))
    for name in ("config.yaml", "metrics.jsonl"):
        assert (run_dir / name).is_file()
    for name in ("recon.png", "prior.png", "manifold.png", "latent.png", "loss.png"):
        assert list(run_dir.rglob(name)), name
