"""`diffmesh callers ...`: the orchestrator's callers file (docs/admission.md).

    diffmesh callers new-key            a random API key (stdout) and, on stderr, its hash line
    diffmesh callers hash-key < key     the api_key_sha256 of a key read from stdin
    diffmesh callers check FILE         validate a callers file; one JSON line per caller

Keys are read from stdin, never from arguments (which the process list and shell history show),
and nothing here prints a key except new-key, once, on stdout.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys


def _hash_key(args: argparse.Namespace) -> int:
    from services.orchestrator.callers import hash_key

    text = sys.stdin.read()
    key = text[:-1] if text.endswith("\n") else text
    key = key[:-1] if key.endswith("\r") else key
    if not key.strip() or "\n" in key:
        print("diffmesh callers hash-key: give the key on stdin, one line (e.g. printf %s \"$KEY\" | diffmesh "
              "callers hash-key)", file=sys.stderr)
        return 2
    if key != key.strip():
        print("diffmesh callers hash-key: the key has leading or trailing spaces; clients send it stripped, so "
              "the hash is of the stripped key", file=sys.stderr)
        key = key.strip()
    print(hash_key(key))
    return 0


def _new_key(args: argparse.Namespace) -> int:
    from services.orchestrator.callers import hash_key

    key = secrets.token_urlsafe(args.bytes)
    print(key)
    print(f'api_key_sha256: "{hash_key(key)}"', file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    from services.orchestrator.callers import CallersFileError, load_callers_file

    try:
        config = load_callers_file(args.file, require_client_certificates=not args.no_mtls)
    except CallersFileError as exc:
        print(f"diffmesh callers check: {exc}", file=sys.stderr)
        return 2
    for caller in config.callers:
        print(json.dumps(caller.summary()))
    if config.anonymous is not None:
        print(json.dumps({**config.anonymous.summary(), "credentials": "none (anonymous)"}))
    else:
        print(json.dumps({"name": "anonymous", "admitted": False,
                          "note": "callers without credentials get UNAUTHENTICATED"}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds `callers` (hash-key, new-key, check) to the CLI, each with its handler (args.handler)."""
    callers = sub.add_parser("callers", help="API keys and the orchestrator's callers file (admission)")
    callers_sub = callers.add_subparsers(dest="callers_command", required=True)
    hashing = callers_sub.add_parser("hash-key", help="print the api_key_sha256 of a key read from stdin")
    hashing.set_defaults(handler=_hash_key)
    new = callers_sub.add_parser("new-key", help="print a new random API key (stdout) and its hash (stderr)")
    new.add_argument("--bytes", type=int, default=32, help="random bytes in the key (default 32)")
    new.set_defaults(handler=_new_key)
    check = callers_sub.add_parser("check", help="validate a callers file; one JSON line per caller (no hashes)")
    check.add_argument("file")
    check.add_argument("--no-mtls", action="store_true",
                       help="the orchestrator asks for no client certificates (no tls_ca_file): a caller identified "
                            "only by certificate is an error")
    check.set_defaults(handler=_check)
