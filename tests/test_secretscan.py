"""
The scan that finds provider secrets in files LMGate wrote (run by C{.ci/run}
after the suite over C{_trial_temp}), and the rule that exempts the credential
sources the tests write on purpose.
"""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from tests.secretscan import PROVIDER_SECRET_MARK, filesHolding, isCredentialSource, main, providerSecret


class SecretScanTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Removed afterwards even when a test fails: the planted secrets must not trip the suite-wide scan.
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.directory, "var"))
        os.makedirs(os.path.join(self.directory, "secrets"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def write(self, relative: str, content: str) -> str:
        path = os.path.join(self.directory, relative)
        with open(path, "w") as f:
            f.write(content)
        return path

    def test_providerSecretCarriesTheMark(self) -> None:
        """Every fake provider secret carries the mark and is one run of visible ASCII (a valid key)."""
        secret = providerSecret("openai-1")
        self.assertIn(PROVIDER_SECRET_MARK, secret)
        self.assertTrue(secret.isascii() and secret.isprintable() and " " not in secret)

    def test_credentialSourceRule(self) -> None:
        """Under a directory named C{secrets}, or a name ending in C{.secret}; nothing else."""
        self.assertTrue(isCredentialSource("/t/case/secrets/openai"))
        self.assertTrue(isCredentialSource("/t/case/sa.json.secret"))
        self.assertFalse(isCredentialSource("/t/case/var/stats.jsonl"))
        self.assertFalse(isCredentialSource("/t/case/secrets"))  # a file named so is not exempt
        self.assertFalse(isCredentialSource("/t/case/var/secrets.log"))

    def test_findsTheMarkAKeyOrAPrivateKeyButNotInCredentialSources(self) -> None:
        """A record, a log or an access log holding the mark, a given secret or a PEM private key is named;
        the credential sources (secrets/, *.secret) and clean files are not."""
        self.write("secrets/openai", providerSecret("a") + "\n")
        self.write("sa.json.secret", '{"private_key": "-----BEGIN PRIVATE KEY-----"}')
        self.write("var/access.log", "clean\n")
        self.assertEqual(filesHolding(self.directory), [])
        stats = self.write("var/stats.jsonl", '{"key": "' + providerSecret("b") + '"}\n')
        log = self.write("var/twistd.log", "-----BEGIN PRIVATE KEY-----\n")
        other = self.write("var/other.log", "unmarked-secret-123\n")
        self.assertEqual(filesHolding(self.directory), sorted([stats, log]))
        self.assertEqual(filesHolding(self.directory, ["unmarked-secret-123"]), sorted([stats, log, other]))

    def test_exitStatusNamesFilesNeverSecrets(self) -> None:
        """C{python -m tests.secretscan DIR}: 0 when clean; 1 naming each file, the secret never printed."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(main([self.directory]), 0)
        secret = providerSecret("leaked-999")
        stats = self.write("var/stats.jsonl", secret + "\n")
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(main([self.directory]), 1)
            self.assertEqual(main([os.path.join(self.directory, "absent")]), 2)
        self.assertIn(stats, out.getvalue())
        self.assertNotIn(secret, out.getvalue() + err.getvalue())
