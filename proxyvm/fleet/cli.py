"""`proxyvm fleet ...` (docs/cli.md#fleet): the operator's side of fleet mode.

Owns: `fleet init` (the stream and the KV buckets, with the settings docs/deployment.md explains),
`fleet keygen`, `fleet push` (validate as `check`, sign, put: prints the revision), `fleet status`,
`fleet audit` (the filters of `audit show`, fleet-wide), `fleet verify` (every node's chain from
the stream alone) and `fleet quarantine|release GUEST@NODE`. Every command takes `-c CONFIG`: a
config whose `fleet:` section names the servers, CA and this operator's credentials.
Must not: hold a private key longer than one signature, or print credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from proxyvm.fleet import (
    DEFAULT_DUPLICATE_WINDOW,
    NODE_NAME,
    NODES_BUCKET,
    POLICY_BUCKET,
    POLICY_KEY,
    QUARANTINE_BUCKET,
    STREAM,
    SUBJECT_PREFIX,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
GENESIS = "0" * 64


def _err(cmd: str, msg: str) -> None:
    print(f"proxyvm fleet {cmd}: {msg}", file=sys.stderr)


def _settings(args: argparse.Namespace, cmd: str) -> Any:
    from proxyvm.config import load_config

    try:
        cfg = load_config(args.config)
    except Exception as e:  # noqa: BLE001 - located problems
        for p in getattr(e, "problems", None) or [e]:
            print(str(p), file=sys.stderr)
        return None
    if cfg.fleet is None:
        _err(cmd, f"{cfg.source} has no fleet: section (servers, ca_file, credentials_file)")
        return None
    return cfg


async def _connect(cfg: Any, cmd: str) -> Any:
    from proxyvm.fleet.conn import connect_settings, describe

    errors: list[str] = []

    async def on_error(e: BaseException) -> None:
        errors.append(describe(e))

    try:
        return await connect_settings(cfg.fleet, f"proxyvm fleet {cmd}", on_error=on_error, attempts=1)
    except Exception as e:  # noqa: BLE001
        why = errors[-1] if errors else describe(e)
        raise SystemExit(_fail(cmd, f"cannot connect to NATS ({', '.join(cfg.fleet.nats)}): {why}")) from None


def _fail(cmd: str, msg: str) -> int:
    _err(cmd, msg)
    return EXIT_FAIL


def _run(coro: Any) -> int:
    from proxyvm.fleet.conn import describe

    try:
        return int(asyncio.run(coro))
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        print(f"proxyvm fleet: {describe(e)}", file=sys.stderr)
        return EXIT_FAIL


# -- init -----------------------------------------------------------------------------------------
async def _init(args: argparse.Namespace, cfg: Any) -> int:
    import nats.js.errors
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    nc = await _connect(cfg, "init")
    js = nc.jetstream(timeout=10)
    try:
        want = StreamConfig(
            name=STREAM, subjects=[f"{SUBJECT_PREFIX}.>"], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, num_replicas=args.replicas, duplicate_window=args.duplicate_window,
            max_age=args.max_age or None, max_bytes=args.max_bytes or -1, discard=DiscardPolicy.OLD,
            description="proxyvm audit records, one message per record (docs/audit.md)",
        )
        try:
            info = await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await js.add_stream(want)
            print(f"stream {STREAM}: created (R{args.replicas}, duplicate window {args.duplicate_window:g}s, "
                  f"max_age {args.max_age or 'unlimited'}, max_bytes {args.max_bytes or 'unlimited'})")
        else:
            from proxyvm.fleet.node import stream_problems

            problems = stream_problems(info.config)
            if problems and not args.update:
                return _fail("init", f"stream {STREAM} exists with other settings: {'; '.join(problems)}; "
                             "run again with --update to set ours")
            if args.update:
                want.num_replicas = info.config.num_replicas  # changing replicas is a separate decision
                await js.update_stream(want)
                print(f"stream {STREAM}: updated")
            else:
                print(f"stream {STREAM}: exists, settings fit")
        for bucket, history in ((POLICY_BUCKET, 16), (QUARANTINE_BUCKET, 8), (NODES_BUCKET, 1)):
            try:
                await js.key_value(bucket)
                print(f"KV bucket {bucket}: exists")
            except nats.js.errors.BucketNotFoundError:
                await js.create_key_value(bucket=bucket, history=history, replicas=args.replicas,
                                          storage=StorageType.FILE)
                print(f"KV bucket {bucket}: created (R{args.replicas}, history {history})")
    finally:
        await nc.close()
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    cfg = _settings(args, "init")
    return EXIT_FAIL if cfg is None else _run(_init(args, cfg))


# -- keygen ---------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    from proxyvm.fleet.bundle import keygen

    priv = Path(args.output)
    pub = Path(args.public or (str(priv.with_suffix("")) + ".pub"))
    try:
        kid = keygen(priv, pub)
    except FileExistsError:
        return _fail("keygen", f"{priv} exists: not overwriting a signing key")
    except OSError as e:
        return _fail("keygen", f"cannot write {e.filename}: {e.strerror}")
    print(f"private key {priv} (mode 0600: keep it off the appliances), public key {pub} ({kid}): "
          "install the public one as fleet.policy_key on every node")
    return EXIT_OK


# -- push -----------------------------------------------------------------------------------------
async def _push(args: argparse.Namespace, cfg: Any, bundle_for: Any) -> int:
    import nats.js.errors

    nc = await _connect(cfg, "push")
    try:
        kv = await nc.jetstream(timeout=10).key_value(POLICY_BUCKET)
        try:
            cur = await kv.get(POLICY_KEY)
            last, kv_rev = json.loads(cur.value or b"{}").get("revision", 0), cur.revision
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            last, kv_rev = 0, None
        except ValueError:
            last, kv_rev = 0, cur.revision
        revision = int(last or 0) + 1
        bundle, digest = bundle_for(revision)
        data = json.dumps(bundle, separators=(",", ":")).encode()
        try:
            if kv_rev is None:
                await kv.create(POLICY_KEY, data)
            else:
                await kv.update(POLICY_KEY, data, last=kv_rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            return _fail("push", "another push happened meanwhile: run it again")
    except nats.js.errors.BucketNotFoundError:
        return _fail("push", f"KV bucket {POLICY_BUCKET} does not exist: run `proxyvm fleet init`")
    finally:
        await nc.close()
    print(f"revision {revision}: {digest} ({len(data)} bytes, signed {bundle['key_id']})")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from proxyvm.audit import now_iso
    from proxyvm.fleet.bundle import BundleError, load_private_key, make_bundle

    cfg = _settings(args, "push")
    if cfg is None:
        return EXIT_FAIL
    try:
        key = load_private_key(args.sign)
    except BundleError as e:
        return _fail("push", str(e))
    rules = Path(args.rules)
    guests = set(cfg.guests)
    try:  # validate before connecting: `proxyvm check`'s messages, FILE:LINE:COL
        from proxyvm.fleet.bundle import collect

        collect(rules, guests)
    except BundleError as e:
        return _fail("push", str(e))
    except Exception as e:  # noqa: BLE001 - located policy problems
        for p in getattr(e, "problems", None) or [e]:
            print(str(p), file=sys.stderr)
        return _fail("push", f"{rules} is not valid: nothing pushed")
    created = now_iso()
    return _run(_push(args, cfg, lambda rev: make_bundle(rules, rev, created, key, guests)))


# -- status ---------------------------------------------------------------------------------------
def _age(ts: str) -> float:
    try:
        return (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds()
    except (ValueError, AttributeError):
        return float("inf")


async def _node_status(js: Any) -> dict[str, dict[str, Any]]:
    import nats.js.errors

    kv = await js.key_value(NODES_BUCKET)
    out: dict[str, dict[str, Any]] = {}
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return out
    for k in keys:
        try:
            out[k] = json.loads((await kv.get(k)).value or b"{}")
        except (ValueError, nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue
    return out


async def _status(args: argparse.Namespace, cfg: Any) -> int:
    nc = await _connect(cfg, "status")
    try:
        js = nc.jetstream(timeout=10)
        nodes = await _node_status(js)
        info = await js.stream_info(STREAM)
        policy_rev = 0
        try:
            kv = await js.key_value(POLICY_BUCKET)
            policy_rev = json.loads((await kv.get(POLICY_KEY)).value or b"{}").get("revision", 0)
        except Exception:  # noqa: BLE001, S110 - no bundle pushed yet
            pass
    finally:
        await nc.close()
    if args.json:
        print(json.dumps({"stream": {"messages": info.state.messages, "bytes": info.state.bytes},
                          "policy_revision": policy_rev, "nodes": nodes}, indent=1))
        return EXIT_OK
    print(f"stream {STREAM}: {info.state.messages} records, {info.state.bytes} bytes; "
          f"latest policy revision {policy_rev or 'none'}; {len(nodes)} nodes seen")
    print(f"{'NODE':<16} {'SEEN':>7} {'POLICY':>6} {'SEQ':>9} {'ACKED':>9} {'LAG':>7} {'LAG_S':>7} {'SPOOL':>9}  FAULTS")
    stale = 0
    for name, s in sorted(nodes.items()):
        age = _age(s.get("ts", ""))
        stale += age > args.stale
        pol = (s.get("policy") or {}).get("revision") or "-"
        faults = "; ".join(f"{k}: {v}" for k, v in (s.get("faults") or {}).items()) or "-"
        print(f"{name:<16} {age:>6.0f}s {pol!s:>6} {s.get('seq', 0):>9} {s.get('acked', 0):>9} "
              f"{s.get('lag_records', 0):>7} {s.get('lag_seconds', 0):>7.1f} {s.get('spool_bytes', 0):>9}  {faults}")
    return EXIT_FAIL if stale else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _settings(args, "status")
    return EXIT_FAIL if cfg is None else _run(_status(args, cfg))


# -- reading the stream ---------------------------------------------------------------------------
async def read_stream(js: Any, subject: str, since: dt.datetime | None = None, batch: int = 2000) -> Any:
    """Every message of the stream on `subject` (wildcards allowed), oldest first, then stop."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    cc = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0, max_ack_pending=-1,
                        deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
                        opt_start_time=since.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if since else None)
    sub = await js.pull_subscribe(subject, stream=STREAM, config=cc)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=2)
            except nats.errors.TimeoutError:
                return
            for m in msgs:
                yield m
            if msgs and msgs[-1].metadata.num_pending == 0:
                return
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001, S110 - the consumer expires by itself
            pass


