"""Who may talk to whom: a job's CURVE key pairs (one per role and rank), the directory they
live in, and the ZAP handler that lets only the job's keys connect and tells the receiving
side which member sent each message."""
import functools
import os
import re
import sys
import threading
import uuid
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from disttrain import config

# disttrain.config reads them (Config.keys, Config.insecure); the names are for messages.
KEYS_VARIABLE = config.variable("keys")
INSECURE_VARIABLE = config.variable("insecure")

PUBLIC_SUFFIX = ".key"            # zmq.auth certificate files: zmq.auth.load_certificate reads them
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"(scheduler)|(server|worker)-(\d+)")

# The default of every `credentials=` argument: this process's config.from_env(), that is
# DISTTRAIN_KEYS (or DISTTRAIN_INSECURE).
FROM_ENV = "from-env"

HOW_TO_GET_KEYS = (f"the launcher makes them; another launcher runs `python -m launch keys DIR "
                   f"-n WORKERS -s SERVERS` and sets {KEYS_VARIABLE}=DIR for every process "
                   f"(see launch/README.md); {INSECURE_VARIABLE}=1 (launch --insecure) runs "
                   f"without authentication or encryption")


class KeysError(RuntimeError):
    """This process cannot get the job's keys (or CURVE): the text says how to fix it."""


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


def require_curve():
    """Fail loudly where libzmq cannot encrypt: a job never silently runs in the clear."""
    if not zmq.has("curve"):
        raise KeysError(
            f"disttrain: this pyzmq's libzmq {zmq.zmq_version()} was built without CURVE "
            f"(zmq.has('curve') is False), so the job's sockets cannot be authenticated or "
            f"encrypted. Install a pyzmq wheel (they bundle libsodium): `pip install "
            f"--force-reinstall pyzmq`, or run with {INSECURE_VARIABLE}=1 (launch --insecure) "
            f"on a network you trust")


# --- names and key files ----------------------------------------------------------------
def key_name(role, rank=None):
    """"scheduler", "server-0", "worker-3": the file name of a key and the ZAP User-Id."""
    return "scheduler" if role == "scheduler" else f"{role}-{rank}"


@functools.lru_cache(maxsize=1024)   # every received message's sender goes through here
def parse_key_name(name):
    """(role, rank) of a key name; rank is None for the scheduler."""
    match = _NAME.fullmatch(name or "")
    if match is None:
        raise ValueError(f"{name!r} is not a key name (scheduler, server-N or worker-N)")
    return ("scheduler", None) if match[1] else (match[2], int(match[3]))


def job_key_names(num_workers, num_servers):
    return ([key_name("scheduler")] + [key_name("server", r) for r in range(num_servers)]
            + [key_name("worker", r) for r in range(num_workers)])


def new_key_pairs(num_workers, num_servers):
    """{key name: (public, secret)}, fresh z85 CURVE pairs for every member of one job."""
    require_curve()
    return {name: zmq.curve_keypair() for name in job_key_names(num_workers, num_servers)}


def key_files(pairs, secrets_for=None):
    """{file name: text} of a key directory holding every public key and the secret keys of
    `secrets_for` (default: all). A remote host gets only its own processes' secrets."""
    files = {}
    for name, (public, secret) in pairs.items():
        files[name + PUBLIC_SUFFIX] = _certificate(name, public)
        if secrets_for is None or name in secrets_for:
            files[name + SECRET_SUFFIX] = _certificate(name, public, secret)
    return files


def _certificate(name, public, secret=None):
    text = (f"# disttrain CURVE key of {name}: {'keep secret' if secret else 'public'}\n"
            f"curve\n    public-key = \"{public.decode()}\"\n")
    return text + (f"    secret-key = \"{secret.decode()}\"\n" if secret else "")


