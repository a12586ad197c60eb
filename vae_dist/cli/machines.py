"""`accelerate launch` on one machine of several (launch/multi_box.sh runs it), with the network
settings a multi-machine run needs found here, and its failures told in one sentence.

    python -m vae_dist.cli.machines ACCELERATE-LAUNCH-ARGUMENTS...   # --num_machines N --main_process_ip IP ...

What it adds to `accelerate launch` when --num_machines is above 1:
- The rendezvous host. torchrun's c10d rendezvous decides whether this machine hosts its store by
  resolving this machine's hostname; a hostname that does not resolve fails with a `socket.gaierror`
  traceback, and one that resolves to loopback (Debian's `127.0.1.1 host` line) makes every machine
  a client of a store nobody hosts, until the timeout. Here the host is the machine that holds
  the address --main_process_ip names, passed as the rendezvous option `is_host`.
- The addresses. torchrun tells the workers to reach rank 0's store at rank 0's hostname, and gloo
  (and NCCL's bootstrap) pick their interface from the hostname too. Here torchrun gets this
  machine's own address toward --main_process_ip (its --local-addr), and, unless they are set,
  GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name the interface that holds it.
- A join with a count. Every machine first checks in at the rendezvous store and waits for all of
  them, for the rendezvous option `join_timeout` (seconds, torchrun's default 600): a machine that
  never comes ends every other one with one sentence naming how many of how many joined (exit 2),
  where torchrun would end with a `RendezvousTimeoutError` traceback and no count.
- One sentence, not a traceback, when the training processes fail: they have said why themselves
  (vae_dist.cli.train), so this exits with their own exit code (76: a process on another machine stopped
  answering; 75: stopped by a signal; see docs/distributed.md) where `accelerate launch` exits 1.
- A bounded end after a lost peer. On the far side of a network partition torchrun's agent blocks
  in its own store calls for minutes after its processes have exited 76 (vae_dist.peers); once a
  process says it lost its peer, this launcher exits 76 within PEER_LOST_GRACE_S, whatever the
  agent is blocked in.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from vae_dist.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PEER_LOST, EXIT_PREEMPTED, BadInput
from vae_dist.peers import PEER_LOST_FILE_ENV

JOIN_TIMEOUT_S = 600.0  # torchrun's own default for its rendezvous join
JOINED_KEY = "vae_dist/machines_joined"
PEER_LOST_GRACE_S = 10.0  # seconds the agent gets to end by itself after a process lost its peer
# The training processes' own exit codes, most telling first: the code a machine exits with when its
# processes ended differently (one lost its peer, another was stopped by the launcher for it).
TRAIN_EXIT_ORDER = (EXIT_PEER_LOST, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_PREEMPTED)


class MachinesError(BadInput):
    """A multi-machine launch that cannot go on; the message is the sentence for the user."""


def rdzv_options(text: str) -> dict[str, str]:
    """accelerate's --rdzv_conf "key=value,key=value" as a dict."""
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def local_addresses() -> dict[str, str]:
    """Every IPv4/IPv6 address of this machine -> the interface that holds it."""
    import psutil  # accelerate's own dependency

    return {
        a.address.split("%")[0]: name
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }


def resolve(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except socket.gaierror as err:
        raise MachinesError(
            f"--main_process_ip {host} does not resolve to an address here ({err.strerror}); set MAIN_IP "
            "to the rank-0 machine's address on the cluster network."
        ) from None


def route(address: str, port: int) -> tuple[str | None, str | None]:
    """This machine's address and interface toward `address` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((address, port))
            source = s.getsockname()[0]
    except OSError:
        return None, None
    return source, local_addresses().get(source)


def prepare(args) -> tuple[str, int, int, bool, float]:
    """Set the rendezvous host and interfaces for a multi-machine `args` (accelerate's launch
    arguments); returns (main address, port, machines, whether this machine hosts, join timeout)."""
    main_ip = resolve(args.main_process_ip)
    port = int(args.main_process_port or 29500)
    options = rdzv_options(args.rdzv_conf or "")
    is_host = main_ip in local_addresses()
    if args.machine_rank == 0 and not is_host:
        raise MachinesError(
            f"MACHINE_RANK=0 runs the rendezvous on MAIN_IP={args.main_process_ip}, but that is not an "
            f"address of this machine ({socket.gethostname()}); run MACHINE_RANK=0 on the machine that "
            "has it, or set MAIN_IP to this machine's address on the cluster network."
        )
    if args.machine_rank != 0 and is_host:
        raise MachinesError(
            f"MAIN_IP={args.main_process_ip} is this machine's own address, where MACHINE_RANK=0 must run, "
            f"but this machine has MACHINE_RANK={args.machine_rank}; give each machine its own rank, 0 to "
            "the MAIN_IP machine."
        )
    options.setdefault("is_host", "1" if is_host else "0")
    join_timeout = float(options.setdefault("join_timeout", str(int(JOIN_TIMEOUT_S))))
    args.rdzv_conf = ",".join(f"{k}={v}" for k, v in options.items())
    source, interface = route(main_ip, port)
    if source is not None:
        # torchrun's --local-addr (accelerate passes any torchrun option set on its arguments): the
        # address the workers' store is reached at, instead of this machine's hostname.
        args.local_addr = source
    if interface is not None and interface != "lo":
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, interface)
    return main_ip, port, args.num_machines, is_host, join_timeout


def reachable(address: str, port: int, timeout_s: float) -> str | None:
    """Wait until `address:port` accepts a TCP connection; None once it does, else the last error.
    Polled here (plain sockets) so that a host that is not up yet prints nothing; c10d's own client
    logs a C++ stack for every failed try."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((address, port), timeout=min(5.0, timeout_s)).close()
            return None
        except OSError as err:
            if time.monotonic() >= deadline:
                return err.strerror or type(err).__name__
        time.sleep(0.5)


def join(main_ip: str, port: int, machines: int, is_host: bool, timeout_s: float):
    """Check in at the rendezvous store and wait until all `machines` have (or raise a MachinesError
    with the count). The store is returned and must stay alive: on the host it is the server that
    torchrun's c10d rendezvous then shares (both are multi_tenant stores on the same port)."""
    from torch.distributed import TCPStore

    started = time.monotonic()
    if not is_host and (why := reachable(main_ip, port, timeout_s)) is not None:
        raise MachinesError(
            f"the rendezvous host {main_ip}:{port} did not answer within {timeout_s:g} s ({why}); start "
            "MACHINE_RANK=0 there, and check that this machine reaches that address and port."
        )
    timeout = timedelta(seconds=max(1.0, timeout_s - (time.monotonic() - started)))
    store = TCPStore(main_ip, port, is_master=is_host, multi_tenant=True, wait_for_workers=False, timeout=timeout)
    joined = store.add(JOINED_KEY, 1)
    while joined < machines:
        if time.monotonic() - started > timeout_s:
            raise MachinesError(
                f"only {joined} of {machines} machines joined the rendezvous at {main_ip}:{port} within "
                f"{timeout_s:g} s (JOIN_TIMEOUT_S): start launch/multi_box.sh on the {machines - joined} "
                "missing machine(s), with the same MAIN_IP and NUM_MACHINES, and check that they reach "
                "that address and port."
            )
        time.sleep(0.2)
        joined = store.add(JOINED_KEY, 0)
    if is_host:
        # accelerate refuses to launch machine rank 0 on a port in use, to catch a second launcher on
        # one machine; here the port is in use by design (this store, which the rendezvous shares).
        import accelerate.utils.launch

        accelerate.utils.launch.is_port_in_use = lambda *args, **kwargs: False
    return store


def failure_code(err) -> int | None:
    """The exit code for a ChildFailedError: the training processes' own (TRAIN_EXIT_ORDER), or None
    when none is one of theirs (a crash, a signal)."""
    codes = {f.exitcode for f in err.failures.values()}
    return next((code for code in TRAIN_EXIT_ORDER if code in codes), None)


def end_after_lost_peer(note: Path) -> None:
    """A daemon thread: once `note` exists (a training process lost its peer), give the agent
    PEER_LOST_GRACE_S to end by itself, then exit EXIT_PEER_LOST from here."""

    def watch() -> None:
        while not note.exists():
            time.sleep(0.5)
        time.sleep(PEER_LOST_GRACE_S)
        print(
            f"vae_dist.cli.machines: a training process on this machine lost its peer (its message is above) "
            f"and the launcher's agent did not end within {PEER_LOST_GRACE_S:g} s; exiting {EXIT_PEER_LOST}.",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        shutil.rmtree(note.parent, ignore_errors=True)
        os._exit(EXIT_PEER_LOST)

    threading.Thread(target=watch, name="vae_dist-lost-peer-exit", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    store = None  # the joined rendezvous store: alive until the launch ends
    if args.num_machines > 1:
        try:
            store = join(*prepare(args))
        except MachinesError as err:
            print(f"vae_dist.cli.machines: error: {err}", file=sys.stderr)
            return err.exit_code
    note = Path(tempfile.mkdtemp(prefix="vae_dist-machines-")) / "peer_lost"
    os.environ[PEER_LOST_FILE_ENV] = str(note)  # the training processes inherit it
    end_after_lost_peer(note)
    try:
        launch_command(args)
    except Exception as err:  # noqa: BLE001 - the agent's own errors after a lost peer (a dead store host)
        if note.exists():
            print(f"vae_dist.cli.machines: a training process on this machine lost its peer (its message is "
                  f"above); exiting {EXIT_PEER_LOST}.", file=sys.stderr)  # fmt: skip
            return EXIT_PEER_LOST
        if not isinstance(err, ChildFailedError):
            raise
        code = failure_code(err)
        if code is None:  # not one of vae-train's: a crash or a signal; its details are the traceback
            raise
        failed = ", ".join(f"{f.local_rank}: exit {f.exitcode}" for f in err.failures.values())
        print(f"vae_dist.cli.machines: the training processes on this machine ended (local rank {failed}); "
              "their own message is above.", file=sys.stderr)  # fmt: skip
        return code
    finally:
        del store
        shutil.rmtree(note.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
