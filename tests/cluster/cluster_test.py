#!/usr/bin/env python3
"""ham's cluster tests: a 3-node mesh (a, b, c) of real containers on a private
Docker network, driven through `docker exec NODE ham …`. Run by scripts/cluster-test.

Each run is its own compose project (ham-ci-PID), image tag (ham-ci-PID:test),
certificates (a temporary directory) and /24 subnet (a free one, checked against
every Docker network); all of it is removed at the end, pass or fail.

  1. mesh:       `ham nodes --json` in every container lists a, b, c, all "up"
  2. forwarding: `ham --node b status --json` in a answers as `ham status --json` in b
  3. node death: docker kill a -> b and c show a "down" within seconds; the failover
                 singleton `db` (deploy/node.toml) is started exactly once, on b;
                 a restarts and rejoins
  4. partition:  docker network disconnect c -> each side sees the other down; local
                 recovery works on both sides (kill -9 of `ticker` -> restarted);
                 reconnected with its alias and pinned address, the mesh heals and
                 the singleton runs on exactly one node again
  5. rolling restart: docker restart b, c, a in turn; the mesh heals each time, a
                 subscriber on a sees each restarted node's first events, and
                 the singleton runs on exactly one node (restored when its holder restarts)
  6. the pair:   kill -9 of b's HAM -> its Guardian takes over (the container's init
                 keeps it alive), ticker untouched; kill -9 of the Guardian -> a new one

Environment: HAM_CI_PROJECT (the project name, set by scripts/cluster-test),
HAM_CLUSTER_FAILOVER=0 (skip the singleton checks).
Python 3 standard library only.
"""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy")
COMPOSE_FILE = os.path.join(DEPLOY, "docker-compose.yml")
NODES = ("a", "b", "c")
HOST_PART = {"a": 11, "b": 12, "c": 13}  # as pinned in deploy/docker-compose.yml

PROJECT = os.environ.get("HAM_CI_PROJECT") or f"ham-ci-{os.getpid()}"
IMAGE = f"{PROJECT}:test"
FAILOVER = os.environ.get("HAM_CLUSTER_FAILOVER", "1") != "0"
SINGLETON = "db"  # deploy/node.toml: autostart = false; node-down a -> failover to b, c

START = time.monotonic()


class Failure(Exception):
    """A check that did not hold, with what was seen."""


def log(msg):
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def run(*cmd, check=True, timeout=120, env=None):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Failure(f"timed out after {timeout}s: {' '.join(cmd)}")
    if check and p.returncode != 0:
        raise Failure(
            f"`{' '.join(cmd)}` exited {p.returncode}\n{p.stdout.strip()}\n{p.stderr.strip()}"
        )
    return p


# --- the project's resources --------------------------------------------------------

class Mesh:
    def __init__(self):
        self.certs = None
        self.subnet = None
        self.network = None
        self.containers = {}  # node -> container name

    def env(self):
        env = dict(os.environ)
        env.update(
            HAM_IMAGE=IMAGE,
            HAM_CERTS=self.certs,
            HAM_SUBNET=self.subnet,
            HAM_CONFIG=os.path.join(DEPLOY, "node.toml"),
        )
        return env

    def compose(self, *args, check=True, timeout=180):
        return run(
            "docker-compose", "-p", PROJECT, "-f", COMPOSE_FILE, *args,
            check=check, timeout=timeout, env=self.env(),
        )


M = Mesh()


def build_image():
    log(f"building the image as {IMAGE} (deploy/build-image.sh)")
    env = dict(os.environ, HAM_IMAGE=IMAGE)
    p = subprocess.run([os.path.join(DEPLOY, "build-image.sh")], env=env)
    if p.returncode != 0:
        raise Failure("deploy/build-image.sh failed (its output is above)")


def make_certs():
    M.certs = tempfile.mkdtemp(prefix=f"{PROJECT}-certs-")
    os.chmod(M.certs, 0o755)
    base = [
        "docker", "run", "--rm", "--network", "none", "--label", f"org.ham.ci={PROJECT}",
        "--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{M.certs}:/certs", IMAGE,
    ]
    run(*base, "/bin/ham", "cert", "init-ca", "--dir", "/certs")
    for n in NODES:
        run(*base, "/bin/ham", "cert", "issue", n, "--dir", "/certs")
    log(f"certificates for a, b, c in {M.certs}")


