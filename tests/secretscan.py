"""
Fake provider secrets for the tests, and the scan that finds them in files.

Every fake provider key, AWS secret key and access token the tests give
LMGate is made by L{providerSecret}, so it carries L{PROVIDER_SECRET_MARK}:
after the suite, C{.ci/run} runs C{python -m tests.secretscan _trial_temp},
which fails when any file there holds the mark (or a private key), since
LMGate must never write a provider secret to a record, a log, an access log
or a spool. L{filesHolding} is the same scan for one test's directory.

Files the tests themselves write as credential sources (a C{credentials.file}
secret, a service account JSON file, a TLS private key) are not LMGate's: the
tests put them under a directory named C{secrets} or in a file whose name ends
in C{.secret} (L{isCredentialSource}), and the scan skips exactly those.

Only the standard library is used here: the scan runs without Twisted.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

#: Carried by every fake provider secret the tests use (L{providerSecret}).
PROVIDER_SECRET_MARK = "lmgtest-provider-secret"

#: Looked for besides the mark: a PEM private key (a service account's, which cannot carry the mark).
PRIVATE_KEY_PEM = b"PRIVATE KEY-----"

#: The directory name and the file-name suffix of the credential sources the tests write.
SECRETS_DIRECTORY = "secrets"
SECRET_SUFFIX = ".secret"


def providerSecret(name: str) -> str:
    """
    A fake provider secret (an API key, an AWS secret access key, an access
    token): C{lmgtest-provider-secret-NAME}, one run of visible ASCII.
    """
    return f"{PROVIDER_SECRET_MARK}-{name}"


def isCredentialSource(path: str) -> bool:
    """
    Whether C{path} is a credential source a test wrote on purpose: it lies
    under a directory named C{secrets}, or its name ends in C{.secret}.
    """
    parts = os.path.normpath(path).split(os.sep)
    return SECRETS_DIRECTORY in parts[:-1] or parts[-1].endswith(SECRET_SUFFIX)


def filesHolding(directory: str, secrets: Iterable[str | bytes] = ()) -> list[str]:
    """
    Every file under C{directory} (but the credential sources,
    L{isCredentialSource}) holding the mark, a PEM private key, or one of
    C{secrets}; their paths, sorted. Symbolic links are not followed.
    """
    needles = [PROVIDER_SECRET_MARK.encode(), PRIVATE_KEY_PEM]
    needles += [s.encode() if isinstance(s, str) else s for s in secrets]
    holding = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if isCredentialSource(path) or os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    content = f.read()
            except OSError:
                continue  # gone meanwhile, or unreadable: not written by this run
            if any(needle in content for needle in needles):
                holding.append(path)
    return sorted(holding)


def main(argv: list[str]) -> int:
    """C{python -m tests.secretscan DIR...}: exit 1, naming the files (never the secret), if any holds one."""
    if not argv:
        print("usage: python -m tests.secretscan DIRECTORY...", file=sys.stderr)
        return 2
    found: list[str] = []
    for directory in argv:
        if not os.path.isdir(directory):
            print(f"secretscan: {directory}: not a directory", file=sys.stderr)
            return 2
        found += filesHolding(directory)
    for path in found:
        print(f"secretscan: a provider secret (test mark {PROVIDER_SECRET_MARK!r} or a private key) is in {path}")
    if found:
        print(f"secretscan: {len(found)} file(s) LMGate wrote hold a provider secret", file=sys.stderr)
        return 1
    print(f"secretscan: no provider secret in the files under {', '.join(argv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