def _node_of(subject: str) -> str:
    parts = subject.split(".")
    return parts[2] if len(parts) > 3 else "?"


# -- audit ----------------------------------------------------------------------------------------
async def _audit(args: argparse.Namespace, cfg: Any, keep: Any, since_dt: dt.datetime | None) -> int:
    import orjson

    from proxyvm.auditlog_read import table_line

    nodes = args.node or [None]
    protocols = args.protocol or [None]
    subjects = [f"{SUBJECT_PREFIX}.{n or '*'}.{p or '*'}" for n in nodes for p in protocols]
    out = sys.stdout.buffer
    nc = await _connect(cfg, "audit")
    shown = 0
    try:
        js = nc.jetstream(timeout=10)
        for subj in subjects:
            async for m in read_stream(js, subj, since_dt):
                try:
                    rec = orjson.loads(m.data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or not keep(rec):
                    continue
                node = _node_of(m.subject)
                shown += 1
                if args.json:
                    out.write(b'{"node":' + orjson.dumps(node) + b"," + m.data[1:] + b"\n")
                else:
                    out.write(f"{node:<12} ".encode() + table_line(rec).encode("utf-8", "backslashreplace") + b"\n")
    except BrokenPipeError:
        return EXIT_OK
    finally:
        await nc.close()
    out.flush()
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from proxyvm.auditlog_read import RecordFilter, parse_time

    try:
        since = parse_time(args.since) if args.since else ""
        until = parse_time(args.until) if args.until else ""
    except ValueError as e:
        _err("audit", str(e))
        return EXIT_USAGE
    for n in args.node or ():
        if not NODE_NAME.match(n):
            _err("audit", f"bad node name {n!r}")
            return EXIT_USAGE
    keep = RecordFilter(frozenset(args.guest or ()), frozenset(args.protocol or ()), frozenset(args.verdict or ()),
                        frozenset(args.rule or ()), frozenset(args.kind or ()), since, until)
    cfg = _settings(args, "audit")
    if cfg is None:
        return EXIT_FAIL
    # the stream's own time narrows the read; the records' ts decide (a node's clock may be off)
    since_dt = (dt.datetime.fromisoformat(since.replace("Z", "+00:00")) - dt.timedelta(minutes=5)) if since else None
    return _run(_audit(args, cfg, keep, since_dt))


# -- verify ---------------------------------------------------------------------------------------
class ChainCheck:
    """One node's chain as the stream holds it: every line by seq, then checked in seq order
    (the first seq present anchors it, as `proxyvm audit verify` anchors on the oldest file)."""

    def __init__(self, node: str, chain: str):
        self.node, self.chain = node, chain
        self.lines: dict[int, bytes] = {}
        self.problems: list[str] = []
        self.first = self.last = self.count = 0

    def add(self, seq: int, line: bytes) -> None:
        if seq in self.lines:
            self.problems.append(f"seq {seq} is in the stream more than once"
                                 + ("" if self.lines[seq] == line else " (with different contents)"))
            return
        self.lines[seq] = line

    def finish(self) -> None:
        if not self.lines:
            return
        seqs = sorted(self.lines)
        self.first, self.last = seqs[0], seqs[-1]
        prev_seq, prev_hash = None, None
        for seq in seqs:
            line = self.lines[seq]
            try:
                rec = json.loads(line)
                prev, own = str(rec["prev"]), int(rec["seq"])
            except (ValueError, KeyError, TypeError):
                self.problems.append(f"seq {seq}: not an audit record (bad JSON, or no seq/prev)")
                prev_seq, prev_hash = seq, None
                continue
            if own != seq:
                self.problems.append(f"message id says seq {seq}, the record says seq {own}")
            if prev_seq is None:
                if seq == 1 and prev != GENESIS:
                    self.problems.append("seq 1 does not start a chain (prev is not the genesis hash)")
            elif seq != prev_seq + 1:
                self.problems.append(f"seq {prev_seq + 1}..{seq - 1} missing from the stream ({seq - prev_seq - 1} "
                                     "records)")
            elif prev_hash is not None and prev != prev_hash:
                self.problems.append(f"seq {seq}: prev is not the sha256 of seq {prev_seq}: a record was altered")
            prev_seq, prev_hash = seq, hashlib.sha256(line).hexdigest()
            self.count += 1


async def _verify(args: argparse.Namespace, cfg: Any) -> int:
    nc = await _connect(cfg, "verify")
    chains: dict[tuple[str, str], ChainCheck] = {}
    try:
        js = nc.jetstream(timeout=10)
        nodes = args.node or [None]
        reported = await _node_status(js)
        for n in nodes:
            async for m in read_stream(js, f"{SUBJECT_PREFIX}.{n or '*'}.*"):
                mid = (m.headers or {}).get("Nats-Msg-Id", "")
                node, _, rest = mid.partition(":")
                chain, _, seq_text = rest.rpartition(":")
                if not node or not chain or not seq_text.isdigit() or node != _node_of(m.subject):
                    print(f"{m.subject} stream seq {m.metadata.sequence.stream}: no proxyvm message id", file=sys.stderr)
                    continue
                c = chains.get((node, chain))
                if c is None:
                    c = chains[(node, chain)] = ChainCheck(node, chain)
                c.add(int(seq_text), bytes(m.data))
    finally:
        await nc.close()
    if args.node:
        for n in args.node:
            if not any(k[0] == n for k in chains):
                print(f"{n}: no records in the stream", file=sys.stderr)
                return EXIT_FAIL
    bad = 0
    for (node, chain), c in sorted(chains.items()):
        c.finish()
        acked = (reported.get(node) or {}).get("acked")
        last = c.last
        if acked and (reported.get(node) or {}).get("chain") == chain and acked > last:
            c.problems.append(f"the node reports seq {acked} acknowledged but the stream ends at {last}")
        if c.problems:
            bad += 1
            for p in c.problems[:20]:
                print(f"{node} {chain}: {p}", file=sys.stderr)
            if len(c.problems) > 20:
                print(f"{node} {chain}: ... {len(c.problems) - 20} more problems", file=sys.stderr)
        else:
            print(f"{node} {chain}: ok: {c.count} records, seq {c.first}..{last}, chain intact"
                  + ("" if c.first == 1 else f" (anchored at seq {c.first}: older records are not in the stream)"))
    if not chains:
        print("no records in the stream", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_FAIL if bad else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = _settings(args, "verify")
    return EXIT_FAIL if cfg is None else _run(_verify(args, cfg))


# -- quarantine / release ------------------------------------------------------------------------
def _guest_at(text: str, cmd: str) -> tuple[str, str] | None:
    guest, sep, node = text.rpartition("@")
    if not sep or not guest or not NODE_NAME.match(node):
        _err(cmd, f"{text!r}: write GUEST@NODE, e.g. web1@hv-17")
        return None
    return guest, node


async def _wait_node(js: Any, node: str, guest: str, want: bool, wait: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < wait:
        s = (await _node_status(js)).get(node) or {}
        if (guest in (s.get("quarantined") or {})) == want:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def _quarantine(args: argparse.Namespace, cfg: Any, guest: str, node: str, release: bool) -> int:
    import getpass

    import nats.js.errors

    cmd = "release" if release else "quarantine"
    nc = await _connect(cfg, cmd)
    try:
        js = nc.jetstream(timeout=10)
        try:
            kv = await js.key_value(QUARANTINE_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return _fail(cmd, f"KV bucket {QUARANTINE_BUCKET} does not exist: run `proxyvm fleet init`")
        key = f"{node}.{guest}"
        if release:
            await kv.delete(key)
        else:
            entry = {"profile": args.profile or "block", "reason": args.reason or "", "user": getpass.getuser()}
            await kv.put(key, json.dumps(entry).encode())
        if args.wait <= 0:
            print(f"{guest}@{node}: {cmd} put in {QUARANTINE_BUCKET}")
            return EXIT_OK
        took = await _wait_node(js, node, guest, not release, args.wait)
    finally:
        await nc.close()
    if took is None:
        return _fail(cmd, f"{guest}@{node}: put in {QUARANTINE_BUCKET}, but node {node} has not confirmed it within "
                     f"{args.wait:g}s (is it up? see `proxyvm fleet status`); it applies it when it is back")
    print(f"guest {guest} {'released' if release else 'quarantined (' + (args.profile or 'block') + ')'} "
          f"on {node}: confirmed in {took:.2f}s")
    return EXIT_OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    at = _guest_at(args.target, "quarantine")
    cfg = _settings(args, "quarantine") if at else None
    return EXIT_USAGE if at is None else (EXIT_FAIL if cfg is None else _run(_quarantine(args, cfg, *at, False)))


def cmd_release(args: argparse.Namespace) -> int:
    at = _guest_at(args.target, "release")
    cfg = _settings(args, "release") if at else None
    return EXIT_USAGE if at is None else (EXIT_FAIL if cfg is None else _run(_quarantine(args, cfg, *at, True)))


# -- the parser -----------------------------------------------------------------------------------
def add_parser(sub: Any, parser_class: Any) -> None:
    fl = sub.add_parser("fleet", help="fleet mode: many appliances, one policy, one audit trail (NATS JetStream)")
    fsub = fl.add_subparsers(dest="fleet_command", required=True, parser_class=parser_class)

    def with_config(sp: Any) -> Any:
        sp.add_argument("-c", "--config", required=True, help="a config with a fleet: section (servers, credentials)")
        return sp

    it = with_config(fsub.add_parser("init", help="create the audit stream and the KV buckets"))
    it.add_argument("--replicas", type=int, default=3, help="JetStream replicas (default 3)")
    it.add_argument("--duplicate-window", type=float, default=DEFAULT_DUPLICATE_WINDOW, metavar="SECONDS",
                    help=f"de-duplication window (default {DEFAULT_DUPLICATE_WINDOW:g}s)")
    it.add_argument("--max-age", type=float, default=0, metavar="SECONDS", help="drop records older than this")
    it.add_argument("--max-bytes", type=int, default=0, metavar="BYTES", help="drop the oldest records past this")
    it.add_argument("--update", action="store_true", help="set these settings on an existing stream")
    it.set_defaults(fn=cmd_init)
    kg = fsub.add_parser("keygen", help="make an Ed25519 key pair for signing policy bundles")
    kg.add_argument("-o", "--output", required=True, metavar="KEY", help="the private key (written 0600)")
    kg.add_argument("--public", metavar="PUB", help="the public key (default: KEY without suffix + .pub)")
    kg.add_argument("-c", "--config", help="not needed (accepted like the other fleet commands)")
    kg.set_defaults(fn=cmd_keygen)
    pu = with_config(fsub.add_parser("push", help="validate, sign and publish a policy"))
    pu.add_argument("rules", metavar="rules.yaml")
    pu.add_argument("--sign", required=True, metavar="KEY", help="Ed25519 private key (PEM)")
    pu.set_defaults(fn=cmd_push)
    st = with_config(fsub.add_parser("status", help="nodes seen, applied revision, last audit seq, lag"))
    st.add_argument("--json", action="store_true")
    st.add_argument("--stale", type=float, default=60.0, metavar="SECONDS",
                    help="exit 1 when a node was last seen longer ago (default 60)")
    st.set_defaults(fn=cmd_status)
    au = with_config(fsub.add_parser("audit", help="query the fleet's audit trail (the filters of audit show)"))
    au.add_argument("--node", action="append", metavar="N", help="only this node (repeatable)")
    au.add_argument("--guest", action="append", metavar="G")
    au.add_argument("--protocol", action="append", metavar="P")
    au.add_argument("--verdict", action="append", metavar="V", choices=["allow", "deny", "would_deny"])
    au.add_argument("--rule", action="append", metavar="R")
    au.add_argument("--kind", action="append", metavar="K")
    au.add_argument("--since", metavar="T")
    au.add_argument("--until", metavar="T")
    au.add_argument("--json", action="store_true", help='records as stored, with "node" first')
    au.set_defaults(fn=cmd_audit)
    ve = with_config(fsub.add_parser("verify", help="verify every node's chain from the stream alone"))
    ve.add_argument("--node", action="append", metavar="N")
    ve.set_defaults(fn=cmd_verify)
    for name, fn, helptext in (("quarantine", cmd_quarantine, "quarantine a guest on one node"),
                               ("release", cmd_release, "release a guest on one node")):
        q = with_config(fsub.add_parser(name, help=helptext))
        q.add_argument("target", metavar="GUEST@NODE")
        if name == "quarantine":
            q.add_argument("--profile", choices=["block", "honeypot"])
        q.add_argument("--reason", metavar="TEXT")
        q.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                       help="wait this long for the node to confirm (0: don't wait)")
        q.set_defaults(fn=fn)