def used_networks():
    ids = run("docker", "network", "ls", "-q").stdout.split()
    if not ids:
        return []
    out = run(
        "docker", "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids
    ).stdout.split()
    nets = []
    for s in out:
        try:
            nets.append(ipaddress.ip_network(s, strict=False))
        except ValueError:
            pass
    return nets


def free_subnets():
    """Private /24s no Docker network overlaps, starting at a PID-dependent place."""
    used = used_networks()
    candidates = [f"172.28.{x}" for x in range(100, 250)] + [f"10.213.{x}" for x in range(256)]
    k = os.getpid() % 150
    for prefix in candidates[k:] + candidates[:k]:
        net = ipaddress.ip_network(f"{prefix}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4):
            yield prefix


def up():
    for attempt, prefix in enumerate(free_subnets()):
        M.subnet = prefix
        p = M.compose("up", "-d", check=False)
        if p.returncode == 0:
            break
        if "overlap" in (p.stdout + p.stderr) and attempt < 5:
            # Another run took the subnet meanwhile: tidy up and take another.
            M.compose("down", "--remove-orphans", "--volumes", "--timeout", "2", check=False)
            continue
        raise Failure(f"docker-compose up failed:\n{p.stdout}\n{p.stderr}")
    for n in NODES:
        cid = M.compose("ps", "-q", n).stdout.strip()
        if not cid:
            raise Failure(f"no container for service {n}")
        M.containers[n] = run("docker", "inspect", "-f", "{{.Name}}", cid).stdout.strip().lstrip("/")
    M.network = run(
        "docker", "network", "ls", "--filter", f"label=com.docker.compose.project={PROJECT}",
        "--format", "{{.Name}}",
    ).stdout.split()[0]
    log(f"project {PROJECT}: network {M.network} ({M.subnet}.0/24), "
        f"containers {', '.join(M.containers.values())}")


def cleanup():
    """Removes everything this run made. Safe to call twice, and after any failure."""
    if M.certs is not None or M.subnet is not None:
        M.subnet = M.subnet or "172.28.5"
        M.certs = M.certs or "/nonexistent"
        M.compose("down", "--remove-orphans", "--volumes", "--timeout", "5", check=False)
    for label in (f"com.docker.compose.project={PROJECT}", f"org.ham.ci={PROJECT}"):
        ids = run("docker", "ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
        if ids:
            run("docker", "rm", "-f", *ids, check=False)
    nets = run(
        "docker", "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
        check=False,
    ).stdout.split()
    if nets:
        run("docker", "network", "rm", *nets, check=False)
    if run("docker", "image", "inspect", IMAGE, check=False).returncode == 0:
        run("docker", "rmi", IMAGE, check=False)
    if M.certs and os.path.isdir(M.certs):
        shutil.rmtree(M.certs, ignore_errors=True)
    left = run("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
               check=False).stdout.split()
    left += run("docker", "network", "ls", "-q", "--filter",
                f"label=com.docker.compose.project={PROJECT}", check=False).stdout.split()
    if run("docker", "image", "inspect", IMAGE, check=False).returncode == 0:
        left.append(IMAGE)
    if left:
        print(f"!!! cleanup left these behind: {left}", flush=True)
    else:
        log(f"cleaned up: no container, network or image of {PROJECT} is left")


# --- talking to the nodes -----------------------------------------------------------

def ham(node, *args, check=True, timeout=30):
    """`ham ARGS --json` inside a node's container, parsed."""
    p = run("docker", "exec", M.containers[node], "ham", *args, "--json",
            check=check, timeout=timeout)
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout)
    except ValueError:
        raise Failure(f"`ham {' '.join(args)} --json` on {node} printed no JSON:\n{p.stdout}")


def view(node):
    """{name: state} of `ham nodes --json` on a node; None if it does not answer."""
    v = ham(node, "nodes", check=False, timeout=15)
    if v is None:
        return None
    if not isinstance(v.get("nodes"), list):
        raise Failure(f"`ham nodes --json` on {node}: no `nodes` array: {v}")
    out = {}
    for item in v["nodes"]:
        if "name" not in item or "state" not in item:
            raise Failure(f"`ham nodes --json` on {node}: an item without name/state: {item}")
        out[item["name"]] = item["state"]
    return out


def entities(node, *via):
    """name -> entity of `ham [--node X] status --json`."""
    s = ham(node, *via, "status", check=False, timeout=15)
    if s is None:
        return None
    if not isinstance(s.get("entities"), list):
        raise Failure(f"`ham status --json` on {node}: no `entities` array: {s}")
    return {e["name"]: e for e in s["entities"]}


def wait_until(what, probe, timeout):
    """Polls probe() -> (ok, seen) until ok; returns the seconds it took."""
    t0 = time.monotonic()
    seen = None
    while True:
        ok, seen = probe()
        if ok:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise Failure(f"{what}: not within {timeout}s; last seen: {seen}")
        time.sleep(0.25)


def views_are(expect, observers):
    """A probe: every observer sees each node in `expect` in the given state."""
    def probe():
        seen = {}
        for o in observers:
            v = view(o)
            seen[o] = v
            if v is None or any(v.get(n) != s for n, s in expect.items()):
                return False, seen
        return True, seen
    return probe


def all_up(observers=NODES):
    return views_are({n: "up" for n in NODES}, observers)


def running_singletons(nodes=NODES):
    """Nodes where the singleton runs."""
    where = []
    for n in nodes:
        es = entities(n) or {}
        e = es.get(SINGLETON)
        if e and e.get("state") == "running" and e.get("pid"):
            where.append(n)
    return where


def starts_of_singleton(nodes=NODES):
    """node -> number of `started` events of the singleton it still has."""
    out = {}
    for n in nodes:
        p = run("docker", "exec", M.containers[n], "ham", "events", "--entity", SINGLETON,
                "--kind", "started", "--json", timeout=15)
        out[n] = sum(1 for line in p.stdout.splitlines()
                     if line.strip() and json.loads(line).get("kind") == "started")
    return out


def check_singleton(when, exactly_one):
    where = running_singletons()
    if len(where) > 1:
        raise Failure(f"{when}: the singleton {SINGLETON} runs on {len(where)} nodes: {where}")
    if exactly_one and len(where) != 1:
        raise Failure(f"{when}: the singleton {SINGLETON} runs on {where or 'no node'}")
    return where


def kill_and_see_restart(node, name="ticker"):
    before = (entities(node) or {}).get(name)
    if not before or before.get("state") != "running" or not before.get("pid"):
        raise Failure(f"{name} on {node} is not running: {before}")
    run("docker", "exec", M.containers[node], "kill", "-9", str(before["pid"]))

    def probe():
        e = (entities(node) or {}).get(name) or {}
        ok = (e.get("state") == "running" and e.get("pid") not in (None, before["pid"])
              and e.get("restarts", 0) > before["restarts"])
        return ok, e
    took = wait_until(f"{name} on {node} restarted after kill -9", probe, 15)
    after = entities(node)[name]
    log(f"  {node}: kill -9 {name} (pid {before['pid']}) -> pid {after['pid']}, "
        f"restarts {before['restarts']} -> {after['restarts']} ({took:.1f}s)")


# --- the tests ----------------------------------------------------------------------

def test_mesh_forms():
    log("1. every node lists a, b, c up (ham nodes --json)")
    took = wait_until("a, b, c up in every node's view", all_up(), 60)
    for n in NODES:
        v = view(n)
        if sorted(v) != sorted(NODES):
            raise Failure(f"`ham nodes` on {n} lists {sorted(v)}, not a, b, c")
    log(f"  ok: the mesh formed ({took:.1f}s after docker-compose up)")


def test_forwarding():
    log("2. ham --node X status --json from another node answers as X's own")
    keys = ("name", "pid", "state", "restarts")
    for src, dst in (("a", "b"), ("a", "c"), ("c", "a")):
        def probe():
            remote = ham(src, "--node", dst, "status", check=False, timeout=15)
            local = ham(dst, "status", check=False, timeout=15)
            if remote is None or local is None:
                return False, (remote, local)
            for e in remote.get("entities", []):
                missing = [k for k in keys if k not in e]
                if missing:
                    raise Failure(f"ham --node {dst} status --json: entity without {missing}: {e}")
            project = lambda s: sorted(tuple(e.get(k) for k in keys) for e in s["entities"])
            same = (project(remote) == project(local)
                    and remote.get("node", dst) == dst and local.get("node", dst) == dst)
            return same, {"via": src, "remote": project(remote), "local": project(local)}
        wait_until(f"`ham --node {dst} status` on {src} equals `ham status` on {dst}", probe, 15)
        log(f"  ok: {src} -> {dst}")


def test_node_death():
    log("3. docker kill a: b and c see it down; the singleton starts exactly once")
    run("docker", "kill", M.containers["a"])
    took = wait_until("b and c show a down", views_are({"a": "down"}, ("b", "c")), 15)
    log(f"  ok: a is down in b's and c's views {took:.1f}s after docker kill")
    for o in ("b", "c"):
        v = view(o)
        if v.get("b") != "up" or v.get("c") != "up":
            raise Failure(f"after a's death {o} sees {v}")
    if FAILOVER:
        wait_until(f"{SINGLETON} running on one of b, c",
                   lambda: ((w := running_singletons(("b", "c"))) != [], w), 15)
        time.sleep(3)  # a second start, were there one, would have happened by now
        where = check_singleton("after a's death", exactly_one=True)
        starts = starts_of_singleton(("b", "c"))
        if sum(starts.values()) != 1 or where != ["b"]:
            raise Failure(f"{SINGLETON} should start once, on b (the first live candidate): "
                          f"runs on {where}, started events {starts}")
        log(f"  ok: {SINGLETON} started once, on b (started events {starts})")
    else:
        log("  !!! failover checks skipped (HAM_CLUSTER_FAILOVER=0)")
    run("docker", "start", M.containers["a"])
    took = wait_until("a rejoins: every node sees a, b, c up", all_up(), 60)
    log(f"  ok: a restarted and rejoined ({took:.1f}s)")
    if FAILOVER:
        where = check_singleton("after a rejoined", exactly_one=True)
        log(f"  ok: {SINGLETON} still runs once, on {where[0]}")


def test_partition():
    log("4. partition: docker network disconnect c")
    c = M.containers["c"]
    follower = Follower("a")
    time.sleep(1)  # the subscription reaches every node
    run("docker", "network", "disconnect", M.network, c)
    try:
        took = wait_until("a and b see c down",
                          views_are({"c": "down"}, ("a", "b")), 15)
        log(f"  ok: a and b see c down ({took:.1f}s)")
        took = wait_until("c sees a and b down",
                          views_are({"a": "down", "b": "down"}, ("c",)), 15)
        log(f"  ok: c sees a and b down ({took:.1f}s)")
        log("  local recovery on both sides of the partition:")
        kill_and_see_restart("c")
        kill_and_see_restart("a")
        if FAILOVER:
            log(f"  during the partition {SINGLETON} runs on {running_singletons()}")
    finally:
        ip = f"{M.subnet}.{HOST_PART['c']}"
        p = run("docker", "network", "connect", "--alias", "c", "--ip", ip, M.network, c,
                check=False)
        if p.returncode != 0 and "already exists" not in p.stderr:
            raise Failure(f"docker network connect failed: {p.stderr.strip()}")
    took = wait_until("the mesh heals: every node sees a, b, c up", all_up(), 60)
    log(f"  ok: reconnected (alias c, {ip}); the mesh healed ({took:.1f}s)")
    try:
        # c restarted its ticker while cut off: the subscriber on a gets that event
        # once c is back (replayed from c's buffer, after the last one it saw).
        wait_until("the subscriber on a gets c's events from the partition",
                   lambda: (len(follower.starts("c", "ticker")) >= 1,
                            follower.starts("c", "ticker")), 15)
        log("  ok: the subscriber on a got c's ticker restart from the partition, replayed")
    finally:
        follower.stop()
    if FAILOVER:
        # Each side may have started its copy; once healed, the copy of the candidate
        # ranked last yields to the better-ranked one (ham's singleton reconciler).
        took = wait_until(f"{SINGLETON} runs on exactly one node after the heal",
                          lambda: (len(w := running_singletons()) == 1, w), 15)
        time.sleep(3)  # and stays so
        where = check_singleton("3 s later", exactly_one=True)
        log(f"  ok: {SINGLETON} runs once, on {where[0]} ({took:.1f}s after the heal)")


class Follower:
    """`ham --node all events --follow --json --kind started` inside a container: every
    node's `started` events, as a subscriber connected to that node gets them."""

    def __init__(self, node):
        self.events = []
        self.proc = subprocess.Popen(
            ["docker", "exec", M.containers[node], "ham", "--node", "all", "events",
             "--follow", "--json", "--kind", "started"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass

    def starts(self, node, entity):
        return [e for e in list(self.events)
                if e.get("node") == node and e.get("entity") == entity]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def test_rolling_restart():
    log("5. rolling restart: docker restart b, c, a in turn; a subscriber on a misses nothing")
    follower = Follower("a")
    try:
        time.sleep(1)  # the subscription reaches every node
        for n in ("b", "c", "a"):
            before = len(follower.starts(n, "ticker"))
            t0 = time.monotonic()
            run("docker", "restart", "-t", "10", M.containers[n], timeout=60)
            took = wait_until(f"after restarting {n}, every node sees a, b, c up", all_up(), 60)
            # A fresh hamd in a fresh container: its ticker is younger than the restart.
            ticker = (entities(n) or {}).get("ticker") or {}
            age = (time.monotonic() - t0) * 1000
            if ticker.get("state") != "running" or ticker.get("uptime_ms", age) >= age:
                raise Failure(f"after restarting {n}, its ticker is {ticker}")
            extra = ""
            if n != "a":
                # The restarted node's own first events (its new store numbers them
                # from 1) reach the subscriber on a: none is lost to the restart.
                wait_until(f"the subscriber on a sees {n}'s ticker start again",
                           lambda: (len(follower.starts(n, "ticker")) > before,
                                    follower.starts(n, "ticker")), 15)
                extra = "; the subscriber on a saw its ticker start"
            if FAILOVER:
                # A restarted holder takes its copy down with it: the singleton is
                # restored on the first live candidate, and never runs twice.
                wait_until(f"{SINGLETON} runs on exactly one node after restarting {n}",
                           lambda: (len(w := running_singletons()) == 1, w), 15)
                extra += (f"; {SINGLETON} runs on "
                          f"{check_singleton(f'after restarting {n}', True)}")
            log(f"  ok: {n} restarted, the mesh healed ({took:.1f}s){extra}")
    finally:
        follower.stop()


def test_pair_in_container():
    log("6. the HAM/Guardian pair inside a container (PID 1 is deploy/init)")
    n = "b"
    c = M.containers[n]

    def status():
        return ham(n, "status", check=False, timeout=15)
    before = status()
    pair, ticker = before["pair"], entities(n)["ticker"]
    run("docker", "exec", c, "kill", "-9", str(pair["ham_pid"]))

    def took_over():
        s = status()
        ok = (s is not None and s["pair"]["generation"] == pair["generation"] + 1
              and s["pair"].get("guardian_pid"))
        return ok, s and s["pair"]
    took = wait_until(f"the Guardian of {n} takes over after kill -9 of its HAM", took_over, 15)
    after = entities(n)["ticker"]
    if (after["pid"], after["restarts"]) != (ticker["pid"], ticker["restarts"]):
        raise Failure(f"the takeover restarted the ticker: {ticker} -> {after}")
    log(f"  ok: kill -9 HAM pid {pair['ham_pid']} -> generation {pair['generation'] + 1} "
        f"({took:.1f}s), ticker untouched (pid {after['pid']})")
    guardian = status()["pair"]["guardian_pid"]
    run("docker", "exec", c, "kill", "-9", str(guardian))
    wait_until(f"a new Guardian on {n}",
               lambda: ((p := (status() or {}).get("pair") or {}).get("guardian_pid")
                        not in (None, guardian), p), 15)
    log(f"  ok: kill -9 Guardian pid {guardian} -> a new Guardian")
    state = run("docker", "inspect", "-f", "{{.State.Running}} {{.RestartCount}}", c).stdout.split()
    if state != ["true", "0"]:
        raise Failure(f"the container of {n} did not survive (running, restarts): {state}")
    took = wait_until("every node sees a, b, c up", all_up(), 30)
    log(f"  ok: the container kept running; the mesh is whole ({took:.1f}s)")


def diagnostics():
    print("---- diagnostics ----", flush=True)
    for n, c in M.containers.items():
        for args in (("nodes",), ("status",)):
            p = run("docker", "exec", c, "ham", *args, check=False, timeout=15)
            print(f"$ docker exec {c} ham {' '.join(args)}\n{p.stdout}{p.stderr}", flush=True)
        p = run("docker", "logs", "--tail", "40", c, check=False)
        print(f"$ docker logs --tail 40 {c}\n{p.stdout}{p.stderr}", flush=True)


def main():
    def on_signal(sig, _frame):
        raise SystemExit(128 + sig)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    ok = False
    try:
        build_image()
        make_certs()
        up()
        test_mesh_forms()
        test_forwarding()
        test_node_death()
        test_partition()
        test_rolling_restart()
        test_pair_in_container()
        ok = True
    except Failure as e:
        print(f"\nFAILED: {e}\n", flush=True)
        try:
            diagnostics()
        except Exception as d:  # diagnostics must not hide the failure
            print(f"(diagnostics failed: {d})")
    finally:
        cleanup()
    if ok:
        log("PASSED: cluster tests (mesh, forwarding, node death, partition, rolling restart, "
            "pair in a container)")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