def write_key_directory(directory, files):
    """Create `directory` (mode 0700, must not exist or be empty) holding `files`, each 0600
    from the moment it exists (O_EXCL: never an existing file another user could hold open)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.listdir(directory):
        raise FileExistsError(f"key directory {directory} is not empty: keys are made fresh "
                              f"for each job, in a new directory")
    os.chmod(directory, 0o700)
    for file_name, text in files.items():
        if "/" in file_name or file_name.startswith("."):
            raise ValueError(f"bad key file name {file_name!r}")
        fd = os.open(os.path.join(directory, file_name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return directory


def make_key_directory(directory, num_workers, num_servers):
    """The layout of `python -m launch keys DIR -n W -s S`: every key pair of a job."""
    return write_key_directory(directory, key_files(new_key_pairs(num_workers, num_servers)))


def remove_key_directory(directory):
    """Delete a key directory made by write_key_directory (its files, then itself)."""
    if not directory or not os.path.isdir(directory):
        return
    for file_name in os.listdir(directory):
        if file_name.endswith((PUBLIC_SUFFIX, SECRET_SUFFIX)):
            os.unlink(os.path.join(directory, file_name))
    os.rmdir(directory)


# --- one process's keys --------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """What one member of a job holds: its own key pair and every member's public key."""
    name: str                 # "worker-3"
    public: bytes
    secret: bytes
    members: dict             # key name -> public key (z85 bytes), the whole job

    @property
    def role(self):
        return parse_key_name(self.name)[0]

    @property
    def rank(self):
        return parse_key_name(self.name)[1]

    def public_keys(self, roles):
        return {public: name for name, public in self.members.items()
                if parse_key_name(name)[0] in roles}


def credentials_from_pairs(pairs, name):
    """One member's Credentials from new_key_pairs() (jobs inside one process, tests)."""
    public, secret = pairs[name]
    return Credentials(name, public, secret, {n: p for n, (p, _) in pairs.items()})


def load_credentials(directory, role, rank=None):
    """The Credentials of (role, rank) from a key directory. Without a rank, the directory
    must hold exactly one secret key of that role (what a remote host receives)."""
    require_curve()
    try:
        mode = os.stat(directory).st_mode
    except OSError as error:
        raise KeysError(f"disttrain: cannot read the key directory {directory}: {error}; "
                        f"{HOW_TO_GET_KEYS}") from None
    if mode & 0o077:
        raise KeysError(f"disttrain: key directory {directory} has mode {mode & 0o777:o}: "
                              f"others could read the job's secret keys; chmod 700 it")
    files = os.listdir(directory)
    if rank is None and role != "scheduler":
        mine = [f[:-len(SECRET_SUFFIX)] for f in files
                if f.endswith(SECRET_SUFFIX) and f.startswith(role + "-")]
        if len(mine) != 1:
            raise KeysError(f"disttrain: {directory} holds {len(mine)} {role} secret keys; "
                             f"set DISTTRAIN_RANK to say which is this process's")
        name = mine[0]
    else:
        name = key_name(role, rank)
    members = {}
    for file_name in files:
        if file_name.endswith(PUBLIC_SUFFIX):
            member = file_name[:-len(PUBLIC_SUFFIX)]
            parse_key_name(member)
            members[member] = zmq.auth.load_certificate(os.path.join(directory, file_name))[0]
    secret_file = os.path.join(directory, name + SECRET_SUFFIX)
    if not os.path.exists(secret_file):
        raise KeysError(f"disttrain: no secret key {secret_file} for {role} "
                                f"{'' if rank is None else rank}: {HOW_TO_GET_KEYS}")
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None or members.get(name) != public:
        raise KeysError(f"disttrain: {secret_file} is not the secret key of {name}'s public "
                         f"key in {directory}")
    return Credentials(name, public, secret, members)


_warned_insecure = False


def credentials_from_config(settings, role, rank=None):
    """This process's Credentials from a config.Config: from its key directory (keys), or
    None (with a warning in the log) when insecure. Neither set is an error: security is on
    by default."""
    global _warned_insecure
    if settings.insecure:
        if not _warned_insecure:
            _warned_insecure = True
            _say(f"WARNING: {INSECURE_VARIABLE}=1 (launch --insecure): this {role} runs without "
                 f"authentication or encryption; anyone who can reach the job's ports can "
                 f"read the model and change it")
        return None
    if not settings.keys:
        raise KeysError(f"disttrain: {KEYS_VARIABLE} is not set, and every socket of a job "
                        f"uses CURVE with the job's own keys: {HOW_TO_GET_KEYS}")
    return load_credentials(settings.keys, role, rank)


def credentials_from_env(role, rank=None):
    """credentials_from_config of this process's environment (config.from_env(), whose
    ConfigError names a bad DISTTRAIN_INSECURE)."""
    return credentials_from_config(config.from_env(), role, rank)


def resolve(credentials, role, rank=None):
    """A constructor's `credentials=` argument: FROM_ENV reads the environment (through
    disttrain.config), None means insecure, else a Credentials."""
    if credentials == FROM_ENV:
        return credentials_from_env(role, rank)
    return credentials


