"""Arithmetic runs of kept observations against plain lists of (time, row)."""
from __future__ import annotations

import bisect
import json

from hypothesis import given, settings, strategies as st

from autolr.policies import kept

times = st.one_of(st.integers(-50, 10**6), st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.1, 0.3, 2**60]))
push = st.tuples(st.just("push"), st.integers(0, 3), times)  # row advance, time
regular = st.tuples(st.just("regular"), st.integers(1, 60), st.sampled_from([1, 0.5, 0.1, 25]))
drop = st.tuples(st.sampled_from(["first", "through", "slide"]), st.integers(0, 80))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(push, regular, drop), max_size=30), st.integers(-100, 3000))
def test_runs_equal_plain_lists(ops, probe):
    runs, model, row, t = [], [], 0, 0
    for op in ops:
        if op[0] == "push":
            row += op[1] + 1
            runs = kept.push(runs, op[2], row)
            model.append((op[2], row))
        elif op[0] == "regular":
            for _ in range(op[1]):
                row, t = row + 1, t + op[2]
                runs = kept.push(runs, t, row)
                model.append((t, row))
        elif op[0] == "first":
            before = [list(r) for r in runs]
            runs = kept.drop_first(runs, op[1])
            assert [list(r) for r in before] == before  # arguments are never modified
            del model[:op[1]]
        elif op[0] == "slide":  # one more observation, the window kept at op[1] (at least 1)
            row, t = row + 1, t + 1
            keep = max(op[1], 1)
            runs = kept.slide(runs, t, row, len(model) + 1 - keep)
            model = (model + [(t, row)])[-keep:]
        else:
            cut = row - op[1]
            runs, dropped = kept.drop_through(runs, cut)
            keep = [m for m in model if m[1] > cut]
            assert dropped == len(model) - len(keep)
            model = keep
        rows = [r for _, r in model]
        assert kept.count_after(runs, probe) == len(rows) - bisect.bisect_right(rows, probe)
        for last in (0, 1, 7, len(model)):
            got = kept.times_list(runs, last)
            want = [tm for tm, _ in model[max(len(model) - last, 0):]] if last else []
            assert got == want  # the same numbers (an int time may come back as the equal float)
        assert kept.times(runs).tolist() == [float(tm) for tm, _ in model]
    assert kept.from_lists([tm for tm, _ in model], [r for _, r in model]) is not None
    assert json.loads(json.dumps(runs)) == runs  # a state's runs survive its JSON file


def test_a_regular_log_is_one_run():
    runs = []
    for k in range(1, 1001):
        runs = kept.push(runs, 10 * k, k)
    runs = kept.drop_first(runs, 900)
    assert runs == [[10, 10, 1, 1, 900, 1000]]
    assert kept.times_list(runs, 3) == [9980, 9990, 10000] and kept.count_after(runs, 995) == 5
