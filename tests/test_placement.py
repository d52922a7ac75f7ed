"""The placement policy (ray_lipsync.placement) on its own: no Ray, time passed in."""

from __future__ import annotations

import pytest

from ray_lipsync.config import PipelineConfig
from ray_lipsync.errors import AtCapacity, BackendUnavailable
from ray_lipsync.placement import Assigned, Move, Pending, Placement, Refused, Start, Waiting

B = "procedural"


def policy(**config: object) -> Placement:
    return Placement(PipelineConfig(**{"sessions_per_replica": 2, "max_replicas": 4, **config}),
                     backend_retry_s=30.0)


def with_ready(placement: Placement, *names: str, backend: str = B, gpu: bool = False) -> Placement:
    for name in names:
        placement.add_replica(name, backend, gpu, now=0.0)
        placement.replica_ready(name, now=0.0)
    return placement


def pins(placement: Placement) -> dict[str, set[str]]:
    return {r.name: set(r.sessions) for r in placement.replicas.values()}


# -- placing new sessions ----------------------------------------------------------------------


def test_a_new_session_goes_to_the_least_loaded_ready_replica_ties_by_name() -> None:
    p = with_ready(policy(), "r1", "r0")
    assert p.place("a", B, "g", now=1) == Assigned("r0")  # tie: by name
    assert p.place("b", B, "g", now=1) == Assigned("r1")  # least loaded
    assert p.place("c", B, "g", now=1) == Assigned("r0")
    assert pins(p) == {"r0": {"a", "c"}, "r1": {"b"}}


def test_starting_down_and_draining_replicas_take_no_new_session() -> None:
    p = with_ready(policy(), "cpu0")
    p.add_replica("gpu-starting", B, True, now=0)
    with_ready(p, "gpu-down", gpu=True)
    p.mark_down("gpu-down")
    assert p.scale(B, gpu=True, now=0).drained == ("cpu0",)  # GPUs wanted: the CPU one drains
    decision = p.place("a", B, "g", now=1)
    assert isinstance(decision, Pending), "a replica is starting or restarting: worth waiting"
    assert "4 session slots" in str(decision.error)
    assert all(not r.sessions for r in p.replicas.values())


def test_full_capacity_with_nothing_coming_is_refused_with_at_capacity() -> None:
    p = with_ready(policy(sessions_per_replica=1, max_replicas=1), "r0")
    assert p.place("a", B, "g", now=0) == Assigned("r0")
    decision = p.place("b", B, "g", now=0)
    assert isinstance(decision, Refused) and type(decision.error) is AtCapacity
    assert "retry later" in str(decision.error) and "1 session slots" in str(decision.error)


def test_full_capacity_with_a_replica_starting_is_pending() -> None:
    p = with_ready(policy(sessions_per_replica=1), "r0")
    p.place("a", B, "g", now=0)
    assert p.scale(B, gpu=False, now=0) == Start(B, False, 1)
    p.add_replica("r1", B, False, now=0)
    assert isinstance(p.place("b", B, "g", now=0), Pending)
    p.replica_ready("r1", now=1)
    assert p.place("b", B, "g", now=1) == Assigned("r1")


def test_a_backend_whose_replica_failed_to_start_is_held_then_retried() -> None:
    p = policy()
    p.add_replica("r0", B, False, now=0)
    assert p.replica_failed_to_start("r0", "ImportError: no torch", now=10) == []
    assert "r0" not in p.replicas
    decision = p.place("a", B, "g", now=20)
    assert isinstance(decision, Refused) and isinstance(decision.error, BackendUnavailable)
    assert p.held(B, now=20) == "ImportError: no torch" and p.held_backends(now=20) == [B]
    assert p.scale(B, gpu=False, now=20).count == 0, "no replica starts while held"
    assert p.held(B, now=41) is None and p.held_backends(now=41) == []
    assert p.scale(B, gpu=False, now=41).count == 1
    assert p.held("musetalk", now=20) is None, "only that backend is held"