# --- sockets ---------------------------------------------------------------------------------
class ServerCurve:
    """Makes a bound socket a CURVE server that lets in only the job's keys of `accept` roles;
    `label` ("server 0") names it in the log lines about refused connections."""

    def __init__(self, credentials, accept, label):
        self.credentials, self.label = credentials, label
        self.allowed = credentials.public_keys(accept)
        self.domain = f"disttrain-{uuid.uuid4().hex[:12]}"
        self.ipc_domain = self.domain + "-ipc"
        self.accept = accept
        self.local_peers = {}     # pid -> member name, for this host's ipc peers
        self.handshake_logged = set()   # (peer host or None, dropped) already reported
        self.handshake_failures = 0     # every one, logged or not

    def learn_local_peers(self, book, here):
        """Map the pids of the job's members on this host (hostname, netns) to their names,
        from the scheduler's address book. A pid that runs two members (a test running a
        whole job in one process) names neither: those must connect over tcp."""
        names = {}
        for role in self.accept:
            for entry in book.get(role, ()):
                if entry and (entry.get("hostname"), entry.get("netns")) == tuple(here) and "pid" in entry:
                    names.setdefault(entry["pid"], []).append(key_name(role, entry["rank"]))
        self.local_peers = {pid: found[0] if len(found) == 1 else "several members of this job"
                            for pid, found in names.items()}

    def peer_of(self, frame):
        """The member that sent a received frame, from its connection's ZAP User-Id: over
        tcp the key's name; over ipc "pid:N", the kernel's word for the peer process (see
        _JobAuthenticator), looked up among this host's members."""
        user = frame.get("User-Id")
        if user.startswith(IPC_USER_PREFIX):
            pid = user[len(IPC_USER_PREFIX):]
            return self.local_peers.get(int(pid), f"process {pid}")
        return user

    def apply_local(self, socket):
        """For the ipc endpoint bound next: no CURVE, but a ZAP domain of its own, so each
        connection is named by its peer's pid."""
        socket.zap_domain = self.ipc_domain.encode()
        _gate.open(socket.context, self)

    def apply(self, socket):
        socket.curve_secretkey = self.credentials.secret
        socket.curve_publickey = self.credentials.public
        socket.curve_server = True
        socket.zap_domain = self.domain.encode()
        _gate.open(socket.context, self)

    def release(self):
        _gate.close(self)

    def handshake_failed(self, address, event, detail):
        """transport.HandshakeWatch's report of a tcp peer that libzmq dropped before ZAP (a
        peer with no CURVE at all): logged once per address, as the ZAP handler's refusals.
        Where the address is unknown (see HandshakeWatch) that is said, once per listener."""
        self.handshake_failures += 1
        dropped = event == "HANDSHAKE_FAILED_NO_DETAIL"   # the peer left, or an I/O error
        seen = (address, dropped)
        if seen in self.handshake_logged or len(self.handshake_logged) >= MAX_LOGGED_ADDRESSES:
            return
        self.handshake_logged.add(seen)
        who = address or ("an unknown address (libzmq closed the connection before its "
                          "address could be read; its monitor does not report it)")
        if dropped:
            _say(f"{self.label} dropped a connection from {who} before its CURVE handshake "
                 f"ended ({detail}; logged once per address)")
            return
        why = ("it does not speak CURVE" if detail == "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH"
               else "its handshake broke the ZMTP protocol")
        _say(f"{self.label} refused a connection from {who}: {why} (zmq: {detail}; logged "
             f"once per address)")


class ClientCurve:
    """Makes a connecting socket a CURVE client of the job member `server_name`."""

    def __init__(self, credentials, server_name):
        self.credentials = credentials
        self.server_key = credentials.members.get(server_name)
        if self.server_key is None:
            raise ValueError(f"disttrain: the job's keys have no public key for {server_name} "
                             f"(members: {sorted(credentials.members)})")

    def apply(self, socket):
        socket.curve_secretkey = self.credentials.secret
        socket.curve_publickey = self.credentials.public
        socket.curve_serverkey = self.server_key


# --- the ZAP handler -------------------------------------------------------------------------
MAX_LOGGED_ADDRESSES = 100   # refusals are logged once per address, for this many addresses
IPC_USER_PREFIX = "pid:"


