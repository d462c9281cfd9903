# The adaptive spin, declared once: whether a wait polls before it sleeps.
#
# A wait that polls (non-blocking recv in a loop) catches what it waits for without a wake-up,
# which across CPUs costs tens of us here, but it holds its CPU meanwhile.  That is lost time
# when the answer cannot come while we poll: the peer needs our CPU to produce it (a provider
# or an NBD client pinned with us, which a poll does not let run) or simply takes longer than
# the cap.  So the spin runs only while it pays.  Each wait that polled is a hit (what it
# waited for came while polling), a miss (the poll ran out) or neither (the thread was
# descheduled meanwhile, a step of the poll loop took longer than SPIN_PREEMPT_NS: the CPU was
# someone else's and the answer came without our poll).  A hit banks one point (up to
# SPIN_SCORE_MAX), a miss costs SPIN_MISS_COST; below zero the spin stops and the waits sleep
# at once.  While stopped, every ``probe_gap``-th wait polls for the cap once: a hit turns the
# spin on again (with half the points banked), a miss doubles the gap (up to SPIN_PROBE_MAX),
# neither tries again after the same gap.  A spin turned on by a probe must bank all its
# points before it stops again, or the gap doubles as for a missed probe; once it has, the gap
# is back to SPIN_PROBE_FIRST.  So a hit rate just under the threshold does not switch it on
# and off every few waits.  ``cap_ns`` 0 never polls; ``adaptive`` 0 polls for the cap on every
# wait (the fixed spin).  No timing is measured but the poll's own steps, and the length of a
# wait for a peer's next request whose poll ran out.
#
# Such a wait that lasted SPIN_IDLE_NS or more is idle: the peer paused (a client between
# bursts, a requester busy elsewhere or done).  It counts as a miss while the spin is on, but
# whatever the spin is, the next probe comes within SPIN_PROBE_FIRST waits with the gap reset:
# what follows a pause is a new pattern, and the gap that a stream of batches doubled up to
# SPIN_PROBE_MAX said nothing about it (measured: a provider connection's poll left off by
# get_many batches kept store.get p50 at ~25 us for its first ~1000 gets instead of ~12).
#
# A completion wait keeps two policies (spin_for_batch): batches of up to SPIN_SMALL_OPS ops,
# a page's round trip, and larger ones, which take the provider longer than the cap; sharing
# one, get_many's chunks turned the single gets' poll off.
#
# Users: the NBD connection loop's wait for the next request (_nbdserve.LoopState), the tcp
# requester's wait for a completion (_tcpwire.WireRequester), the tcp provider's wait for the
# next request (_tcpwire.WireServer) and the verbs C core's
# (_verbs.QP._c_poll; Python's QP.poll keeps its fixed spin).  Each keeps one spin_t per
# connection, calls spin_budget before a wait and spin_observe after a wait that polled.
from libc.stdint cimport int64_t, uint64_t

cdef enum:
    SPIN_SCORE_MAX = 16      # hits banked: a burst of 4 misses does not stop the spin
    SPIN_MISS_COST = 4       # a miss takes this many hits back: spinning stays on above ~80 % hits
    SPIN_PROBE_FIRST = 8     # waits between probes once the spin is off; doubles per failed probe
    SPIN_PROBE_MAX = 1024    # ... up to this (a probe costs one spin of the cap: ~0.1 % of the waits)
    SPIN_PREEMPT_NS = 10000  # a step of the poll loop this long: the thread was descheduled
    SPIN_IDLE_NS = 1000000   # a request this long after its wait began: the peer was idle
    SPIN_SMALL_OPS = 8       # a completion wait for at most this many ops uses the small batches' policy


cdef struct spin_t:
    int64_t cap_ns
    int adaptive
    int on
    int score
    int probe_gap
    int until_probe
    int probing
    int proven
    # counters (read by Python while C runs: torn reads of a statistic do not matter)
    uint64_t hits
    uint64_t misses
    uint64_t preempted
    uint64_t idle
    uint64_t probes
    uint64_t spun_ns
    uint64_t sleeps


cdef inline void spin_init(spin_t *s, int64_t cap_ns, bint adaptive) noexcept nogil:
    s.cap_ns = cap_ns
    s.adaptive = adaptive
    s.on = cap_ns > 0
    s.score = 0
    s.probe_gap = SPIN_PROBE_FIRST
    s.until_probe = 0
    s.probing = 0
    s.proven = 1
    s.hits = s.misses = s.preempted = s.idle = s.probes = s.spun_ns = s.sleeps = 0


