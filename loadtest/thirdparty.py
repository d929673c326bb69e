# Throw-away third-party servers for comparisons (loadtest.compare_postfix_dovecot, the benchmark
# scripts) and interop tests: a real Postfix SMTP sink or relay, Postfix delivering over LMTP or into
# a maildir, and a Dovecot POP3/IMAP server. Each is a context manager that starts the server on
# 127.0.0.1 on a free port, with all state under the given work directory, and stops it completely
# (no leftover processes) on exit. Needs the Debian packages of bench/debian-packages.txt
# (sh bench/install-debian-packages.sh, as root). Must never touch the system's own Postfix or
# Dovecot configuration, queues or services, and never listen beyond loopback.
# haproxy_config: the one HAProxy configuration of the benchmarks and the tests' cluster (nodes on
# loopback behind HAProxy, as the Ansible role mailhub_balancer configures it).
import contextlib
import grp
import os
import pwd
import signal
import socket
import subprocess
import time

from loadtest.ports import free_port

LOOPBACK = "127.0.0.1"


def wait_banner(port, prefix=b"220", timeout=30.0, proc=None, quit=b"QUIT\r\n"):
    """Wait until 127.0.0.1:port accepts and greets with a line starting with prefix."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited with %s before answering" % proc.returncode)
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                line = s.makefile("rb").readline()
                if line.startswith(prefix):
                    s.sendall(quit)
                    return line
                last = line
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError("no %r banner on port %d: %r" % (prefix, port, last))


def make_traversable(path):
    """Let unprivileged daemon users (postfix, mail) reach path: o+x on it and its parents."""
    path = os.path.abspath(path)
    while True:
        st = os.stat(path)
        if not st.st_mode & 0o001:
            os.chmod(path, (st.st_mode & 0o7777) | 0o011)
        if path == "/":
            break
        path = os.path.dirname(path)


def _children_of(pid):
    """Pids of all live processes whose parent is pid (one level)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _kill_pgroup(pgid):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------- Postfix

POSTFIX_MAIN_CF = """\
# throw-away Postfix SMTP sink written by loadtest/thirdparty.py
compatibility_level = 3.6
config_directory = {conf}
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {log}
maillog_file_prefixes = {base}
myhostname = postfix-sink.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mynetworks_style = host
smtpd_client_restrictions =
smtpd_helo_restrictions =
smtpd_sender_restrictions =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
disable_dns_lookups = yes
smtp_dns_support_level = disabled
default_transport = discard
local_transport = discard
relay_transport = discard
virtual_transport = discard
message_size_limit = 3221225472
mailbox_size_limit = 0
queue_minfree = 0
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
biff = no
append_dot_mydomain = no
smtputf8_enable = no
alias_maps =
alias_database =
"""

# chroot column is "n" everywhere: the queue lives outside /var/spool/postfix.
POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{port}  inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@contextlib.contextmanager
def postfix_sink(workdir):
    """Real Postfix on 127.0.0.1:<port> that queues (with fsync) and discards
    every mail from 127.0.0.1 for any recipient, up to 3 GB. Yields the port."""
    with postfix_instance(workdir, lambda main_cf: main_cf, "") as port:
        yield port


# Postfix as a real MTA in front of Dovecot: virtual domains delivered over LMTP.
POSTFIX_LMTP_OVERRIDES = """\
# --- postfix_to_lmtp: deliver the virtual domains to Dovecot LMTP on loopback
virtual_mailbox_domains = {domains}
virtual_transport = lmtp:inet:127.0.0.1:{lmtp_port}
smtpd_reject_unlisted_recipient = no
lmtp_destination_concurrency_limit = 20
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
"""
POSTFIX_SASL_OVERRIDES = """\
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {sasl_path}
smtpd_sasl_security_options = noanonymous
broken_sasl_auth_clients = no
"""
POSTFIX_LMTP_MASTER = "lmtp      unix  -       -       n       -       -       lmtp\n"


