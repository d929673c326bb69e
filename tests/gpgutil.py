# Real GnuPG in a throw-away home folder for the directory and encryption tests: make keys, export
# them, encrypt, verify detached signatures. The folder is short-lived and its gpg-agent is stopped
# on close (a short path under /tmp, since the agent's socket path must stay under 108 bytes).
import shutil
import subprocess
import tempfile
from pathlib import Path


class Gpg:
    def __init__(self):
        self.home = Path(tempfile.mkdtemp(prefix="mh-gpg-"))
        self.home.chmod(0o700)

    def run(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [
                "gpg",
                "--homedir",
                str(self.home),
                "--batch",
                "--yes",
                "--quiet",
                "--no-tty",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--trust-model",
                "always",
                *args,
            ],
            input=input,
            capture_output=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gpg {args} failed: {result.stderr.decode(errors='replace')}")
        return result

    def new_key(self, user_id: str) -> str:
        """An ed25519 primary key with a cv25519 encryption subkey; returns the fingerprint."""
        self.run("--quick-gen-key", user_id, "future-default", "default", "never")
        return self.fingerprints(user_id)[0]

    def fingerprints(self, user_id: str) -> list[str]:
        """Primary fingerprint first, then the subkeys'."""
        out = self.run("--with-colons", "--list-keys", user_id).stdout.decode()
        return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]

    def encryption_key_id(self, user_id: str) -> str:
        return self.fingerprints(user_id)[1][-16:]

    def export(self, user_id: str, path: Path, armor: bool = True) -> Path:
        path.write_bytes(self.run(*(["--armor"] if armor else []), "--export", user_id).stdout)
        return path

    def encrypt(self, data: bytes, *recipients: str, armor: bool = True, extra: tuple[str, ...] = ()) -> bytes:
        args = ["--encrypt", *extra]
        for recipient in recipients:
            args += ["--recipient", recipient]
        if armor:
            args.append("--armor")
        return self.run(*args, "--output", "-", input=data).stdout

    def import_key(self, armored: bytes) -> None:
        self.run("--import", input=armored)

    def verify(self, signature: bytes, signed: bytes) -> str:
        """gpg --verify of a detached signature; returns the status lines (AssertionError if bad)."""
        sig = self.home / "check.sig"
        data = self.home / "check.dat"
        sig.write_bytes(signature)
        data.write_bytes(signed)
        result = self.run("--status-fd", "1", "--verify", str(sig), str(data), check=False)
        status = result.stdout.decode()
        assert result.returncode == 0 and "[GNUPG:] GOODSIG" in status, status + result.stderr.decode(errors="replace")
        return status

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], capture_output=True, timeout=30)
        shutil.rmtree(self.home, ignore_errors=True)


def pgp_mime(sender: str, to: str, encrypted: bytes, subject: str = "study", extra_headers: str = "") -> bytes:
    """An RFC 3156 multipart/encrypted mail around an armored OpenPGP message."""
    boundary = "enc-boundary-42"
    return (
        (
            f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n{extra_headers}"
            f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
            f' boundary="{boundary}"\r\n\r\n'
            f"This is an OpenPGP/MIME encrypted message (RFC 3156).\r\n"
            f"--{boundary}\r\nContent-Type: application/pgp-encrypted\r\n"
            f"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
            f'--{boundary}\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
            f"Content-Description: OpenPGP encrypted message\r\n"
            f'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n'
        ).encode()
        + (encrypted.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        + f"\r\n--{boundary}--\r\n".encode()
    )