# -- how many replicas --------------------------------------------------------------------------


@pytest.mark.parametrize(("sessions", "waiting", "wanted"), [
    (0, 0, 1), (1, 0, 1), (2, 0, 2), (3, 0, 2), (2, 2, 3), (7, 0, 4), (20, 5, 4),
])
def test_wanted_is_sessions_plus_one_over_capacity_within_bounds(sessions: int, waiting: int, wanted: int) -> None:
    p = policy()  # 2 sessions per replica, 1..4 replicas
    for i in range(4):  # down (adopted): they count as capacity but take nobody new
        p.add_replica(f"r{i}", B, False, now=0, state="down")
    p.renew("g", {f"s{i}": (B, f"r{i % 4}") for i in range(sessions)}
            | {f"w{i}": (B, "gone") for i in range(waiting)}, now=0)
    assert len(p.waiting(B)) == waiting
    assert p.wanted(B) == wanted


def test_wanted_counts_waiting_sessions_and_never_exceeds_max_replicas() -> None:
    p = policy(sessions_per_replica=1, max_replicas=3)
    p.renew("g", {f"w{i}": (B, "gone") for i in range(10)}, now=0)  # all waiting: no replica yet
    assert len(p.waiting(B)) == 10
    assert p.wanted(B) == 3
    assert p.scale(B, gpu=False, now=0) == Start(B, False, 3)
    for i in range(3):
        p.add_replica(f"r{i}", B, False, now=0)
    assert p.scale(B, gpu=False, now=0).count == 0, "serving (starting) replicas count"
    moves = [m for i in range(3) for m in p.replica_ready(f"r{i}", now=1)]
    assert [m.session_id for m in moves] == ["w0", "w1", "w2"]  # oldest first
    assert p.wanted(B) == 3 and p.scale(B, gpu=False, now=1).count == 0


def test_wanted_respects_min_replicas() -> None:
    p = policy(min_replicas=2)
    assert p.wanted(B) == 2
    assert p.scale(B, gpu=False, now=0) == Start(B, False, 2)


def test_idle_replicas_beyond_wanted_are_removed_after_idle_replica_s() -> None:
    p = with_ready(policy(idle_replica_s=10), "r0", "r1", "r2")
    for i in range(4):
        p.place(f"s{i}", B, "g", now=0)
    assert p.wanted(B) == 3
    for i in range(4):
        p.unpin(f"s{i}", now=5)
    assert p.wanted(B) == 1
    assert p.retire(now=14) == [], "not idle long enough"
    assert p.retire(now=16) == ["r0", "r1"], "beyond wanted, by name"
    assert list(p.replicas) == ["r2"]
    assert p.retire(now=100) == [], "min_replicas stay"


def test_a_busy_replica_is_never_removed() -> None:
    p = with_ready(policy(idle_replica_s=0), "r0", "r1")
    p.place("a", B, "g", now=0)
    assert p.retire(now=50) == ["r1"]
    assert pins(p) == {"r0": {"a"}}


def test_cpu_replicas_drain_once_gpus_are_wanted_and_go_when_empty() -> None:
    p = with_ready(policy(), "cpu0")
    p.place("a", B, "g", now=0)
    start = p.scale(B, gpu=True, now=1)
    assert start == Start(B, True, 1, ("cpu0",))
    assert p.replicas["cpu0"].state == "draining"
    assert p.retire(now=2) == [], "draining keeps its sessions"
    with_ready(p, "gpu0", gpu=True)
    assert p.place("b", B, "g", now=2) == Assigned("gpu0"), "new sessions go to GPU replicas"
    p.unpin("a", now=3)
    assert p.retire(now=3) == ["cpu0"]
    assert p.scale(B, gpu=True, now=3) == Start(B, True, 0)


def test_a_draining_replica_stays_draining_through_a_restart() -> None:
    p = with_ready(policy(), "cpu0")
    p.place("a", B, "g", now=0)
    p.scale(B, gpu=True, now=0)
    assert p.mark_down("cpu0")
    p.replica_up("cpu0", now=1)
    assert p.replicas["cpu0"].state == "draining"