@contextlib.contextmanager
def postfix_to_lmtp(workdir, lmtp_port, domains, sasl_path=None):
    """Real Postfix on 127.0.0.1:<port> that accepts mail for `domains` (from
    127.0.0.1, or SASL-authenticated through Dovecot's auth socket `sasl_path`)
    and delivers it to Dovecot LMTP on 127.0.0.1:lmtp_port. Yields the port."""

    def main_cf(text):
        lines = [
            ln
            for ln in text.splitlines()
            if not ln.startswith(("virtual_transport", "smtpd_relay_restrictions", "smtpd_recipient_restrictions"))
        ]
        extra = POSTFIX_LMTP_OVERRIDES.format(domains=", ".join(domains), lmtp_port=lmtp_port)
        if sasl_path:
            extra += POSTFIX_SASL_OVERRIDES.format(sasl_path=sasl_path)
        return "\n".join(lines) + "\n" + extra

    with postfix_instance(workdir, main_cf, POSTFIX_LMTP_MASTER) as port:
        yield port


@contextlib.contextmanager
def postfix_instance(workdir, edit_main_cf, master_extra):
    base = os.path.join(os.path.abspath(workdir), "postfix")
    conf, queue, data = (os.path.join(base, d) for d in ("conf", "queue", "data"))
    for d in (conf, queue, data):
        os.makedirs(d, exist_ok=True)
    os.chmod(base, 0o755)
    os.chmod(queue, 0o755)  # owned by root; postfix creates its subdirs
    pw = pwd.getpwnam("postfix")
    os.chown(data, pw.pw_uid, pw.pw_gid)
    os.chmod(data, 0o700)
    make_traversable(base)
    port = free_port()
    with open(os.path.join(conf, "main.cf"), "w") as f:
        f.write(
            edit_main_cf(
                POSTFIX_MAIN_CF.format(
                    conf=conf, queue=queue, data=data, log=os.path.join(base, "postfix.log"), base=base
                )
            )
        )
    with open(os.path.join(conf, "master.cf"), "w") as f:
        f.write(POSTFIX_MASTER_CF.format(port="%s:%d" % (LOOPBACK, port)) + master_extra)
    env = dict(os.environ, MAIL_CONFIG=conf)
    pidfile = os.path.join(queue, "pid", "master.pid")
    subprocess.run(
        ["postfix", "-c", conf, "start"], check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    master = None
    try:
        deadline = time.monotonic() + 30
        while master is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                with open(pidfile) as f:
                    master = int(f.read().strip())
            if master is None:
                time.sleep(0.05)
        wait_banner(port)
        yield port
    finally:
        children = _children_of(master) if master else []
        subprocess.run(["postfix", "-c", conf, "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pids = ([master] if master else []) + children
        if not _wait_gone(pids, 15):
            subprocess.run(
                ["postfix", "-c", conf, "abort"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if master:
                _kill_pgroup(master)  # master is a session/group leader
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            _wait_gone(pids, 5)


# --------------------------------------------------------------------- Dovecot

MAIL_USER = "mail"  # system user owning the maildirs and running mail processes

DOVECOT_CONF = """\
# throw-away Dovecot written by loadtest/thirdparty.py
protocols = {protocols}
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
instance_name = thirdparty-dovecot-{port_tag}
log_path = {base}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:{mail}/%u
mail_fsync = optimized
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


DOVECOT_LMTP_CONF = """\
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp}
  }}
}}
protocol lmtp {{
  auth_username_format = %Ln
}}
"""

DOVECOT_AUTH_SOCKET_CONF = """\
service auth {
  unix_listener auth-postfix {
    mode = 0666
  }
}
"""


def _mail_ids():
    pw = pwd.getpwnam(MAIL_USER)
    return pw.pw_uid, pw.pw_gid


def dovecot_maildir_path(workdir, user):
    """The maildir that dovecot_server(workdir, ...) serves for user."""
    return os.path.join(os.path.abspath(workdir), "dovecot", "mail", user)


def _ensure_maildir(workdir, user):
    uid, gid = _mail_ids()
    path = dovecot_maildir_path(workdir, user)
    for d in (os.path.dirname(path), path, *(os.path.join(path, s) for s in ("cur", "new", "tmp"))):
        os.makedirs(d, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700 if d != os.path.dirname(path) else 0o755)
    return path


_deliver_seq = [0]


def deliver_to_maildir(workdir, user, message):
    """Put one message (bytes, or a path copied in streamed chunks) into the
    user's maildir new/ (via tmp/, owned by the mail user, mode 0600).
    The S=size,W=virtual-size filename fields spare Dovecot a size scan.
    Returns the new file's path."""
    uid, gid = _mail_ids()
    md = _ensure_maildir(workdir, user)
    _deliver_seq[0] += 1
    now = time.time()
    name = "%d.M%dP%dQ%d.thirdparty" % (int(now), int(now % 1 * 1e6), os.getpid(), _deliver_seq[0])
    tmp = os.path.join(md, "tmp", name)
    size = lf = crlf = 0
    prev_cr = False
    with open(tmp, "wb") as out:
        if isinstance(message, (bytes, bytearray, memoryview)):
            chunks = [bytes(message)]
            src = None
        else:
            src = open(message, "rb")
            chunks = iter(lambda: src.read(4 << 20), b"")
        try:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
                lf += chunk.count(b"\n")
                crlf += chunk.count(b"\r\n") + (1 if prev_cr and chunk[:1] == b"\n" else 0)
                prev_cr = chunk[-1:] == b"\r"
        finally:
            if src is not None:
                src.close()
        os.fchown(out.fileno(), uid, gid)
        os.fchmod(out.fileno(), 0o600)
    vsize = size + (lf - crlf)  # every bare LF becomes CRLF on the wire
    final = os.path.join(md, "new", "%s,S=%d,W=%d" % (name, size, vsize))
    os.rename(tmp, final)
    return final


