# One serving hub per data folder (storage/folder_lock.py): a second `mailhub serve` on the folder
# is refused with a one-line error before its start-up recovery could remove the spool files of
# the hub already serving it; the lock goes with the process, even on kill -9.
import subprocess
import sys

from conftest import ALPHA_BETA, REPO, RawSMTP, make_message, queue_id_from, wait_for


def serve_again(hub) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli", "serve"],
        env=hub.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_hub_on_the_data_folder_is_refused_and_the_first_keeps_its_mail(make_hub):
    hub = make_hub(ALPHA_BETA, process=True).start()
    message = make_message(3_000_000)  # big enough to be spooled to a file while it streams
    client = RawSMTP(hub.smtp_port)
    client.ehlo()
    assert client.auth_plain("alpha").startswith(b"235")
    assert client.command("MAIL FROM:<alpha@hub.test>").startswith(b"250")
    assert client.command("RCPT TO:<beta@hub.test>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    client.send(message[:2_500_000])
    wait_for(
        lambda: any((hub.data_dir / "spool").iterdir()), interval=0.05, message="a spool file for the mail in flight"
    )

    second = serve_again(hub)
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"mailhub: cannot start: data folder {hub.data_dir} is in use by another `mailhub serve` (pid {hub.proc.pid})"
    )

    client.send(message[2_500_000:] + b"\r\n.\r\n")
    queue_id = queue_id_from(client.reply())
    client.close()
    assert hub.stored(queue_id).endswith(message + b"\r\n")
    hub.kill()
    hub.start()  # the kernel dropped the lock with the killed process
    assert hub.stored(queue_id).endswith(message + b"\r\n")
