"""The update state machine of one tenant, in the mender style: one transition table.

::

    fetch -> verify -> stage -> activate -> probation -> commit -> committed
      |        |         |          |            |
      +--------+---------+-> failed +------------+-> rollback -> rolled_back

``fetch`` and ``verify`` are the artifact transfer; ``stage`` loads the model
and answers a smoke inference while the old one still serves; ``activate``
swaps the serving model (the previous one stays loaded and on disk);
``probation`` watches the new model's error rate for ``probation_s``;
``commit`` releases the previous model; ``rollback`` serves it again.

One update per tenant at a time. A newer desired version supersedes the
update in progress (``superseded``): one that has not served yet ends
``failed``; one on probation is rolled back first, so the previous model
serves again before the newer version is fetched. The rollback target of an
update is therefore always the tenant's last *committed* model, never a
version still on probation (it has not proved itself).

A tenant the controller no longer assigns at all (``removed``) ends its update
too, with an outcome reported: one that has not served ends ``failed``; one on
probation ends ``rolled_back`` straight away, as nothing of the tenant serves
any more (its held previous model goes with it, there is no one to serve it to).

The table drives every move: the updater names what happened (an event) and
persists the state :func:`advance` gives (an update not under way begins at
:data:`BEGINS`), or ends it where :func:`next_state` takes it.

The updater persists the state (atomically) before the state acts, and on
start :func:`resume` decides where to go from what was persisted: a restart
inside ``activate``, ``probation`` or ``rollback`` rolls back (the new model
may be what killed the agent), one inside ``commit`` finishes the commit, and
the rest repeat their idempotent work.

A restart inside ``stage``, ``activate`` or ``probation`` (:data:`CRASH_COUNTED`)
means the agent died while the new model was loading, answering its smoke
inference or serving: a segfault in a runtime, an out-of-memory kill on real
input (or a power cut, which looks the same). Each such death is counted
against the update (``crashed``) and persisted before anything else, whatever
the generation that assigned the artifact: a death while staging tries staging
again (the old model still serves), one while serving rolls back, and the next
rollout of the same artifact is another attempt. Once the update crashed the
agent ``max_attempts`` times it ends ``failed`` (in ``stage``) or is rolled back
for good, and the artifact is refused for the tenant from then on, instead of
crashing the agent until systemd gives up on it. A commit clears the count.
Pure code, no I/O.
"""

from __future__ import annotations

from agent.compat import StrEnum


class UpdateState(StrEnum):
    FETCH = "fetch"
    VERIFY = "verify"
    STAGE = "stage"
    ACTIVATE = "activate"
    PROBATION = "probation"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class UpdateEvent(StrEnum):
    # The artifact is assigned and not on the device: the update begins by fetching it.
    ASSIGNED = "assigned"
    FETCHED = "fetched"
    VERIFIED = "verified"
    STAGED = "staged"
    ACTIVATED = "activated"
    PROBATION_PASSED = "probation_passed"
    PROBATION_FAILED = "probation_failed"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    ERROR = "error"
    # The controller wants another version of the tenant before this update ended.
    SUPERSEDED = "superseded"
    # The controller's desired state no longer assigns the tenant at all.
    REMOVED = "removed"
    # The agent died while in the state, as many times as an update may be attempted.
    CRASHED = "crashed"
    # The write that would let the staged model serve was refused (a full disk): nothing was
    # swapped, and staging is tried again once there is room.
    NOT_SWAPPED = "not_swapped"


S, E = UpdateState, UpdateEvent

TRANSITIONS: dict[tuple[UpdateState, UpdateEvent], UpdateState] = {
    (S.FETCH, E.FETCHED): S.VERIFY,
    (S.FETCH, E.ERROR): S.FAILED,
    (S.FETCH, E.SUPERSEDED): S.FAILED,
    (S.FETCH, E.REMOVED): S.FAILED,
    (S.VERIFY, E.VERIFIED): S.STAGE,
    (S.VERIFY, E.ERROR): S.FAILED,
    (S.VERIFY, E.SUPERSEDED): S.FAILED,
    (S.VERIFY, E.REMOVED): S.FAILED,
    (S.STAGE, E.STAGED): S.ACTIVATE,
    (S.STAGE, E.ERROR): S.FAILED,
    (S.STAGE, E.SUPERSEDED): S.FAILED,
    (S.STAGE, E.REMOVED): S.FAILED,
    (S.STAGE, E.CRASHED): S.FAILED,
    (S.ACTIVATE, E.ACTIVATED): S.PROBATION,
    (S.ACTIVATE, E.ERROR): S.ROLLBACK,
    (S.ACTIVATE, E.CRASHED): S.ROLLBACK,
    (S.ACTIVATE, E.NOT_SWAPPED): S.STAGE,
    (S.PROBATION, E.PROBATION_PASSED): S.COMMIT,
    (S.PROBATION, E.CRASHED): S.ROLLBACK,
    (S.PROBATION, E.PROBATION_FAILED): S.ROLLBACK,
    (S.PROBATION, E.ERROR): S.ROLLBACK,
    (S.PROBATION, E.SUPERSEDED): S.ROLLBACK,
    (S.PROBATION, E.REMOVED): S.ROLLED_BACK,
    (S.COMMIT, E.COMMITTED): S.COMMITTED,
    (S.ROLLBACK, E.ROLLED_BACK): S.ROLLED_BACK,
}

