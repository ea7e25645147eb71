"""`proxyvm` command line (docs/cli.md).

Owns: argument parsing, exit codes (0 ok/allow, 1 error/deny/broken chain, 2 usage), and turning
located errors into `FILE:LINE:COL: message` lines. Must not: contain protocol or policy logic.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 for usage errors: keep that contract
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _print_problems(e: Exception) -> None:
    problems = getattr(e, "problems", None)
    if problems:
        for p in problems:
            print(str(p), file=sys.stderr)
    else:
        print(f"proxyvm: {e}", file=sys.stderr)


def _load(config: str | None) -> tuple[Any, Any]:
    from proxyvm.config import load_all

    return load_all(config)


def _load_or_report(config: str | None) -> tuple[Any, Any] | None:
    """Config + policy, or None after printing every located problem (the caller exits 1)."""
    try:
        return _load(config)
    except Exception as e:  # noqa: BLE001 - located errors are printed, anything else too
        _print_problems(e)
        return None


# -- run -----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from proxyvm.services import REGISTRY, ServiceUnavailable, load_service_class
    from proxyvm.supervisor import Supervisor, prepare_dirs

    logging.basicConfig(
        level=os.environ.get("PROXYVM_LOG_LEVEL", "INFO"),
        format="%(asctime)s proxyvm[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_FAIL
    config, engine = loaded
    enabled: list[str] = []
    unavailable: dict[str, str] = {}
    for name in REGISTRY:
        if name in getattr(config, "unavailable", ()):
            unavailable[name] = "not available in this build yet"
            continue
        if getattr(config, name, None) is None:
            continue
        try:
            load_service_class(name)
        except ServiceUnavailable as e:
            unavailable[name] = str(e)
            continue
        except TypeError as e:
            print(f"proxyvm: {e}", file=sys.stderr)
            return EXIT_FAIL
        enabled.append(name)
    prepare_dirs(config)
    sup = Supervisor(os.path.abspath(args.config) if args.config else None, config, enabled, unavailable,
                     policy_digest=getattr(engine, "digest", ""), policy_mode=str(getattr(engine, "mode", "enforce")))
    return asyncio.run(sup.run())


# -- check ---------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_FAIL
    config, engine = loaded
    src = args.config or "built-in default"
    services = [n for n in ("dns", "smtp", "snmp", "http") if getattr(config, n, None) is not None]
    print(f"{src}: ok ({len(config.guests)} guests, services: {', '.join(services) or 'none'}, "
          f"policy: {getattr(engine, 'source', config.policy_path or 'built-in allow-all')})")
    return EXIT_OK


# -- explain -------------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    from proxyvm.inventory import Inventory

    request: dict[str, Any] = {}
    for kv in args.pairs:
        if "=" not in kv:
            print(f"proxyvm explain: expected KEY=VALUE, got {kv!r}", file=sys.stderr)
            return EXIT_USAGE
        k, v = kv.split("=", 1)
        request[k] = int(v) if k == "size" and v.isdigit() else v
    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_FAIL
    config, engine = loaded
    if args.guest:
        if args.guest != "unknown" and args.guest not in config.guests:
            print(f"proxyvm explain: no guest named {args.guest!r} in the config", file=sys.stderr)
            return EXIT_USAGE
        guest = args.guest
    else:
        try:
            ipaddress.ip_address(args.src)
        except ValueError:
            print(f"proxyvm explain: --src {args.src!r} is not an IP address", file=sys.stderr)
            return EXIT_USAGE
        guest = Inventory(config.guests).lookup(args.src)
    try:
        d = engine.decide(args.protocol, guest, request)
    except (KeyError, ValueError) as e:
        print(f"proxyvm explain: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"verdict: {d.verdict}")
    print(f"guest:   {guest}")
    print(f"rule:    {d.rule}")
    print(f"at:      {d.at}")
    print(f"reason:  {d.detail}")
    if d.plaintext:
        print("note:    this rule lets the request leave unencrypted (plaintext: true)")
    if d.limits:
        print("limits:  " + ", ".join(f"{k}={v}" for k, v in d.limits.items()))
    # would_deny is a denial decision that monitor mode lets through: report it as a denial.
    return EXIT_OK if str(d.verdict) == "allow" else EXIT_FAIL


# -- audit ---------------------------------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    from proxyvm.audit import verify

    res = verify([Path(f) for f in args.files], use_head=not args.no_head)
    print(str(res), file=sys.stdout if res.ok else sys.stderr)
    return EXIT_OK if res.ok else EXIT_FAIL


# -- audit show / replay / learn (reading logs back) --------------------------------------------
EXIT_CHANGED = 3  # replay: some verdict changes
_MAX_WARNINGS = 20


class _LogInput:
    """The chains a reading command works on (FILE arguments, else the config's audit log), with
    bad lines reported as `FILE:LINE: message`: fatal unless `lenient`, then warned and skipped."""

    def __init__(self, command: str, lenient: bool):
        self.command, self.lenient = command, lenient
        self.warned = 0
        self.bad = 0

    def chains(self, files: list[str], config: str | None) -> list[Any] | None:
        from proxyvm.auditlog_read import chains_of, log_set

        if files:
            return chains_of(files)
        from proxyvm.config import load_config

        try:
            cfg = load_config(config)
        except Exception as e:  # noqa: BLE001 - located config problems are printed
            _print_problems(e)
            return None
        found = log_set(cfg.audit.path)
        if not found:
            print(f"proxyvm {self.command}: no audit log at {cfg.audit.path} (from {cfg.source}); "
                  "name the files as arguments", file=sys.stderr)
            return None
        return found

    def warn(self, e: Exception) -> None:
        self.bad += 1
        if self.warned < _MAX_WARNINGS:
            print(f"proxyvm {self.command}: warning: {e}; skipped", file=sys.stderr)
        elif self.warned == _MAX_WARNINGS:
            print(f"proxyvm {self.command}: warning: more bad lines; not shown", file=sys.stderr)
        self.warned += 1

    def on_error(self, e: Exception) -> None:
        if not self.lenient:
            raise e
        self.warn(e)

    def verify(self, chains: list[Any]) -> bool:
        """Every chain's hash chain, before anything is learned or replayed from it."""
        from proxyvm.audit import verify

        for c in chains:
            res = verify(list(c.files))
            if res.ok:
                continue
            if self.lenient:
                print(f"proxyvm {self.command}: warning: {res}; the chain is broken, reading it anyway "
                      "(--no-verify)", file=sys.stderr)
                continue
            print(f"proxyvm {self.command}: {res}\n  the audit chain is broken (truncated, edited or not an "
                  f"audit log): refusing to {self.command} from it; check it with `proxyvm audit verify`, "
                  "or pass --no-verify to read it anyway", file=sys.stderr)
            return False
        return True


def _time_bounds(args: argparse.Namespace, command: str) -> tuple[str, str] | None:
    from proxyvm.auditlog_read import parse_time

    try:
        since = parse_time(args.since) if args.since else ""
        until = parse_time(args.until) if args.until else ""
    except ValueError as e:
        print(f"proxyvm {command}: {e}", file=sys.stderr)
        return None
    return since, until


def cmd_audit_show(args: argparse.Namespace) -> int:
    from proxyvm.auditlog_read import AuditReadError, RecordFilter, read_chains, table_line

    bounds = _time_bounds(args, "audit show")
    if bounds is None:
        return EXIT_USAGE
    inp = _LogInput("audit show", lenient=True)
    chains = inp.chains(args.files, args.config)
    if chains is None:
        return EXIT_FAIL
    keep = RecordFilter(
        frozenset(args.guest or ()), frozenset(args.protocol or ()), frozenset(args.verdict or ()),
        frozenset(args.rule or ()), frozenset(args.kind or ()), *bounds,
    )
    out = sys.stdout.buffer
    shown = 0
    try:
        for e in read_chains(chains, inp.on_error):
            if not keep(e.rec):
                continue
            shown += 1
            out.write(e.raw + b"\n" if args.json else table_line(e.rec).encode("utf-8", "backslashreplace") + b"\n")
    except AuditReadError as e:  # pragma: no cover - lenient mode warns instead
        print(f"proxyvm audit show: {e}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:  # `| head`
        return EXIT_OK
    out.flush()
    return EXIT_FAIL if inp.bad else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    import itertools
    import json

    from policy import load_policy
    from proxyvm.auditlog_read import AuditReadError, guest_names_in, read_chains
    from proxyvm.replay import Replayer

    inp = _LogInput("replay", lenient=args.no_verify)
    chains = inp.chains(args.files, args.config)
    if chains is None:
        return EXIT_FAIL
    if args.config:
        from proxyvm.config import load_config

        try:
            guests = set(load_config(args.config).guests)
        except Exception as e:  # noqa: BLE001
            _print_problems(e)
            return EXIT_FAIL
    else:
        guests = guest_names_in(p for c in chains for p in c.files)
    if not inp.verify(chains):
        return EXIT_FAIL
    entries = read_chains(chains, inp.on_error)
    try:
        first = next(entries, None)
    except AuditReadError as e:
        print(f"proxyvm replay: {e}\n  pass --no-verify to skip such lines", file=sys.stderr)
        return EXIT_FAIL
    if first is None:
        print("proxyvm replay: no audit records in " + ", ".join(str(p) for c in chains for p in c.files),
              file=sys.stderr)
        return EXIT_FAIL
    clock = [0.0]
    try:
        engine = load_policy(args.policy, guests, clock=lambda: clock[0])
    except Exception as e:  # noqa: BLE001 - located policy problems, as `proxyvm check` prints them
        _print_problems(e)
        if not args.config:
            print("proxyvm replay: (guests known from the records: "
                  f"{', '.join(sorted(guests)) or 'none'}; give -c CONFIG for the config's guests)", file=sys.stderr)
        return EXIT_FAIL
    rp = Replayer(engine, args.policy, clock)
    try:
        for e in itertools.chain((first,), entries):
            try:
                rp.add(e)
            except AuditReadError as bad:
                if not inp.lenient:
                    raise
                inp.warn(bad)
    except AuditReadError as e:
        print(f"proxyvm replay: {e}\n  pass --no-verify to skip such records", file=sys.stderr)
        return EXIT_FAIL
    rep = rp.report
    if inp.bad:
        rep.skipped["bad_line"] += inp.bad
    if args.json:
        print(json.dumps(rep.as_dict(), indent=1, sort_keys=False, default=str))
    else:
        sys.stdout.write(rep.text())
    return EXIT_CHANGED if rep.changed else EXIT_OK


def cmd_learn(args: argparse.Namespace) -> int:
    from proxyvm.auditlog_read import AuditReadError, read_chains
    from proxyvm.learn import Learner

    bounds = _time_bounds(args, "learn")
    if bounds is None:
        return EXIT_USAGE
    if args.threshold < 2:
        print("proxyvm learn: --threshold must be at least 2", file=sys.stderr)
        return EXIT_USAGE
    inp = _LogInput("learn", lenient=args.no_verify)
    chains = inp.chains(args.files, args.config)
    if chains is None:
        return EXIT_FAIL
    known: set[str] | None = None
    if args.config:
        from proxyvm.config import load_config

        try:
            known = set(load_config(args.config).guests)
        except Exception as e:  # noqa: BLE001
            _print_problems(e)
            return EXIT_FAIL
    if not inp.verify(chains):
        return EXIT_FAIL
    learner = Learner(args.threshold, args.guest, *bounds)
    records = 0
    try:
        for e in read_chains(chains, inp.on_error):
            records += 1
            try:
                learner.add(e)
            except AuditReadError as bad:
                if not inp.lenient:
                    raise
                inp.warn(bad)
    except AuditReadError as e:
        print(f"proxyvm learn: {e}\n  pass --no-verify to skip such records", file=sys.stderr)
        return EXIT_FAIL
    files = [str(p) for c in chains for p in c.files]
    if records == 0:
        print("proxyvm learn: no audit records in " + ", ".join(files), file=sys.stderr)
        return EXIT_FAIL
    if known is not None:
        for guest, n in learner.drop_guests(known):
            print(f"proxyvm learn: warning: guest {guest!r} is not in {args.config}: its {n} requests are "
                  "left out", file=sys.stderr)
    if not learner.groups:
        why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(learner.not_learned.items())) or "none"
        print(f"proxyvm learn: nothing to learn: no allowed decision in {records} records (not learned: {why})",
              file=sys.stderr)
        return EXIT_FAIL
    text = learner.render(files, args.mode)
    if args.output and args.output != "-":
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, out)
        except OSError as e:
            print(f"proxyvm learn: cannot write {out}: {e.strerror}", file=sys.stderr)
            return EXIT_FAIL
        print(f"proxyvm learn: {len(learner.rules())} rules from {learner.learned} allowed requests "
              f"written to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


# -- quarantine / release (the running instance, through its control socket) --------------------------
def _control(args: argparse.Namespace, command: str, req: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    from proxyvm.config import load_config
    from proxyvm.quarantine import QuarantineError, control_request

    try:
        cfg = load_config(args.config)
    except Exception as e:  # noqa: BLE001 - located config problems are printed
        _print_problems(e)
        return EXIT_FAIL, None
    try:
        resp = control_request(cfg.state_dir, req)
    except QuarantineError as e:
        print(f"proxyvm {command}: {e}", file=sys.stderr)
        return e.exit_code, None
    if not resp.get("ok"):
        print(f"proxyvm {command}: {resp.get('error', 'refused')}", file=sys.stderr)
        code = resp.get("exit")
        return code if code in (EXIT_FAIL, EXIT_USAGE) else EXIT_FAIL, None
    return EXIT_OK, resp


def cmd_quarantine(args: argparse.Namespace) -> int:
    if args.list:
        if args.guest or args.profile or args.reason:
            print("proxyvm quarantine: --list takes no GUEST, --profile or --reason", file=sys.stderr)
            return EXIT_USAGE
        code, resp = _control(args, "quarantine", {"op": "list"})
        if resp is not None:
            guests = resp.get("guests") or {}
            if not guests:
                print("no guest is quarantined")
            for g, e in sorted(guests.items()):
                print(f"{g}\t{e.get('profile')}\tsince {e.get('since')}\tby {e.get('by')}"
                      f"{' (' + e['user'] + ')' if e.get('user') else ''}\t{e.get('reason') or '-'}")
        return code
    if not args.guest:
        print("proxyvm quarantine: name a GUEST (or --list)", file=sys.stderr)
        return EXIT_USAGE
    req = {"op": "quarantine", "guest": args.guest, "profile": args.profile or "block", "reason": args.reason or ""}
    code, resp = _control(args, "quarantine", req)
    if resp is not None:
        e = resp["entry"]
        print(f"guest {args.guest} quarantined ({e['profile']}) since {e['since']}: effective on its next request")
    return code


def cmd_release(args: argparse.Namespace) -> int:
    code, resp = _control(args, "release", {"op": "release", "guest": args.guest, "reason": args.reason or ""})
    if resp is not None:
        e = resp["entry"]
        print(f"guest {args.guest} released (was {e.get('profile')} since {e.get('since')})")
    return code


# -- forensics -----------------------------------------------------------------------------------
def cmd_forensics(args: argparse.Namespace) -> int:
    from proxyvm import forensics

    if args.forensics_command == "verify":
        rep = forensics.verify(Path(args.bundle), args.manifest_sha256 or "")
        for p in rep.problems:
            print(f"proxyvm forensics verify: {p}", file=sys.stderr)
        if rep.ok:
            print(f"ok: {args.bundle}: every member matches the manifest, {rep.records} records in intact "
                  f"chain proofs (manifest sha256 {rep.manifest_sha256})")
        return EXIT_OK if rep.ok else EXIT_FAIL
    bounds = _time_bounds(args, "forensics export")
    if bounds is None:
        return EXIT_USAGE
    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_FAIL
    config, engine = loaded
    if args.guest != "unknown" and args.guest not in config.guests:
        print(f"proxyvm forensics export: no guest named {args.guest!r} in the config", file=sys.stderr)
        return EXIT_USAGE
    try:
        n, digest = forensics.export(config, engine, args.guest, bounds[0], Path(args.output))
    except OSError as e:
        print(f"proxyvm forensics export: {e}", file=sys.stderr)
        return EXIT_FAIL
    if n == 0:
        print(f"proxyvm forensics export: warning: no audit records of guest {args.guest} in {config.audit.path}",
              file=sys.stderr)
    print(f"{args.output}: {n} records of guest {args.guest}; manifest sha256 {digest} "
          "(note it: `forensics verify --manifest-sha256` checks the bundle against it)")
    return EXIT_OK


# -- gateway -------------------------------------------------------------------------------------
def cmd_gateway(args: argparse.Namespace) -> int:
    """`gateway-rules` (no action: print) and `gateway up|down` (apply/remove)."""
    from proxyvm import gateway

    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_FAIL
    action = getattr(args, "action", None)
    return gateway.cli_rules(loaded[0]) if action is None else gateway.cli_updown(loaded[0], action)


# -- mailq ---------------------------------------------------------------------------------------
def cmd_mailq(args: argparse.Namespace) -> int:
    try:
        from protocols.smtp import mailq
    except ModuleNotFoundError:
        print("proxyvm: the smtp service is not available in this build yet", file=sys.stderr)
        return EXIT_FAIL
    loaded = _load_or_report(args.config)
    if loaded is None:
        return EXIT_FAIL
    config = loaded[0]
    if config.smtp is None:
        print("proxyvm mailq: smtp is not configured", file=sys.stderr)
        return EXIT_FAIL
    return mailq.cli(config.smtp, flush=args.flush)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="proxyvm", description="Secure-protocol proxy appliance")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", help="config file (default: the built-in default)")
        return sp

    with_config(sub.add_parser("run", help="run every enabled service")).set_defaults(fn=cmd_run)
    with_config(sub.add_parser("check", help="validate config and policy")).set_defaults(fn=cmd_check)
    ex = with_config(sub.add_parser("explain", help="decide one hypothetical request"))
    who = ex.add_mutually_exclusive_group(required=True)
    who.add_argument("--guest", help="guest name")
    who.add_argument("--src", help="guest source address")
    ex.add_argument("protocol", choices=["dns", "smtp", "snmp", "http", "ws", "tls"])
    ex.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    ex.set_defaults(fn=cmd_explain)
    with_config(sub.add_parser("gateway-rules", help="print the nftables ruleset")).set_defaults(fn=cmd_gateway)
    gw = with_config(sub.add_parser("gateway", help="apply/remove transparent gateway rules"))
    gw.add_argument("action", choices=["up", "down"])
    gw.set_defaults(fn=cmd_gateway)
    au = sub.add_parser("audit", help="audit log tools")
    ausub = au.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    av = ausub.add_parser("verify", help="check the hash chain")
    av.add_argument("files", nargs="+", metavar="FILE", help="oldest first when rotated (audit.jsonl.1 audit.jsonl)")
    av.add_argument("--no-head", action="store_true", help="ignore the .head file")
    av.set_defaults(fn=cmd_audit_verify)
    ash = with_config(ausub.add_parser("show", help="filter and print audit records"))
    ash.add_argument("--guest", action="append", metavar="G", help="only this guest (repeatable)")
    ash.add_argument("--protocol", action="append", metavar="P", help="dns, smtp, snmp, http, ws, tls, proxyvm")
    ash.add_argument("--verdict", action="append", metavar="V", choices=["allow", "deny", "would_deny"])
    ash.add_argument("--rule", action="append", metavar="R", help="only records decided by rule id R")
    ash.add_argument("--kind", action="append", metavar="K",
                     help="decision, alert, quarantine, release, service, reload, delivery (repeatable)")
    ash.add_argument("--since", metavar="T", help="ISO time or a duration ago (30m, 1h, 2d)")
    ash.add_argument("--until", metavar="T", help="ISO time or a duration ago")
    ash.add_argument("--json", action="store_true", help="print the records as stored")
    ash.add_argument("files", nargs="*", metavar="FILE", help="default: the config's audit log (all its chains)")
    ash.set_defaults(fn=cmd_audit_show)
    le = with_config(sub.add_parser("learn", help="a least-privilege rules file from allowed traffic"))
    le.add_argument("--guest", action="append", metavar="G", help="only this guest (repeatable)")
    le.add_argument("--since", metavar="T", help="ISO time or a duration ago (30m, 1h, 2d)")
    le.add_argument("--until", metavar="T", help="ISO time or a duration ago")
    le.add_argument("-o", "--output", metavar="rules.yaml", help="write here (default: standard output)")
    le.add_argument("--no-verify", action="store_true", help="read a log whose hash chain is broken")
    le.add_argument("--mode", choices=["monitor", "enforce"], default="monitor",
                    help="the learned file's mode (default monitor: review, then enforce)")
    le.add_argument("--threshold", type=int, default=3, metavar="N",
                    help="distinct names/paths/OIDs under one parent before it becomes a wildcard (default 3)")
    le.add_argument("files", nargs="*", metavar="FILE", help="default: the config's audit log (all its chains)")
    le.set_defaults(fn=cmd_learn)
    rp = with_config(sub.add_parser("replay", help="decide recorded requests again under another policy"))
    rp.add_argument("--policy", required=True, metavar="NEW.yaml", help="the rules file to replay under")
    rp.add_argument("--json", action="store_true", help="the report as JSON")
    rp.add_argument("--no-verify", action="store_true", help="read a log whose hash chain is broken")
    rp.add_argument("files", nargs="*", metavar="FILE", help="default: the config's audit log (all its chains)")
    rp.set_defaults(fn=cmd_replay)
    qu = with_config(sub.add_parser("quarantine", help="quarantine a guest of the running instance"))
    qu.add_argument("guest", nargs="?", metavar="GUEST")
    qu.add_argument("--profile", choices=["block", "honeypot"], help="block (default): refuse everything; "
                    "honeypot: answer from a sinkhole and record everything")
    qu.add_argument("--reason", metavar="TEXT", help="why (goes into the audit record)")
    qu.add_argument("--list", action="store_true", help="list quarantined guests")
    qu.set_defaults(fn=cmd_quarantine)
    rl = with_config(sub.add_parser("release", help="release a quarantined guest"))
    rl.add_argument("guest", metavar="GUEST")
    rl.add_argument("--reason", metavar="TEXT", help="why (goes into the audit record)")
    rl.set_defaults(fn=cmd_release)
    from proxyvm.fleet.cli import add_parser as add_fleet_parser

    add_fleet_parser(sub, _Parser)
    fo = sub.add_parser("forensics", help="evidence bundle of one guest")
    fosub = fo.add_subparsers(dest="forensics_command", required=True, parser_class=_Parser)
    fe = with_config(fosub.add_parser("export", help="the guest's records with chain proof, policy, config"))
    fe.add_argument("guest", metavar="GUEST")
    fe.add_argument("--since", metavar="T", help="ISO time or a duration ago (30m, 1h, 2d)")
    fe.set_defaults(until=None)
    fe.add_argument("-o", "--output", required=True, metavar="BUNDLE.tar")
    fe.set_defaults(fn=cmd_forensics)
    fv = fosub.add_parser("verify", help="check a bundle against its manifest and chain proofs")
    fv.add_argument("bundle", metavar="BUNDLE.tar")
    fv.add_argument("--manifest-sha256", metavar="HEX", help="the manifest digest export printed")
    fv.set_defaults(fn=cmd_forensics)
    mq = with_config(sub.add_parser("mailq", help="list the SMTP spool"))
    mq.add_argument("--flush", action="store_true", help="retry deferred mail now")
    mq.set_defaults(fn=cmd_mailq)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
