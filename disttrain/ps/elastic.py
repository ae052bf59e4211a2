"""Elastic membership on the servers (launch -n MIN:MAX): which worker ranks count at which
clock, learnt from the marks that workers' pushes carry ("leave", "join"), and the op
`joined` by which a new worker learns where it starts. ps/server.py calls in here.

Protocol (sync mode exact, async / ssp best effort):
- A leaving worker marks every push of its last clock k with meta "leave": k. It counts
  for clock k and not from k + 1 on.
- A joining worker registers (the scheduler's book notice names it to everyone); the
  lowest active worker marks its pushes of clock k with meta "join": [[rank, k + 1,
  position]]: the new rank counts from clock k + 1, and `position` (the global data
  position after step k, the marker's harness hands it over) is where it starts.
- Every reply carries meta "members": the list of [rank, first clock, last clock or None]
  spans, so in sync mode every worker learns a change in the replies of the clock that
  carried its mark (those come only after all pushes of that clock arrived) and re-splits
  the data from the next clock on.
"""
from disttrain.ps.protocol import Message, RequestError


class Roster:
    """Per worker rank the spans of clocks it counts in: [first, last] (last None: still
    in). A sync clock is complete once `count(clock)` pushes of it arrived."""

    def __init__(self, ranks):
        self.spans = [[rank, 0, None] for rank in sorted(ranks)]
        self.positions = {}      # rank -> (join clock, data position) of its latest join

    def counts(self, rank, clock):
        return any(r == rank and first <= clock and (last is None or clock <= last)
                   for r, first, last in self.spans)

    def count(self, clock):
        return sum(first <= clock and (last is None or clock <= last)
                   for _, first, last in self.spans)

    def total(self, clocks):
        """Pushes that clocks 0..clocks-1 need together (sync: what a key applied)."""
        return sum(self.count(clock) for clock in range(clocks))

    def active(self, clock):
        return sorted(r for r, first, last in self.spans
                      if first <= clock and (last is None or clock <= last))

    def leave(self, rank, clock):
        for span in self.spans:
            if span[0] == rank and span[2] is None and span[1] <= clock:
                span[2] = clock
                return True
        return False

    def join(self, rank, clock, position):
        if any(r == rank and last is None for r, _, last in self.spans):
            return False     # a repeat of a mark already taken (every push message has it)
        self.spans.append([rank, clock, None])
        self.positions[rank] = (clock, position)
        return True


def take_marks(state, rank, meta):
    """A push's "leave" and "join" marks, before its gradients are counted. A new joiner's
    chunks expect its first push at its join clock (the dedupe of ps/recovery.py)."""
    roster = state.roster
    leave = meta.get("leave")
    if leave is not None:
        if leave != meta.get("clock") or not roster.counts(rank, leave):
            raise RequestError(f"push: worker {rank} marks 'leave': {leave!r} on a push of clock "
                               f"{meta.get('clock')!r}; a worker marks the pushes of its last "
                               f"clock, one it still counts in")
        roster.leave(rank, leave)
    joins = meta.get("join")
    if joins is None:
        return
    if not (isinstance(joins, list) and all(
            isinstance(j, list) and len(j) == 3 and type(j[0]) is int and type(j[1]) is int
            and 0 <= j[0] < state.num_workers for j in joins)):
        raise RequestError(f"push: meta 'join' must list [rank, clock, position] with ranks in "
                           f"0..{state.num_workers - 1}, got {joins!r}")
    for joiner, clock, position in joins:
        if roster.join(joiner, clock, position):
            for key in state.keys.values():
                key.pushes[joiner] = clock


def expected(state, clock):
    """How many pushes complete a sync clock (a state without a roster: all workers)."""
    roster = getattr(state, "roster", None)
    return state.num_workers if roster is None else roster.count(clock)


def slowest(state, key):
    """ssp: the clock of the slowest worker that still counts (best effort)."""
    if state.roster is None:
        return min(key.pushes)
    ranks = state.roster.active(max(key.pushes)) or range(len(key.pushes))
    return min(key.pushes[rank] for rank in ranks)


def joined_reply(state, message, rank):
    """`joined` from a new worker: {"clock", "position"} of its join once a mark named it,
    else {"clock": None} (it asks again)."""
    if state.roster is None:
        raise RequestError(f"joined: server {state.rank} is not in an elastic job")
    clock, position = state.roster.positions.get(rank, (None, None))
    if not any(r == rank and first == clock and last is None
               for r, first, last in state.roster.spans):
        clock, position = None, None   # that was an earlier process of this rank, which left
    return Message("reply", message.id, state.sender, meta={"clock": clock, "position": position})


def tell_members(state, replies):
    """Every reply carries the spans, so each worker learns a change at once."""
    if state.roster is None:
        return
    for _, reply in replies:
        if reply.op == "reply":
            reply.meta["members"] = state.roster.spans


def contributions_expected(state, version):
    """What a sync key at `version` applied when no push was lost or doubled."""
    return state.num_workers * version if state.roster is None else state.roster.total(version)
