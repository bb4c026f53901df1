"""Coverage-guided fuzzing of the SMTP session with atheris (opt-in, not part of the test run).

The same in-process harness and RFC 5321 reference model as tests/test_fuzz.py;
atheris chooses the input.  Its bytes are read as: a mode byte (reject,
normalize, or the implicit-TLS listener where AUTH is offered; and whether
the stream starts with a transaction or with EHLO alone), a count of read boundaries and the boundaries, settle flags, then
one byte per piece of the stream, each naming a command line, a junk piece or
a content line with its line ending.  Pieces, not raw bytes, so that every
input stays inside what the model can answer (a known verb always comes with
the exact arguments the model knows); the read boundaries and the order of
pieces are free.

Run (bounded):  .venv/bin/python tests/reliability/atheris_session.py -runs=20000
A mismatch with the model raises AssertionError; atheris saves the input as crash-*.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import atheris

with atheris.instrument_imports(include=["fastrelay"]):
    import fastrelay.server  # noqa: F401  (imported to be instrumented)

import test_fuzz

PIECES = ([line + b"\r\n" for line in test_fuzz.COMMAND_LINES] + test_fuzz.JUNK_PIECES
          + [response + b"\r\n" for response in test_fuzz.AUTH_RESPONSES]
          + [line + end for line in test_fuzz.CONTENT_LINES for end in (b"\r\n", b"\n", b"\r")]
          + test_fuzz.SMUGGLING + [b"\r\n.\r\n", b".\r\n"])
_DIRECTORY = Path(tempfile.mkdtemp(prefix="fastrelay-atheris-"))
HARNESSES = [test_fuzz.Harness("reject", _DIRECTORY), test_fuzz.Harness("normalize", _DIRECTORY),
             test_fuzz.Harness("reject", _DIRECTORY, tls=True)]


def one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    harness = HARNESSES[data[0] % 3]
    start = test_fuzz.TRANSACTION if data[0] & 4 else [test_fuzz.EHLO + b"\r\n"]
    ncuts = data[1] % 8
    settle = [bool(data[2] >> i & 1) for i in range(8)]
    head = 3 + 2 * ncuts
    if len(data) < head:
        return
    stream = b"".join(start) + b"".join(PIECES[b % len(PIECES)] for b in data[head:])
    cuts = [int.from_bytes(data[3 + 2 * i:5 + 2 * i], "big") % (len(stream) + 1) for i in range(ncuts)]
    test_fuzz.check(harness, stream, cuts, settle)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
