"""The scheduler's side of elastic membership (launch -n MIN:MAX): a worker registering
after the start takes a free rank (a joiner), a worker leaving gracefully frees its rank.
ps/scheduler.py calls in here; ps/elastic.py is the servers' side."""
import sys
import time

from disttrain.ps import auth
from disttrain.ps.membership import heartbeat_identity
from disttrain.ps.protocol import Message

PUBLIC = ("rank", "tcp", "ipc", "hostname", "netns", "pid")   # as scheduler.PUBLIC


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


def _holder(scheduler, role, rank):
    return next((i for i, n in scheduler.nodes.items()
                 if n["role"] == role and n.get("rank") == rank), None)


def _rank_of(message):
    return auth.parse_key_name(message.peer)[1] if message.peer else message.meta.get("rank")


def may_join(scheduler, message):
    """A worker registering once the job runs joins it when the job is elastic and its
    rank is free (nobody holds it, or its holder left); else it is a replacement (recovery)."""
    if not scheduler.elastic or message.meta.get("role") != "worker":
        return False
    rank = _rank_of(message)
    return type(rank) is int and 0 <= rank < scheduler.size["worker"] and \
        _holder(scheduler, "worker", rank) is None


def register_joiner(scheduler, identity, message):
    """Answer {"rank", "book", "elastic", "join": True}; every other node gets a book notice
    naming the joiner ("join": rank): servers learn its addresses, and the lowest active
    worker marks the clock it starts at (ps/elastic.py)."""
    refusal = auth.registration_refusal(message)
    if refusal:
        return scheduler._error(identity, message, refusal)
    meta = message.meta
    node_id, rank = meta["node"], _rank_of(message)
    if node_id in scheduler.nodes or node_id in scheduler.replaced:
        return scheduler._error(identity, message, f"node id {node_id!r} registered twice")
    node = scheduler.nodes[node_id] = dict(meta, rank=rank, peer=message.peer,
                                           last_seen=time.monotonic(), joining=True)
    scheduler.book["worker"][rank] = {k: node[k] for k in PUBLIC}
    _say(f"worker {rank} joins (pid {node.get('pid')}); it starts at a clock the workers "
         f"choose")
    scheduler.listener.send(identity, Message("reply", message.id, "scheduler", meta={
        "rank": rank, "book": scheduler.book, "elastic": True, "join": True}))
    for other in scheduler.nodes:
        if other != node_id:
            scheduler.listener.send(heartbeat_identity(other), Message(
                "book", 0, "scheduler", meta={"book": scheduler.book, "role": "worker",
                                              "rank": rank, "join": rank}))


def leave(scheduler, identity, message):
    """A worker's goodbye with meta "leave": true (it left gracefully mid-run): forget it,
    so that its rank is free for a joiner and the job no longer waits for its goodbye."""
    node_id = message.meta["node"]
    node = scheduler.nodes.pop(node_id)
    scheduler.heard.discard(node_id)
    scheduler.unresponsive.pop(node_id, None)
    if scheduler.book["worker"][node["rank"]] is not None and \
            scheduler.book["worker"][node["rank"]].get("pid") == node.get("pid"):
        scheduler.book["worker"][node["rank"]] = None
    _say(f"worker {node['rank']} left the job")
    scheduler.listener.send(identity, Message("reply", message.id, "scheduler"))


def _workers(scheduler):
    return [i for i, n in scheduler.nodes.items() if n["role"] == "worker" and not n.get("joining")]


def group_size(scheduler, group):
    """Barrier sizes in an elastic job: the workers in the job now (not those still waiting
    to be let in)."""
    servers = scheduler.size["server"]
    return {"worker": len(_workers(scheduler)), "server": servers,
            "all": len(_workers(scheduler)) + servers}[group]


def all_workers_left(scheduler):
    """Every worker in the job said its final goodbye (one that still waits to be let in
    is not waited for: it gets the shutdown and exits)."""
    workers = _workers(scheduler)
    return bool(workers) and set(workers) <= scheduler.said_goodbye