# -- failures and waiting sessions ---------------------------------------------------------------


def test_a_session_of_a_down_replica_moves_to_a_ready_one_with_room() -> None:
    p = with_ready(policy(), "r0", "r1")
    p.place("a", B, "g", now=0)
    assert p.mark_down("r0")
    assert p.reassign("a", "r0", "g", B, now=1) == Assigned("r1")
    assert pins(p) == {"r0": set(), "r1": {"a"}}
    assert p.reassign("a", "r0", "g", B, now=2) == Assigned("r1"), "moved already: same answer"


def down_replica_with_no_room() -> Placement:
    """r0 (down) served a and b; r1 is full with c and d: a and b wait."""
    p = with_ready(policy(), "r0", "r1")
    for s in "abcd":
        p.place(s, B, "g", now=0)
    assert pins(p) == {"r0": {"a", "c"}, "r1": {"b", "d"}}
    p.mark_down("r0")
    assert p.reassign("a", "r0", "g", B, now=1) == Waiting(B, 1)
    assert p.reassign("c", "r0", "g", B, now=2) == Waiting(B, 2)
    return p


def test_a_replica_down_with_no_room_elsewhere_makes_its_sessions_wait() -> None:
    p = down_replica_with_no_room()
    assert p.waiting() == ["a", "c"]
    assert p.assignment("a") == Waiting(B, 1) and p.assignment("c") == Waiting(B, 2)
    assert p.assignment("b") == Assigned("r1") and p.assignment("nope") is None
    assert p.wanted(B) == 3, "waiting sessions count for scale-up"
    assert isinstance(p.place("e", B, "g", now=3), Pending), "no slot for a new session"


def test_a_waiting_session_gets_the_slot_another_session_frees() -> None:
    p = down_replica_with_no_room()
    assert p.unpin("b", now=5) == [Move("a", "r1")], "the oldest waiting session first"
    assert p.assignment("a") == Assigned("r1") and p.assignment("c") == Waiting(B, 1)


def test_waiting_sessions_return_when_the_down_replica_answers_again() -> None:
    p = down_replica_with_no_room()
    assert p.replica_up("r0", now=5) == [Move("a", "r0"), Move("c", "r0")]
    assert p.waiting() == [] and pins(p)["r0"] == {"a", "c"}


def test_waiting_sessions_go_to_a_replacement_replica_once_it_is_ready() -> None:
    p = down_replica_with_no_room()
    start = p.scale(B, gpu=False, now=3)
    assert start.count == 1
    p.add_replica("r2", B, False, now=3)
    assert p.waiting() == ["a", "c"], "not while it starts"
    assert p.replica_ready("r2", now=6) == [Move("a", "r2"), Move("c", "r2")]
    assert p.assignment("c") == Assigned("r2")


def test_a_new_session_never_takes_the_slot_of_a_waiting_one() -> None:
    p = down_replica_with_no_room()
    p.add_replica("r2", B, False, now=3)
    p.replica_ready("r2", now=4)  # takes both waiting sessions: full
    assert isinstance(p.place("e", B, "g", now=5), Pending)  # r0 (down) may come back


def test_a_replica_that_died_for_good_makes_its_sessions_wait_or_move() -> None:
    p = with_ready(policy(sessions_per_replica=2), "r0", "r1")
    for s in "abc":
        p.place(s, B, "g", now=0)
    assert pins(p) == {"r0": {"a", "c"}, "r1": {"b"}}
    assert p.replica_gone("r0", now=1) == [Move("a", "r1")], "the one free slot, oldest first"
    assert p.assignment("c") == Waiting(B, 1)
    assert "r0" not in p.replicas
    assert p.scale(B, gpu=False, now=1).count == 1, "a replacement is wanted"


