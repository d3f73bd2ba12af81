"""``autolr`` with watchdog patched at run time: a diagnostic to A/B two event-delivery fixes.

Not part of autolr. Use as ``--daemon-cmd`` of the daemon benchmarks::

    python benchmarks/bench_latency.py --daemon-cmd "python benchmarks/patched_daemon.py --no-open-events"
    python benchmarks/bench_scale.py --daemon-cmd "python benchmarks/patched_daemon.py --no-open-events --no-move-delay"

``--no-open-events``: schedule the inotify watch with an ``event_filter`` of change events only,
so the kernel mask has no IN_OPEN / IN_CLOSE_NOWRITE. watchdog's default mask has them; every
read the daemon makes (a log, ``autolr.json``, the journal) then produces events that make it
read again: a loop that keeps the daemon busy with nothing written.

``--no-move-delay``: ``InotifyMoveEventGrouper.delay = 0``. watchdog holds an IN_MOVED_FROM for
up to 0.5 s to pair it with its IN_MOVED_TO, and its ``DelayedQueue.get`` sleeps out the whole
delay when such an event is at the head, even once the pair has arrived: every event behind it
waits. The daemon's own atomic writes (temp file renamed over ``autolr.json`` and the state file)
make these events.

The remaining arguments go to ``autolr`` unchanged.
"""
from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    no_open = "--no-open-events" in args
    no_delay = "--no-move-delay" in args
    rest = [a for a in args if a not in ("--no-open-events", "--no-move-delay")]
    if no_open:
        import watchdog.observers
        from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent,
                                     FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent,
                                     FileMovedEvent)

        changes = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
                   DirCreatedEvent, DirModifiedEvent, DirMovedEvent, DirDeletedEvent]
        base = watchdog.observers.Observer

        class Observer(base):  # type: ignore[valid-type, misc]
            def schedule(self, handler, path, *, recursive=False, event_filter=None, **kw):
                return super().schedule(handler, path, recursive=recursive, event_filter=changes, **kw)

        watchdog.observers.Observer = Observer  # the daemon imports it at start_observer() time
    if no_delay:
        import watchdog.observers.inotify_move_event_grouper as grouper

        grouper.InotifyMoveEventGrouper.delay = 0.0
    sys.argv = ["autolr", *rest]
    from autolr.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
