"""Which W&B mode a run uses (`tracking.mode`), and whether the W&B server can be reached.

`online` syncs while training; `offline` writes the run under `<run.dir>/wandb/offline-run-*` for a
later `wandb sync`; `off` writes nothing to W&B; `auto` (the default) is the WANDB_MODE environment
variable when set, else online when W&B credentials exist (WANDB_API_KEY, or a W&B host in ~/.netrc
from `wandb login`), else offline, so a first run never asks for a login. `online` that cannot
reach the server within PROBE_TIMEOUT_S (or has no credentials) warns once and runs offline
(tracking.py). Nothing here imports wandb.
"""

from __future__ import annotations

import configparser
import netrc
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from vae_dist.config import TrackingConfig

Mode = Literal["online", "offline", "off"]
PROBE_TIMEOUT_S = 3.0  # seconds to reach the W&B host before an online run falls back to offline
# Hosts a `wandb login` writes to ~/.netrc: the classic API and the CoreWeave Forge default of wandb >= 0.31.
WANDB_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
DEFAULT_BASE_URL = "https://api.wandb.ai"
# Values of the WANDB_MODE environment variable, as `tracking.mode=auto` reads them.
ENV_MODES: dict[str, Mode] = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "off",
}


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    home = Path("~").expanduser()
    return home / ".netrc" if (home / ".netrc").exists() or not (home / "_netrc").exists() else home / "_netrc"


def _settings_base_url() -> str | None:
    """base_url saved by `wandb login --host` in the W&B settings file, if any."""
    folder = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser())
    parser = configparser.ConfigParser()
    try:
        parser.read(folder / "settings")
        return parser.get("default", "base_url", fallback=None)
    except configparser.Error:
        return None


def base_url() -> str:
    """The W&B server a run talks to: WANDB_BASE_URL, else `wandb login --host`, else the public API."""
    return os.environ.get("WANDB_BASE_URL") or _settings_base_url() or DEFAULT_BASE_URL


def has_wandb_credentials() -> bool:
    """True when WANDB_API_KEY (or an identity token file) is set, or ~/.netrc has an entry for a W&B host.

    Only the presence of an entry is checked; the key itself is never read into a message."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hosts = {urlsplit(u).hostname for u in (os.environ.get("WANDB_BASE_URL"), _settings_base_url()) if u}
    try:
        machines = netrc.netrc(_netrc_path()).hosts
    except (OSError, netrc.NetrcParseError):  # no file, unreadable, or malformed: no credentials
        return False
    return any(h in machines for h in hosts | set(WANDB_HOSTS))


def resolve_mode(cfg: TrackingConfig) -> Mode:
    """online | offline | off. `auto`: the WANDB_MODE environment variable if set (offline, disabled,
    online), else online with W&B credentials and offline without."""
    if cfg.mode != "auto":
        return cfg.mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ENV_MODES:
        return ENV_MODES[env]
    return "online" if has_wandb_credentials() else "offline"


def log_with(cfg: TrackingConfig) -> str | None:
    """What to pass as `Accelerator(log_with=...)`: "wandb", or None when tracking is off."""
    return None if resolve_mode(cfg) == "off" else "wandb"


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url`'s host cannot be reached within `timeout` seconds (DNS + TCP connect), or None if it can.

    With an HTTPS proxy in the environment the proxy is probed instead. Runs in a daemon thread,
    because a hung DNS lookup ignores socket timeouts."""
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None
    )
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return f"{url!r} has no host name"
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(f"{host}:{port}: {err.strerror or type(err).__name__}")

    thread = threading.Thread(target=probe, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {timeout:g} s"