@contextlib.contextmanager
def dovecot_server(workdir, users, protocols=("pop3", "imap"), lmtp=False, auth_socket=False):
    """Dovecot (foreground, own config) on 127.0.0.1 with plaintext-password
    users {name: password} and maildirs under workdir/dovecot/mail/<user>.
    Yields {"pop3": port, "imap": port} for the requested protocols; with
    lmtp=True also {"lmtp": port} (LMTP on 127.0.0.1, recipient user@domain
    delivered to user's maildir), with auth_socket=True also {"auth_socket":
    path} (a SASL socket for Postfix's smtpd_sasl_type = dovecot)."""
    base = os.path.join(os.path.abspath(workdir), "dovecot")
    for d in (base, os.path.join(base, "run"), os.path.join(base, "state")):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
    make_traversable(base)
    uid, gid = _mail_ids()
    mail = os.path.join(base, "mail")
    os.makedirs(mail, exist_ok=True)
    os.chown(mail, uid, gid)
    os.chmod(mail, 0o755)
    for u in users:
        _ensure_maildir(workdir, u)
    passwd = os.path.join(base, "passwd")
    with open(passwd, "w") as f:
        for u, pw in users.items():
            f.write("%s:{PLAIN}%s:::::\n" % (u, pw))
    os.chmod(passwd, 0o640)
    os.chown(passwd, 0, grp.getgrnam("dovecot").gr_gid)
    ports = {p: free_port() for p in protocols}
    extra = ""
    if lmtp:
        ports["lmtp"] = free_port()
        extra += DOVECOT_LMTP_CONF.format(lmtp=ports["lmtp"])
    sasl_path = os.path.join(base, "run", "auth-postfix")
    if auth_socket:
        extra += DOVECOT_AUTH_SOCKET_CONF
    conf = os.path.join(base, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(
            DOVECOT_CONF.format(
                protocols=" ".join(tuple(protocols) + (("lmtp",) if lmtp else ())),
                base=base,
                mail=mail,
                uid=uid,
                gid=gid,
                port_tag="%d" % min(ports.values()),
                pop3=ports.get("pop3", 0),
                imap=ports.get("imap", 0),
            )
            + extra
        )
    out = open(os.path.join(base, "dovecot.stdout"), "wb")
    proc = subprocess.Popen(
        ["dovecot", "-F", "-c", conf],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for p, port in ports.items():
            if p == "pop3":
                wait_banner(port, b"+OK", proc=proc)
            elif p == "lmtp":
                wait_banner(port, b"220", proc=proc)
            else:
                wait_banner(port, b"* OK", proc=proc, quit=b"a LOGOUT\r\n")
        if auth_socket:
            deadline = time.monotonic() + 10
            while not os.path.exists(sasl_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield dict(ports, auth_socket=sasl_path)
        else:
            yield dict(ports)
    finally:
        children = _children_of(proc.pid)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not _wait_gone(children, 10):
            _kill_pgroup(proc.pid)  # its own session: catches any stragglers
            _wait_gone(children, 5)
        out.close()


# --------------------------------------------------------------------- Postfix delivering to a maildir

POSTFIX_MAILDIR_OVERRIDES = """\
# --- postfix_to_maildir: every recipient of the virtual domains into one maildir
virtual_mailbox_domains = {domains}
virtual_transport = virtual
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
virtual_mailbox_limit = 0
# a delivery deferred on a busy machine is tried again within seconds, not after Postfix's 300 s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
"""
POSTFIX_VIRTUAL_MASTER = "virtual   unix  -       n       n       -       -       virtual\n"


@contextlib.contextmanager
def postfix_to_maildir(workdir, domains):
    """Real Postfix on 127.0.0.1:<port> that accepts mail from 127.0.0.1 for `domains` and
    delivers every recipient into the maildir <workdir>/postfix/mail/box (new/ holds the
    files; Postfix stores them with LF line ends). Yields (port, maildir path)."""
    uid, gid = _mail_ids()
    mail = os.path.join(os.path.abspath(workdir), "postfix", "mail")
    os.makedirs(mail, exist_ok=True)
    os.chown(mail, uid, gid)

    def main_cf(text):
        lines = [ln for ln in text.splitlines() if not ln.startswith("virtual_transport")]
        return (
            "\n".join(lines)
            + "\n"
            + POSTFIX_MAILDIR_OVERRIDES.format(domains=", ".join(domains), mail=mail, uid=uid, gid=gid)
        )

    with postfix_instance(workdir, main_cf, POSTFIX_VIRTUAL_MASTER) as port:
        yield port, os.path.join(mail, "box")


# --------------------------------------------------------------------- HAProxy


def haproxy_config(
    front,
    nodes,
    check_interval_ms=1000,
    source=None,
    stats_socket=None,
    maxconn=1000,
    timeout_connect="5s",
    timeout_idle="1860s",
):
    """HAProxy's configuration for hub nodes behind it, as the Ansible role mailhub_balancer
    writes it (ansible/roles/mailhub_balancer/templates/haproxy.cfg.j2): TCP, one `listen` per
    protocol of `front` (protocol -> its port on 127.0.0.1) balancing over every node of `nodes`
    (node name -> {protocol: port, "metrics": port}, each on 127.0.0.1) with the PROXY protocol v2,
    each node checked on GET /healthz of its metrics port every `check_interval_ms` (None: no
    checks, for one node only), a node that refuses a connection tried again on another.
    `source`: the address HAProxy connects to the nodes from; `stats_socket`: a path for an admin
    socket ("show stat", "disable server smtp/node1")."""
    lines = ["global", f"    maxconn {maxconn}"]
    if stats_socket is not None:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "defaults",
        "    mode tcp",
        f"    timeout connect {timeout_connect}",
        f"    timeout client {timeout_idle}",
        f"    timeout server {timeout_idle}",
        "    retries 2",
        "    option redispatch",
    ]
    default_server = "send-proxy-v2" + (f" source {source}" if source else "")
    if check_interval_ms is not None:
        default_server += f" inter {check_interval_ms}ms fall 2 rise 1"
    for protocol, port in front.items():
        lines += [f"listen {protocol}", f"    bind {LOOPBACK}:{port}", "    balance leastconn"]
        if check_interval_ms is not None:
            lines += ["    option httpchk GET /healthz", "    http-check expect status 200"]
        lines.append(f"    default-server {default_server}")
        for name, ports in nodes.items():
            check = f" check port {ports['metrics']}" if check_interval_ms is not None else ""
            lines.append(f"    server {name} {LOOPBACK}:{ports[protocol]}{check}")
    return "\n".join(lines) + "\n"