FINAL = frozenset({S.COMMITTED, S.FAILED, S.ROLLED_BACK})
# While in these the new model serves and the previous one is kept loaded.
SERVING_NEW = frozenset({S.ACTIVATE, S.PROBATION, S.COMMIT})

OUTCOMES = {S.COMMITTED: "succeeded", S.FAILED: "failed", S.ROLLED_BACK: "rolled_back"}


class UnhandledTransition(RuntimeError):
    """A bug: the table has no entry. Crash loudly; systemd restarts the agent and resume() recovers."""


def next_state(state: UpdateState, event: UpdateEvent) -> UpdateState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise UnhandledTransition(f"no transition from {state.value} on {event.value}") from None


# Where an update may begin: the artifact may already be half downloaded or on disk.
ENTRY = frozenset({S.FETCH, S.VERIFY, S.STAGE})


# Where an update that is not under way (none yet, or the last one ended) begins, by what
# already happened to its artifact: assigned (to fetch), fetched (on disk, to verify) or
# verified (to stage).
BEGINS = {E.ASSIGNED: S.FETCH, E.FETCHED: S.VERIFY, E.VERIFIED: S.STAGE}


def advance(current: UpdateState | None, event: UpdateEvent) -> UpdateState:
    """The state an update in ``current`` moves to on ``event``: the table's, or where an update
    not under way begins (:data:`BEGINS`). A state the event leads to is entered again when the
    update is in it already: after a restart, resume repeats the state's work."""
    if current is None or current in FINAL:
        if event in BEGINS:
            return BEGINS[event]
    elif (current, event) in TRANSITIONS:
        return TRANSITIONS[(current, event)]
    elif BEGINS.get(event) is current or any(
        after is current for (_, on), after in TRANSITIONS.items() if on is event
    ):
        return current
    raise UnhandledTransition(f"no transition from {current.value if current else 'none'} on {event.value}")


# How many times an update may crash the agent, unless configured.
DEFAULT_MAX_ATTEMPTS = 3
# Where a restart counts as a crash of the update: the new model was loading or serving.
CRASH_COUNTED = (S.STAGE, S.ACTIVATE, S.PROBATION)
_WHILE = {S.STAGE: "staging", S.ACTIVATE: "activating", S.PROBATION: "on probation"}


def resume(state: UpdateState, crashes: int = 0, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> UpdateState:
    """Where an update persisted in ``state`` continues after the agent restarts.

    ``crashes`` counts the restarts that found the update in a :data:`CRASH_COUNTED`
    state, this one included. A restart while the new model served always rolls back.
    """
    if state in (S.ACTIVATE, S.PROBATION):
        return next_state(state, E.CRASHED)
    if state is S.STAGE and crashes >= max_attempts:
        return next_state(state, E.CRASHED)
    return state


def crash_reason(crashes: int, states: tuple[UpdateState, ...] = ()) -> str:
    """Why an update is given up: how often it crashed the agent and in which states, in the
    machine's order (none named: staging, the only state counted before the others were)."""
    where = [_WHILE[s] for s in CRASH_COUNTED if s in states] or [_WHILE[S.STAGE]]
    places = where[0] if len(where) == 1 else f"{', '.join(where[:-1])} or {where[-1]}"
    return f"crashed the agent {crashes} time{'s' if crashes != 1 else ''} while {places}"


def crash_note(state: UpdateState, crashes: int, max_attempts: int) -> str:
    """Why a restart while the new model served rolled it back, before the update is given up."""
    return f"the agent restarted during {state.value} (attempt {crashes} of {max_attempts})"


def judge_probation(
    inferences: int, errors: int, max_error_rate: float, now: float, until: float
) -> tuple[UpdateEvent | None, str]:
    """PROBATION_FAILED as soon as the error rate exceeds the limit, PASSED once the time is up."""
    if inferences and errors / inferences > max_error_rate:
        return (
            E.PROBATION_FAILED,
            f"error rate {errors / inferences:.3f} ({errors}/{inferences} inferences) "
            f"exceeds {max_error_rate:g} during probation",
        )
    if now >= until:
        return E.PROBATION_PASSED, f"{inferences} inferences, {errors} errors"
    return None, ""
