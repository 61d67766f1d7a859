"""A save serializes only the replica records that changed, and still writes exactly the
document a full ``model_dump_json`` makes, whatever was changed in place meanwhile."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.reconcile.state import (
    MOSTLY_CHANGED,
    PIECE_TURNS,
    PIECES_AFTER_DUMP,
    PIECES_PER_TURN,
    ComponentRecord,
    ConnectorState,
    ExitRecord,
    ReplicaRecord,
    StateStore,
    _Fragments,
)

# Field values of the types the model declares: a field replaced by an equal value of
# another type (1 by 1.0, or True) is the one change the fragment cache does not see
# (_Fragments' docstring), so a number in an untyped dict is an int or a non-integral float.
NAMES = st.text(min_size=1, max_size=8)  # quotes, backslashes, newlines, non-ASCII
MAYBE_FLOAT = st.none() | st.floats(allow_nan=False, width=32)
LEAF = (
    st.none()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    | st.text(max_size=6)
)
JSONISH = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)
EXITS = st.builds(
    ExitRecord,
    at=st.floats(allow_nan=False, allow_infinity=False),
    code=st.none() | st.integers(-64, 255),
    reason=st.none() | st.text(max_size=6),
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "component": NAMES,
    "ordinal": st.integers(0, 10_000),
    "phase": st.sampled_from(["spawning", "starting", "ready", "stopping", "backoff", "exited"]),
    "pid": st.none() | st.integers(1, 2**22),
    "create_time": MAYBE_FLOAT,
    "spawned_at": MAYBE_FLOAT,
    "ready_at": MAYBE_FLOAT,
    "restarts": st.integers(0, 100),
    "consecutive_failures": st.integers(0, 100),
    "restart_at": MAYBE_FLOAT,
    "last_exit": st.none() | EXITS,
    "reservation": st.none() | st.dictionaries(NAMES, JSONISH, max_size=4),
    "log_paths": st.dictionaries(st.sampled_from(["stdout", "stderr"]), st.text(max_size=10)),
}
RECORDS = st.builds(
    ReplicaRecord, watcher=NAMES, **{k: v for k, v in FIELDS.items() if k != "watcher"}
)

# One change to the state, applied to the record at ``i`` modulo how many there are.
MUTATIONS = st.one_of(
    st.tuples(st.just("add"), NAMES, RECORDS),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(
        st.just("set"),
        st.integers(0, 50),
        st.sampled_from(sorted(FIELDS)).flatmap(lambda f: st.tuples(st.just(f), FIELDS[f])),
    ),
    st.tuples(st.just("reservation item"), st.integers(0, 50), NAMES, JSONISH),
    st.tuples(st.just("nested port"), st.integers(0, 50), NAMES, st.integers(0, 65535)),
    st.tuples(
        st.just("log path"),
        st.integers(0, 50),
        st.sampled_from(["stdout", "stderr"]),
        st.text(max_size=10),
    ),
    st.tuples(st.just("exit reason"), st.integers(0, 50), st.none() | st.text(max_size=6)),
    st.tuples(st.just("replace"), st.integers(0, 50), st.integers(0, 100)),
    st.tuples(st.just("component"), NAMES, st.integers(0, 64)),
    st.tuples(st.just("held"), st.lists(st.dictionaries(NAMES, LEAF, max_size=2), max_size=2)),
    st.just(("render",)),
)


def apply(state: ConnectorState, mutation: tuple[Any, ...]) -> None:
    kind, *args = mutation
    keys = list(state.replicas)
    if kind == "render":
        return
    if kind == "add":
        state.replicas[args[0]] = args[1]
        return
    if kind == "component":
        state.components.setdefault(args[0], ComponentRecord(target=0)).target = args[1]
        return
    if kind == "held":
        state.held_after_stop = args[0]
        return
    if not keys:
        return
    key = keys[args[0] % len(keys)]
    rec = state.replicas[key]
    if kind == "remove":
        del state.replicas[key]
    elif kind == "set":
        field, value = args[1]
        setattr(rec, field, value)
    elif kind == "reservation item":
        if rec.reservation is None:
            rec.reservation = {}
        rec.reservation[args[1]] = args[2]  # in place: no attribute is set
    elif kind == "nested port":
        if rec.reservation is None:
            rec.reservation = {}
        ports = rec.reservation.get("ports")
        if not isinstance(ports, dict):
            ports = rec.reservation["ports"] = {}
        ports[args[1]] = args[2]  # two levels down
    elif kind == "log path":
        rec.log_paths[args[1]] = args[2]
    elif kind == "exit reason":
        if rec.last_exit is not None:
            rec.last_exit.reason = args[1]  # inside a nested model
    elif kind == "replace":
        # Another object with the same content but one field, under the same key.
        state.replicas[key] = rec.model_copy(deep=True, update={"restarts": args[1]})


@settings(max_examples=200, deadline=None)
@given(st.lists(RECORDS, max_size=4), st.lists(MUTATIONS, max_size=40))
def test_the_document_is_the_full_dump_after_any_changes(
    initial: list[ReplicaRecord], mutations: list[tuple[Any, ...]]
) -> None:
    state = ConnectorState(namespace="ns")
    for rec in initial:
        state.replicas[rec.watcher] = rec
    fragments = _Fragments()
    assert fragments.render(state) == state.model_dump_json(indent=1)
    for mutation in mutations:
        apply(state, mutation)
        if mutation[0] == "render":
            assert fragments.render(state) == state.model_dump_json(indent=1)
    assert fragments.render(state) == state.model_dump_json(indent=1)


def big_state(n: int) -> ConnectorState:
    state = ConnectorState(namespace="ns")
    state.components["Decode"] = ComponentRecord(target=n, next_ordinal=n + 1)
    for i in range(1, n + 1):
        w = f"ns.decode.{i}"
        state.replicas[w] = ReplicaRecord(
            component="Decode",
            ordinal=i,
            watcher=w,
            phase="ready",
            pid=1000 + i,
            reservation={"replica_id": f"Decode/{i}", "ports": {"system": 20000 + i}},
            log_paths={"stdout": f"/logs/{w}.out"},
        )
    return state


def test_a_save_serializes_only_the_records_that_changed() -> None:
    state = big_state(100)
    fragments = _Fragments()
    # While more than a third of the records are new (the first saves), a save is a whole
    # dump and makes a share of the pieces; then it serializes only what is left.
    share = 100 // PIECES_AFTER_DUMP
    while 100 - fragments.made_total > 100 // MOSTLY_CHANGED:
        before = fragments.made_total
        assert fragments.render(state) == state.model_dump_json(indent=1)
        assert fragments.made_total == before + share
    assert fragments.render(state) == state.model_dump_json(indent=1)
    assert fragments.made_total == 100
    assert fragments.render(state) == state.model_dump_json(indent=1)
    assert fragments.made_total == 100  # nothing changed: nothing serialized again
    state.replicas["ns.decode.7"].phase = "stopping"
    reservation = state.replicas["ns.decode.9"].reservation
    assert reservation is not None
    reservation["ports"]["system"] = 1  # in place, two levels down
    del state.replicas["ns.decode.3"]
    assert fragments.render(state) == state.model_dump_json(indent=1)
    assert fragments.made_total == 102
    for rec in list(state.replicas.values())[:50]:  # most changed: a whole dump again
        rec.restarts += 1
    assert fragments.render(state) == state.model_dump_json(indent=1)
    assert fragments.made_total == 102 + share


async def test_the_file_written_is_the_full_dump(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = big_state(50)
    await store.save(state)
    state.replicas["ns.decode.5"].log_paths["stderr"] = "/logs/e"
    state.replicas["ns.decode.6"].last_exit = ExitRecord(at=2.5, code=-9)
    await store.save(state)
    text = store.path.read_text()
    assert text == state.model_dump_json(indent=1)
    assert store.load() == state
    assert json.loads(text)["replicas"]["ns.decode.5"]["log_paths"]["stderr"] == "/logs/e"
    store.close()


async def test_a_save_beside_other_work_makes_its_pieces_over_several_loop_turns() -> None:
    """A thousand new records (a scale-up's first saves) are made PIECES_PER_TURN a loop
    turn, the loop free in between; records changed in those turns (here: a few each turn)
    are in the document as they are when it is made: the full dump of that moment."""
    state = big_state(1000)
    fragments = _Fragments()
    made_per_turn: list[int] = []
    stop = asyncio.Event()

    async def change_a_few_each_turn() -> None:
        turn = 0
        while not stop.is_set():
            made_per_turn.append(fragments.made_total)
            for i in range(1, 4):
                state.replicas[f"ns.decode.{(turn * 7 + i) % 1000 + 1}"].restarts += 1
            turn += 1
            await asyncio.sleep(0)

    other = asyncio.ensure_future(change_a_few_each_turn())
    await asyncio.sleep(0)
    text = await fragments.render_async(state)
    assert text == state.model_dump_json(indent=1)  # nothing ran since it was made
    stop.set()
    await other
    steps = [b - a for a, b in itertools.pairwise(made_per_turn)]
    assert max(steps) <= PIECES_PER_TURN
    assert len(made_per_turn) >= 1000 // PIECES_PER_TURN


async def test_records_that_keep_changing_cannot_put_a_save_off() -> None:
    """More records change every turn than a turn makes pieces of: after PIECE_TURNS turns
    the rest is made at once, and the document is still the full dump."""
    state = big_state(2 * PIECES_PER_TURN)
    fragments = _Fragments()
    turns = 0
    stop = asyncio.Event()

    async def change_all_each_turn() -> None:
        nonlocal turns
        while not stop.is_set():
            for rec in state.replicas.values():
                rec.restarts += 1
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.ensure_future(change_all_each_turn())
    await asyncio.sleep(0)
    text = await fragments.render_async(state)
    assert text == state.model_dump_json(indent=1)
    assert turns <= PIECE_TURNS + 1
    stop.set()
    await other
