"""The one line's decisions (reactor_graph/scale/line.py), without replicas."""
from __future__ import annotations

from reactor_graph.scale.line import View, plan


def test_free_engines_go_to_the_first_ready_clients_in_arrival_order():
    order = {"c": 1, "d": 2, "e": 3, "f": 4}
    views = [View(0, free=False, in_session=True, waiting=["e", "c"], ready={"c", "e"}),
             View(1, free=True, waiting=["d", "f"], ready={"d", "f"}),
             View(2, free=True, waiting=[], ready=set())]
    assigned, positions = plan(views, order)
    # c (first, hosted on 0 whose engine is busy) takes a free engine through a relay: the one that no client
    # of its own waits for, so that d takes its own without a relay
    assert assigned == [("c", 0, 2), ("d", 1, 1)]
    # everyone left: places in the whole line
    assert positions[0] == {"e": {"position": 1, "waiting": 2, "in_session": True}}
    assert positions[1] == {"f": {"position": 2, "waiting": 2, "in_session": True}}
    assert positions[2] == {}


def test_own_engine_first_then_the_lowest_free_one():
    views = [View(0, free=True, waiting=[], ready=set()), View(1, free=True, waiting=["x"], ready={"x"})]
    assert plan(views, {"x": 0})[0] == [("x", 1, 1)]  # no relay when its host's engine is free
    views = [View(0, free=True), View(1, free=False, in_session=True, waiting=["x"], ready={"x"}),
             View(2, free=True)]
    assert plan(views, {"x": 0})[0] == [("x", 1, 0)]


def test_a_client_still_connecting_keeps_its_place_but_does_not_hold_the_engine():
    views = [View(0, free=True, waiting=["slow", "quick"], ready={"quick"})]
    assigned, positions = plan(views, {"slow": 1, "quick": 2})
    assert assigned == [("quick", 0, 0)]
    assert positions[0] == {"slow": {"position": 1, "waiting": 1, "in_session": True}}


def test_graphs_that_take_the_camera_are_not_relayed():
    views = [View(0, free=False, in_session=True, relays=False, waiting=["c"], ready={"c"}),
             View(1, free=True, relays=False, waiting=["d"], ready={"d"})]
    assigned, positions = plan(views, {"c": 1, "d": 2})
    assert assigned == [("d", 1, 1)]
    assert positions[0]["c"]["position"] == 1
    # each waits behind its own replica's clients only: that is whom it waits for
    views = [View(0, free=False, in_session=True, relays=False, waiting=["a", "c"], ready={"a", "c"}),
             View(1, free=False, in_session=True, relays=False, waiting=["b"], ready={"b"})]
    positions = plan(views, {"a": 1, "b": 2, "c": 3})[1]
    assert {s: p["position"] for s, p in {**positions[0], **positions[1]}.items()} == {"a": 1, "c": 2, "b": 1}
    assert positions[0]["c"]["waiting"] == 2 and positions[1]["b"]["waiting"] == 1


def test_nothing_free_nothing_assigned_and_unknown_arrivals_go_last():
    views = [View(0, free=False, in_session=True, waiting=["late", "b"], ready={"late", "b"})]
    assigned, positions = plan(views, {"b": 5})
    assert assigned == []
    assert [positions[0][s]["position"] for s in ("b", "late")] == [1, 2]
