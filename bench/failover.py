"""Failover and failure detection on a real 3 servers + 1 compute cluster on 127.0.0.x.

(a) SIGKILL of the leader host's agent (its etcd member dies with it): seconds until a
    surviving server accepts a write (``POST /api/v1/vms`` 202) and until a new leader is
    elected; the killed host is restarted and the cluster settles before the next trial.
    Twice: "agent" kills the agent only, so its etcd gets SIGTERM from the kernel (PDEATHSIG)
    and hands its Raft leadership over on the way out; "host crash" SIGKILLs the agent, etcd
    and serf at once, as a power cut would, so the etcd members must notice and elect.
(b) A frozen compute host (SIGSTOP of its agent and its serf child): seconds until the servers
    call it ``down``; it is thawed and ready again before the next trial.

Real agents started with ``tests/integration/harness.py`` on free ports in a temporary
directory; everything is stopped at the end.
Run: ``.venv/bin/python -m bench.failover [--trials 10] [--freeze-trials 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tests.integration.harness import AgentProcess, node_states
from tests.integration.harness import wait_for as _wait_for

SERVERS = ("n1", "n2", "n3")
ALL = (*SERVERS, "c1")
BUDGET_S = 30.0  # a failover that takes longer gives no figure (elections take 4-8 s)


class BenchError(RuntimeError):
    pass


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    return _wait_for(predicate, timeout_s, what, poll_s=0.1, error=BenchError)


def cluster(agent: AgentProcess, timeout_s: float = 3.0) -> dict[str, Any]:
    r = httpx.get(agent.url + "/api/v1/cluster", timeout=timeout_s)
    r.raise_for_status()
    info: dict[str, Any] = r.json()
    return info


def settled(agent: AgentProcess) -> bool:
    """Every node ready, three healthy voters, a leader."""
    info = cluster(agent)
    voters = {m["name"]: m["healthy"] for m in info["members"] if not m["is_learner"]}
    return (
        info["leader"] is not None
        and voters == dict.fromkeys(SERVERS, True)
        and node_states(agent) == dict.fromkeys(ALL, "ready")
    )


def start_cluster(root: Path, common: list[str]) -> dict[str, AgentProcess]:
    agents: dict[str, AgentProcess] = {}
    n1 = AgentProcess(
        root / "n1", name="n1", bind="127.0.0.1", extra_args=[*common, "--desired-voters", "3"]
    )
    agents["n1"] = n1
    n1.start()
    r = httpx.post(n1.url + "/api/v1/tokens", json={"uses": 3}, timeout=10)
    if r.status_code != 201:
        raise BenchError(f"token: {r.status_code} {r.text}")
    join = n1.join_args(r.json()["secret"])
    for i, name in enumerate(("n2", "n3", "c1"), start=2):
        extra = [*common, *join, *(["--no-server"] if name == "c1" else [])]
        a = AgentProcess(root / name, name=name, bind=f"127.0.0.{i}", extra_args=extra)
        agents[name] = a
        a.start(bootstrap=False, timeout_s=120)
    wait_for(lambda: settled(n1), 90, "3 healthy voters and 4 ready nodes")
    return agents


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@dataclass
class Trial:
    killed: str
    elected: str | None  # None: no new leader within the budget
    write_s: float | None  # None: no write accepted within the budget
    leader_s: float | None
    exited: list[str]  # other agents that exited meanwhile (they should not)
    stuck: list[str]  # hosts that stayed not ready with their agents running (restarted)
    notes: list[str]  # what went wrong, to print under the trial's line


def why_exited(a: AgentProcess) -> str:
    """The agent's last words, and the known cause when its log shows it."""
    lines = a.tail(200).splitlines()
    last = next(
        (ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else ""
    )
    cause = ""
    if any("CancelledError" in line for line in lines):
        cause = " (its log shows asyncio.CancelledError escaping an etcd call)"
    return f"exit code {a.proc.returncode if a.proc else '?'}, {last[:200]}{cause}"


def alive(a: AgentProcess) -> bool:
    return a.proc is not None and a.proc.poll() is None


def leader_trial(
    agents: dict[str, AgentProcess], trial: str, *, host_crash: bool, budget_s: float = BUDGET_S
) -> Trial:
    """Kill the leader's agent (with ``host_crash``, its etcd and serf at the same instant),
    time the first accepted write and the new leader, then restart it and let things settle.

    An agent that exits meanwhile is reported and restarted; the survivors are polled in turn,
    so one such exit does not spoil the trial's figures.
    """
    info = cluster(next(agents[n] for n in SERVERS if alive(agents[n])))
    killed = info["leader"]["node"]
    survivors = [agents[n] for n in SERVERS if n != killed]
    key = str(uuid.uuid4())
    body = {"name": f"failover-{trial}", "memory_mib": 64}

    def first_write(t0: float) -> float | None:
        while time.monotonic() - t0 < budget_s:
            for a in filter(alive, survivors):
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.post(
                        a.url + "/api/v1/vms",
                        json=body,
                        headers={"Idempotency-Key": key},  # never two VMs, whoever answers
                        timeout=2,
                    )
                    if r.status_code == 202:
                        return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def new_leader(t0: float) -> tuple[str | None, float | None]:
        while time.monotonic() - t0 < budget_s:
            for a in filter(alive, survivors):
                with contextlib.suppress(httpx.HTTPError):
                    now = cluster(a, timeout_s=2)["leader"]
                    if now and now["node"] != killed:
                        return now["node"], time.monotonic() - t0
            time.sleep(0.05)
        return None, None

    victim = agents[killed]
    assert victim.proc is not None
    with ThreadPoolExecutor(2) as pool:
        doomed = children(victim.proc.pid) if host_crash else []
        t0 = time.monotonic()
        for pid in doomed:  # etcd and serf first, so the kernel's SIGTERM never reaches them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        victim.proc.kill()  # SIGKILL; alone, its etcd gets SIGTERM from the kernel (PDEATHSIG)
        w = pool.submit(first_write, t0)
        ld = pool.submit(new_leader, t0)
        write_s = w.result()
        elected, leader_s = ld.result()
    victim.proc.wait()
    exited = [n for n, a in agents.items() if n != killed and not alive(a)]
    notes = [f"the agent of {n} exited: {why_exited(agents[n])}" for n in exited]
    restart(agents, [*exited, killed])
    stuck = settle(agents, f"{killed} came back", notes)
    return Trial(killed, elected, write_s, leader_s, exited, stuck, notes)


def restart(agents: dict[str, AgentProcess], names: list[str]) -> None:
    """Start these agents again, all at once: servers need each other for a quorum."""
    with ThreadPoolExecutor(max(len(names), 1)) as pool:
        for f in [pool.submit(agents[n].start, bootstrap=False, timeout_s=120) for n in names]:
            f.result()


def settle(agents: dict[str, AgentProcess], after: str, notes: list[str]) -> list[str]:
    """Wait until every node is ready with three healthy voters. Hosts whose agents run but
    that stay not ready for 30 s are reported and their agents restarted (so the next trial
    starts from a healthy cluster); returns their names."""
    try:
        wait_for(lambda: settled(agents["n1"]), 30, f"the cluster to settle after {after}")
        return []
    except BenchError:
        pass
    states: dict[str, str] = {}
    with contextlib.suppress(httpx.HTTPError):
        states = node_states(next(a for a in agents.values() if alive(a)))
    stuck = sorted(n for n in agents if states.get(n, "?") != "ready")
    notes.append(
        f"not settled 30s after {after}: {states}; restarted the agents of "
        f"{', '.join(stuck) or 'no host'}"
    )
    for name in stuck:
        try:
            agents[name].stop(timeout_s=20)
        except AssertionError:
            agents[name].kill()
    restart(agents, stuck)
    wait_for(lambda: settled(agents["n1"]), 60, f"the cluster to settle after {after}")
    return stuck


def freeze_trial(agents: dict[str, AgentProcess]) -> tuple[float, float, str]:
    """SIGSTOP c1's agent and serf; return (not-ready s, down s, first state seen)."""
    c1, n1 = agents["c1"], agents["n1"]
    assert c1.proc is not None
    serf = subprocess.run(
        ["pgrep", "-P", str(c1.proc.pid), "-x", "serf"], capture_output=True, text=True
    ).stdout.split()
    frozen = [c1.proc.pid, *map(int, serf)]
    first_state = ""
    t0 = time.monotonic()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        first_state = wait_for(
            lambda: s if (s := node_states(n1)["c1"]) != "ready" else None, 60, "c1 not ready"
        )
        not_ready_s = time.monotonic() - t0
        wait_for(lambda: node_states(n1)["c1"] == "down", 120, "c1 down")
        down_s = time.monotonic() - t0
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    notes: list[str] = []
    settle(agents, "c1 was thawed", notes)
    for note in notes:
        print(f"    ! {note}", flush=True)
    return not_ready_s, down_s, first_state


def seconds(value: float | None) -> str:
    return f"(none within {BUDGET_S:.0f}s)" if value is None else f"{value:4.1f}s"


def stats(label: str, values: list[float], of: int | None = None) -> str:
    missing = f" ({of - len(values)} of {of} trials gave none)" if of and of > len(values) else ""
    if not values:
        return f"{label:<42} no figure{missing}"
    return (
        f"{label:<42} n={len(values):<3} min {min(values):5.1f}s  "
        f"median {statistics.median(values):5.1f}s  max {max(values):5.1f}s{missing}"
    )


def report(results: dict[str, list[Trial]], not_readies: list[float], downs: list[float]) -> None:
    for mode, trials in results.items():
        if not trials:
            continue
        writes = [t.write_s for t in trials if t.write_s is not None]
        leaders = [t.leader_s for t in trials if t.leader_s is not None]
        print(stats(f"leader {mode} -> first write accepted", writes, len(trials)))
        print(stats(f"leader {mode} -> new leader elected", leaders, len(trials)))
        exits = [f"{n} (trial {i})" for i, t in enumerate(trials, 1) for n in t.exited]
        if exits:
            print(f"{'  other agents that exited meanwhile':<42} {', '.join(exits)}")
        stuck = [f"{n} (trial {i})" for i, t in enumerate(trials, 1) for n in t.stuck]
        if stuck:
            print(f"{'  hosts stuck not ready, agent restarted':<42} {', '.join(stuck)}")
    if downs:
        print(stats("compute host frozen -> not ready", not_readies))
        print(stats("compute host frozen -> down", downs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trials", type=int, default=10, help="leader kills per mode (agent, host crash): 10"
    )
    parser.add_argument("--freeze-trials", type=int, default=3, help="compute freezes (3)")
    parser.add_argument("--lease-ttl", type=int, default=6, help="--lease-ttl-s (6)")
    parser.add_argument("--leader-ttl", type=int, default=4, help="--leader-ttl-s (4)")
    parser.add_argument("--node-down-after", type=int, default=20, help="--node-down-after-s")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    args = parser.parse_args()
    common = [
        "--lease-ttl-s",
        str(args.lease_ttl),
        "--leader-ttl-s",
        str(args.leader_ttl),
        "--node-down-after-s",
        str(args.node_down_after),
    ]
    print(
        f"settings: lease ttl {args.lease_ttl}s, leader ttl {args.leader_ttl}s, node down "
        f"after {args.node_down_after}s without a lease (or at once when gossip lost it too); "
        "3 servers n1-n3 on 127.0.0.1-3, compute-only c1 on 127.0.0.4, fake driver"
    )
    root = Path(tempfile.mkdtemp(prefix="corral-bench-failover-"))
    agents: dict[str, AgentProcess] = {}
    results: dict[str, list[Trial]] = {}
    downs: list[float] = []
    not_readies: list[float] = []
    failed = True
    started = time.monotonic()
    try:
        agents = start_cluster(root, common)
        print(f"cluster up in {time.monotonic() - started:.0f}s")
        for mode in ("agent", "host crash"):
            done = results.setdefault(mode, [])
            what = "agent SIGKILLed" if mode == "agent" else "host crashed (agent+etcd+serf)"
            for i in range(1, args.trials + 1):
                t = leader_trial(
                    agents, f"{mode.replace(' ', '-')}-{i:02d}", host_crash=mode != "agent"
                )
                done.append(t)
                elected = (
                    f"{t.elected} elected after {t.leader_s:4.1f}s"
                    if t.elected and t.leader_s is not None
                    else f"no new leader within {BUDGET_S:.0f}s"
                )
                print(
                    f"  {mode} {i:2d}: leader {t.killed} {what}: write accepted after "
                    f"{seconds(t.write_s)}, {elected}",
                    flush=True,
                )
                for note in t.notes:
                    print(f"    ! {note}", flush=True)
        for trial in range(1, args.freeze_trials + 1):
            not_ready_s, down_s, first = freeze_trial(agents)
            not_readies.append(not_ready_s)
            downs.append(down_s)
            seen = "" if first == "down" else f"{first} after {not_ready_s:4.1f}s, "
            print(f"  freeze {trial}: c1 {seen}down after {down_s:4.1f}s", flush=True)
        failed = False
    except (BenchError, AssertionError) as exc:  # the harness raises AssertionError
        print(f"\nbench failed: {exc}", file=sys.stderr)
    finally:
        for a in agents.values():
            try:
                a.stop(timeout_s=20)
            except AssertionError:
                a.kill()
        if failed or args.keep:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    report(results, not_readies, downs)
    print(f"total {time.monotonic() - started:.0f}s" + (" (stopped early)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