cdef inline int64_t spin_budget(spin_t *s) noexcept nogil:
    """The poll budget of the next wait (a probe's when one is due; counts towards the next probe)."""
    s.probing = 0
    if s.cap_ns == 0 or s.on or not s.adaptive:
        return s.cap_ns
    s.until_probe -= 1
    if s.until_probe > 0:
        return 0
    s.probing = 1
    s.probes += 1
    return s.cap_ns


cdef inline int64_t spin_steady_budget(const spin_t *s) noexcept nogil:
    """The budget of a wait the policy does not learn from (more of something already arriving):
    the cap while the spin is on, else none."""
    return s.cap_ns if s.on or not s.adaptive else 0


cdef inline void spin_observe(spin_t *s, bint caught, bint preempted) noexcept nogil:
    """The outcome of a wait that polled: ``caught`` what it waited for while polling, having
    been ``preempted`` (descheduled) meanwhile."""
    cdef bint hit = caught and not preempted
    if caught and preempted:  # says nothing: a probe tries again after the same gap
        s.preempted += 1
        if s.probing and s.adaptive:
            s.probing = 0
            s.until_probe = s.probe_gap
        return
    if hit:
        s.hits += 1
    else:
        s.misses += 1
    if not s.adaptive:
        return
    if s.probing:
        s.probing = 0
        if hit:
            s.on = 1
            s.score = SPIN_SCORE_MAX // 2
            s.proven = 0
        else:
            s.probe_gap = min(2 * s.probe_gap, <int>SPIN_PROBE_MAX)
            s.until_probe = s.probe_gap
        return
    if hit:
        s.score = min(s.score + 1, <int>SPIN_SCORE_MAX)
        if s.score == SPIN_SCORE_MAX:
            s.proven = 1
            s.probe_gap = SPIN_PROBE_FIRST
        return
    s.score -= SPIN_MISS_COST
    if s.score < 0:
        s.on = 0
        s.score = 0
        if not s.proven:  # the probe's hit was luck: as good as a missed probe
            s.probe_gap = min(2 * s.probe_gap, <int>SPIN_PROBE_MAX)
        s.until_probe = s.probe_gap


cdef inline void spin_observe_request(spin_t *s, bint polled, bint preempted, int64_t waited_ns) noexcept nogil:
    """A wait for the peer's next request that was not caught by a poll (``polled``: its poll
    ran out; else it had no budget), once the request came ``waited_ns`` after the wait began:
    a miss if it polled, and from SPIN_IDLE_NS on idle (see above) whether it polled or not."""
    if waited_ns < SPIN_IDLE_NS:
        if polled:
            spin_observe(s, False, preempted)
        return
    if polled:  # (hits, misses, preempted and idle: the waits that polled)
        s.idle += 1
    if not s.adaptive or s.cap_ns == 0:
        return
    s.probing = 0
    if s.on:
        s.score -= SPIN_MISS_COST
        if s.score >= 0:
            return
        s.on = 0
        s.score = 0
    s.probe_gap = SPIN_PROBE_FIRST
    if s.until_probe > SPIN_PROBE_FIRST or s.until_probe <= 0:  # (not later for each pause)
        s.until_probe = SPIN_PROBE_FIRST


cdef inline dict spin_counters(const spin_t *s, str prefix):
    """The counters as the stats report them: ``prefix``hits, ... (spun time in us)."""
    return {prefix + "hits": s.hits, prefix + "misses": s.misses, prefix + "preempted": s.preempted,
            prefix + "idle": s.idle, prefix + "probes": s.probes, prefix + "us": s.spun_ns // 1000}


cdef inline void spin_init_pair(spin_t *pair, int64_t cap_ns, bint adaptive) noexcept nogil:
    """A completion wait's two policies (small batches', large ones'), alike."""
    spin_init(&pair[0], cap_ns, adaptive)
    spin_init(&pair[1], cap_ns, adaptive)


cdef inline spin_t *spin_for_batch(spin_t *pair, uint64_t ops) noexcept nogil:
    """The policy of a wait for the completion of a batch of ``ops`` operations."""
    return &pair[0] if ops <= SPIN_SMALL_OPS else &pair[1]


cdef inline dict spin_pair_counters(const spin_t *pair):
    """A completion wait's counters, its two policies summed, sleeps included."""
    c = spin_counters(&pair[0], "")
    for k, v in spin_counters(&pair[1], "").items():
        c[k] += v
    c["sleeps"] = pair[0].sleeps + pair[1].sleeps
    return c
