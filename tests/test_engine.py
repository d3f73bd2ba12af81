"""The engine's compact history against a plain list of rows, under any mix of operations."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from autolr.engine import History

steps = st.one_of(st.none(), st.integers(-5, 40), st.sampled_from([2**63 - 1, -2**63, 2**63, 2**70]))
epochs = st.one_of(st.none(), st.floats(0, 10))
values = st.one_of(st.floats(allow_nan=True), st.integers(-3, 3))
metrics = st.dictionaries(st.sampled_from(["loss", "acc", "val_loss"]), values, max_size=3)
regular = st.builds(lambda k: ("regular", k), st.integers(1, 30))  # k rows at a fixed stride
append = st.tuples(st.just("append"), steps, epochs, metrics)
cut = st.tuples(st.sampled_from(["drop_front", "truncate", "round_trip"]), st.integers(0, 40))


def same(a, b) -> bool:
    return repr(a) == repr(b)  # NaN-aware and type-exact


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(-3, 1000), st.lists(st.one_of(append, regular, cut), max_size=40))
def test_history_equals_a_list_of_rows(start, stride, ops):
    """Rows appended, dropped at the front, cut at the end and saved/restored come back exactly;
    steps at a fixed stride (the usual log) are kept without an array until one breaks it."""
    h, model, first, step = History(), [], 0, start
    for op in ops:
        if op[0] == "append":
            row = (op[1], op[2], op[3])
            h.append(*row)
            model.append(row)
        elif op[0] == "regular":
            for _ in range(op[1]):
                row = (step, None, {"loss": step / 7.0})
                step += stride
                h.append(*row)
                model.append(row)
        elif op[0] == "drop_front":
            n = min(op[1], len(model))
            h.drop_front(n)
            del model[:n]
            first += n
        elif op[0] == "truncate":
            h.truncate(op[1])
            del model[op[1]:]
        else:
            back = History.from_state(json.loads(json.dumps(h.get_state(), allow_nan=True)))
            back.first = h.first
            back.odd = {k + h.first: v for k, v in back.odd.items()}
            h = back
        assert len(h) == len(model) and h.first == first
        assert same([h.row(i) for i in range(len(h))], model)
        assert [h.key(i, "step") for i in range(len(h))] == [r[0] for r in model]


def test_regular_steps_need_no_array_until_one_breaks_the_stride():
    h = History()
    for s in range(0, 5000, 25):
        h.append(s, None, {"loss": 1.0})
    assert h.steps is None and len(h) == 200 and h.key(199, "step") == 4975
    h.drop_front(100)
    assert h.steps is None and h.key(0, "step") == 2500
    state = h.get_state()
    assert state["steps"] is None and state["step_run"] == [2500, 25]
    h.append(4990, None, {"loss": 1.0})  # off the stride: the steps become an array
    assert h.steps is not None and [h.key(i, "step") for i in (0, 99, 100)] == [2500, 4975, 4990]


def test_history_state_with_a_bad_step_run_is_refused():
    h = History()
    for s in range(3):
        h.append(s, None, {"loss": 1.0})
    for bad in ([0], [0, 1.5], None, [2**63, 1]):
        state = dict(h.get_state(), step_run=bad)
        try:
            History.from_state(state)
        except ValueError:
            continue
        raise AssertionError(f"accepted step_run {bad!r}")


def test_a_step_back_after_a_state_without_folders_still_rewinds():
    """A state saved before the engine kept the folders' last keys has no last folder: the
    first row after loading it that goes back is a resumed job, as it always was, not late."""
    from autolr.chain import build_chain
    from autolr.config import parse_policy_options
    from autolr.engine import RunEngine
    from autolr.plugins import policy_classes
    from autolr.records import Record

    def engine():
        return RunEngine(build_chain(parse_policy_options(["step:step_size=5,gamma=0.5"]), policy_classes()))

    old = engine()
    for s in range(20):
        old.feed(Record({"loss": 1.0}, s))
    saved = old.get_state()
    del saved["lanes"], saved["last_lane"]
    loaded = engine()
    loaded.set_state(saved)
    kinds = [d.kind for d in loaded.feed(Record({"loss": 1.0}, 10), (), ".")]
    assert kinds[0] == "rewind" and loaded.rewinds == 1
    # with folders known, a second folder's row behind the first's is late, one going back rewinds
    loaded.feed(Record({"loss": 1.0}, 11), (), ".")
    assert [d.kind for d in loaded.feed(Record({"loss": 1.0}, 5), (), "val")] != ["rewind"]
    assert loaded.rewinds == 1 and loaded.last_key == 11