class _JobAuthenticator(ThreadAuthenticator):
    """zmq.auth's thread authenticator, with one allow-list per listening socket (its ZAP
    domain) and the key's member name as User-Id."""

    def __init__(self, context):
        super().__init__(context)
        self.doors = {}           # domain -> ServerCurve
        self.ipc_domains = set()  # the ipc endpoints' domains: NULL, named by pid
        self.names = {}           # public key (raw 32 bytes) -> member name
        self.logged = set()       # (domain, address) already reported
        self.refused = 0
        self._address = ""

    async def handle_zap_message(self, msg):
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        domain = msg[2].decode("utf-8", "replace") if len(msg) > 5 else ""
        if domain in self.ipc_domains and msg[5] == b"NULL":
            # libzmq's address of an ipc peer is "localhost:uid:gid:pid" (SO_PEERCRED): the
            # kernel's, not the peer's word. Only our own user gets in (the 0700 directory
            # already says so); the pid becomes the User-Id every message carries.
            _, uid, _, pid = (self._address.rsplit(":", 3) + ["", "", "", ""])[:4]
            if uid == str(os.getuid()) and pid.isdigit():
                return self._send_zap_reply(msg[1], b"200", b"OK", IPC_USER_PREFIX + pid)
            return self._send_zap_reply(msg[1], b"400", b"not this user's process")
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain, client_key):
        door = self.doors.get(domain)
        name = door.allowed.get(z85.encode(client_key)) if door else None
        if name is not None:
            self.names[client_key] = name
            return True, b"OK"
        self.refused += 1
        seen = (domain, self._address)
        if seen not in self.logged and len(self.logged) < MAX_LOGGED_ADDRESSES:
            self.logged.add(seen)
            label = door.label if door else "a closed socket"
            _say(f"{label} refused a connection from {self._address or 'a local socket'}: its "
                 f"CURVE key is not one of this job's (logged once per address)")
        return False, b"not a key of this job"

    def curve_user_id(self, client_public_key):
        return self.names[client_public_key]


class _Gate:
    """One authenticator per zmq context. It keeps running between the listeners of one
    process (in-process test jobs open and close many): stopped and started again, the new
    one's ZAP endpoint can still be held by the old socket, which libzmq releases later, and
    a handshake in between is refused. `stop()` ends it before the context is terminated."""

    def __init__(self):
        self.lock = threading.Lock()
        self.authenticator = None

    def open(self, context, door):
        with self.lock:
            if self.authenticator is not None and self.authenticator.context is not context:
                self._stop()
            if self.authenticator is None:
                self.authenticator = _JobAuthenticator(context)
                self.authenticator.start()
            self.authenticator.doors[door.domain] = door
            self.authenticator.ipc_domains.add(door.ipc_domain)

    def close(self, door):
        with self.lock:
            if self.authenticator is not None:
                self.authenticator.doors.pop(door.domain, None)
                self.authenticator.ipc_domains.discard(door.ipc_domain)

    def stop(self):
        """Before context.term(): the ZAP socket would otherwise keep it waiting forever."""
        with self.lock:
            self._stop()

    def _stop(self):
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def refused(self):
        with self.lock:
            return self.authenticator.refused if self.authenticator else 0


_gate = _Gate()
stop_authenticator = _gate.stop


# --- who may ask what ------------------------------------------------------------------------
def worker_refusal(message):
    """Why a server must refuse `message`, or None: in a secure job only a worker's key may
    ask a server anything, and only in its own rank's name."""
    if not message.peer:
        return None          # insecure job: nobody's identity is known
    try:
        role, rank = parse_key_name(message.peer)
    except ValueError:       # an ipc peer that is no member of the job
        return f"{message.op} from {message.peer}, which is no worker of this job"
    if role != "worker":
        return f"{message.op} from {message.peer}: only workers talk to servers"
    claimed = message.meta.get("rank", rank)
    if claimed != rank:
        return f"{message.op} from {message.peer} claims worker rank {claimed!r}"
    return None


def registration_refusal(message):
    """Why the scheduler must refuse a register `message`, or None: a key registers only its
    own role and rank."""
    if not message.peer:
        return None
    role, rank = parse_key_name(message.peer)
    claimed_role, claimed_rank = message.meta.get("role"), message.meta.get("rank")
    if claimed_role != role or claimed_rank not in (None, rank):
        return (f"the key of {message.peer} cannot register as {claimed_role} "
                f"{'' if claimed_rank is None else claimed_rank}".rstrip())
    return None