def test_reassign_of_a_session_unknown_after_a_restart_uses_the_given_backend() -> None:
    p = with_ready(policy(), "r0")
    assert p.reassign("x", "gone", "g", B, now=0) == Assigned("r0")
    assert p.reassign("y", "gone", "g", "musetalk", now=0) == Waiting("musetalk", 1)


# -- leases --------------------------------------------------------------------------------------


def test_a_gateway_silent_for_lease_s_loses_its_sessions_and_frees_their_slots() -> None:
    p = with_ready(policy(sessions_per_replica=1, max_replicas=2, lease_s=6), "r0", "r1")
    p.place("a", B, "dead", now=0)
    p.place("b", B, "alive", now=0)
    p.mark_down("r1")
    assert p.reassign("b", "r1", "alive", B, now=1) == Waiting(B, 1)
    p.renew("alive", {"b": (B, "r1")}, now=5)
    assert p.expire(now=6) == ({}, [])
    expired, moves = p.expire(now=6.5)
    assert expired == {"dead": 1} and moves == [Move("b", "r0")], "the freed slot goes to the waiting session"
    assert p.assignment("a") is None
    p.renew("alive", {"b": (B, "r1")}, now=10)
    assert p.expire(now=16.5) == ({"alive": 1}, [])
    assert p.sessions() == 0


def test_a_waiting_session_of_an_expired_gateway_stops_waiting() -> None:
    p = down_replica_with_no_room()
    expired, _ = p.expire(now=100)
    assert expired == {"g": 4} and p.waiting() == [] and p.sessions() == 0


def test_renewal_after_a_directory_restart_rebuilds_the_pins() -> None:
    p = policy(sessions_per_replica=2)
    for name in ("r0", "r1"):  # adopted: down until they answer a ping
        p.add_replica(name, B, False, now=0, state="down")
    moves = p.renew("g", {"a": (B, "r0"), "b": (B, "r1"), "c": (B, "r0"), "new": (B, None),
                          "lost": (B, "r9")}, now=1)
    assert moves == []
    assert pins(p) == {"r0": {"a", "c"}, "r1": {"b"}}, "rebuilt onto the named replicas"
    assert p.assignment("new") is None, "still being placed: pin() does it"
    assert p.assignment("lost") == Waiting(B, 1), "its replica is gone: it waits"
    assert p.replica_up("r1", now=2) == [Move("lost", "r1")]
    assert p.wanted(B) == 3, "ceil((4 sessions + 1) / 2)"


def test_renewal_keeps_this_directorys_assignment_and_releases_what_the_gateway_dropped() -> None:
    p = down_replica_with_no_room()
    p.replica_up("r0", now=3)
    p.mark_down("r1")
    assert p.reassign("b", "r1", "g", B, now=4) == Waiting(B, 1)
    # the gateway still names its old replicas; the directory's answer stands
    p.renew("g", {"a": (B, "r0"), "b": (B, "r1"), "c": (B, "r0")}, now=5)
    assert p.assignment("b") == Waiting(B, 1)
    assert p.assignment("d") is None, "not renewed: released"
    assert pins(p) == {"r0": {"a", "c"}, "r1": set()}


def test_renewal_release_frees_a_slot_for_a_waiting_session() -> None:
    p = down_replica_with_no_room()
    moves = p.renew("g", {"a": (B, "r0"), "c": (B, "r0"), "d": (B, "r1")}, now=5)  # b closed
    assert moves == [Move("a", "r1")]


def test_unpin_of_a_waiting_session_removes_it_from_the_queue() -> None:
    p = down_replica_with_no_room()
    p.unpin("a", now=3)
    assert p.waiting() == ["c"] and p.assignment("c") == Waiting(B, 1)


def test_replica_info_shape() -> None:
    p = with_ready(policy(), "r0", gpu=True)
    p.place("a", B, "g", now=0)
    assert p.replicas["r0"].info() == {"replica": "r0", "backend": B, "resources": "gpu",
                                        "state": "ready", "sessions": 1}
