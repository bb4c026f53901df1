"""Command line: ``fastrelay serve | check-config | explain | hash-password | queue | archive |
quarantine | user``."""

from __future__ import annotations

import argparse
import getpass
import sys
import time

from .config import load_config
from .errors import ConfigError


def _cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    return serve(args.config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .app import build_policy
    from .tlsutil import server_context

    try:
        config = load_config(args.config)
        policy = build_policy(config)
        s = config.server
        # Load the certificate as serve would, unless serve is to generate it
        # (check-config writes nothing).
        if s.tls_cert and not (s.tls_self_signed and not (
                config.path(s.tls_cert).exists() and config.path(s.tls_key).exists())):
            server_context(config)
    except (ConfigError, ValueError) as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok ({len(config.accounts)} account(s), "
          f"{policy.directory.user_count()} user(s), {len(policy.directory.rules)} rule(s))")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from . import replies
    from .app import build_policy
    from .policy import SessionFacts, is_valid_helo, normalize_address

    try:
        config = load_config(args.config)
        policy = build_policy(config)
        if config.abuse.enabled:
            # The running relay's suspensions for spam are saved in its abuse state file.
            from .abuse import read_state, state_path
            path = state_path(config)
            try:
                policy.suspended = set(read_state(path).suspensions)
            except (OSError, ValueError) as exc:
                raise ConfigError(str(path), "", f"abuse state unreadable: {exc}") from None
    except (ConfigError, ValueError) as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return 2
    args.helo = args.helo.strip()
    # The server's HELO checks, in its order: empty, syntax, then the policy's.
    if not args.helo:
        helo_refusal: bytes | None = replies.EMPTY_HELO
    elif not is_valid_helo(args.helo):
        helo_refusal = replies.BAD_HELO
    else:
        helo_refusal = policy.helo_refusal(args.helo, args.ip)
    print(f"client {args.ip}, HELO {args.helo}, TLS {'yes' if args.tls else 'no'}, AUTH {args.auth or '-'}")
    if helo_refusal is not None:
        print(f"HELO: refused: {helo_refusal.decode().strip()}")
        return 1
    if args.auth:
        # The server offers AUTH inside TLS only, to registered, licensed, not suspended users.
        if not args.tls:
            print(f"AUTH: refused: {replies.NEED_STARTTLS.decode().strip()}")
            return 1
        found = policy.directory.user(normalize_address(args.auth))
        if found is None or not found[1].may_send:
            print(f"AUTH: refused: {replies.AUTH_FAILED.decode().strip()}")
            return 1
        args.auth = found[1].address
    sender = normalize_address(args.sender) if args.sender else ""
    decision = policy.decide(SessionFacts(args.ip, args.helo, args.tls, args.auth), sender)
    if decision.account is not None:
        print(f"account: {decision.account.name} (identified by {decision.identified_by})")
    else:
        print("account: none")
    for v in decision.verdicts:
        print(f"  rule {v.rule.name!r}: {'ADMITS' if v.step.name == 'ADMITTED' else 'fails at ' + v.step.name}: {v.reason}")
    print(f"MAIL FROM:<{sender}>: {decision.reply.decode().strip()}")
    if not decision.allowed:
        print(f"reason: {decision.reason}")
        return 1
    if decision.original_sender is not None:
        print(f"sender rewritten to <{decision.sender}>")
    for i, rcpt in enumerate(args.rcpt or []):
        if decision.null_sender and i > 0:
            print(f"RCPT TO:<{rcpt}>: {replies.NULL_SENDER_ONE_RCPT.decode().strip()}")
        else:
            print(f"RCPT TO:<{rcpt}>: 250 2.1.5 Ok (limits are checked by the running server)")
    return 0


def _cmd_hash_password(args: argparse.Namespace) -> int:
    from .policy import hash_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("fastrelay: passwords differ", file=sys.stderr)
            return 2
    if not password:
        print("fastrelay: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def _cmd_queue_list(args: argparse.Namespace) -> int:
    from .spool import Spool

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"fastrelay: {exc}", file=sys.stderr)
        return 2
    spool = Spool(config.path(config.server.spool_dir))
    messages = spool.scan()
    now = time.time()
    print(f"{'queue id':<16} {'state':<9} {'size':>9} {'age':>7}  sender -> recipients")
    for m in messages:
        e = m.envelope
        print(f"{e.queue_id:<16} {m.state.state.value:<9} {m.body_len:>9} {int(now - e.arrival):>6}s  "
              f"<{e.sender}> -> {', '.join(e.recipients)}")
        if m.state.next_attempt or m.state.last_error:
            when = f"next attempt in {max(0, int(m.state.next_attempt - now))}s; " if m.state.next_attempt else ""
            print(f"{'':<16} {when}attempts: {m.state.attempts}; last error: {m.state.last_error or '-'}")
    print(f"-- {len(messages)} message(s)")
    return 0


def _cmd_queue_control(args: argparse.Namespace) -> int:
    """flush / hold / release / delete: ask the running relay over its control socket."""
    from .control import ask_running_relay

    message: dict[str, object] = {"cmd": args.queue_command}
    if getattr(args, "queue_id", None):
        message["queue_id"] = args.queue_id
    answer = ask_running_relay(args.config, message)
    if answer is None:
        return 1
    print(answer.get("message", "ok"))
    return 0

def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from .control import ask_running_relay
    from .status import render

    answer = ask_running_relay(args.config, {"cmd": "status"})
    if answer is None:
        return 1
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrelay", description="A high-performance SMTP relay")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the relay in the foreground")
    p.add_argument("--config", required=True)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file without starting")
    p.add_argument("--config", required=True)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("explain", help="show the relay decision for a hypothetical transaction")
    p.add_argument("--config", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--helo", required=True)
    p.add_argument("--from", dest="sender", default="")
    p.add_argument("--rcpt", action="append")
    p.add_argument("--auth", default=None, help="the SMTP AUTH user, if the session authenticated")
    p.add_argument("--tls", action="store_true")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("hash-password", help="print an argon2id hash for a user's passwords list")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=_cmd_hash_password)

    p = sub.add_parser("queue", help="inspect and manage the queue")
    qsub = p.add_subparsers(dest="queue_command", required=True)
    q = qsub.add_parser("list")
    q.add_argument("--config", required=True)
    q.set_defaults(func=_cmd_queue_list)
    q = qsub.add_parser("flush", help="attempt every deferred message now (running relay)")
    q.add_argument("--config", required=True)
    q.set_defaults(func=_cmd_queue_control)
    for name, text in (("hold", "put a message on hold"), ("release", "release a held message"),
                       ("delete", "remove a message without a bounce")):
        q = qsub.add_parser(name, help=f"{text} (running relay)")
        q.add_argument("queue_id", metavar="QUEUEID")
        q.add_argument("--config", required=True)
        q.set_defaults(func=_cmd_queue_control)

    from .archive import add_commands as add_archive_commands

    add_archive_commands(sub)  # fastrelay archive search | export | verify (docs/archive.md)

    from .abuse import add_commands as add_abuse_commands

    add_abuse_commands(sub)  # fastrelay quarantine ... | user unsuspend ... (docs/abuse.md)

    p = sub.add_parser("status", help="a live summary of the running relay (over its control socket)")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="the raw answer as JSON")
    p.set_defaults(func=_cmd_status)

    from .loadgen import add_commands as add_bench_commands

    add_bench_commands(sub)  # fastrelay bench HOST:PORT (docs/benchmarks.md)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
