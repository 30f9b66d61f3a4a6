"""Progress of a step that takes a while (a TVM compilation, an emulated device's checks), by the
command line's conventions: with ``progress`` (stderr is a terminal) a live tqdm line on stderr
with the elapsed time, and a count where there is one; in any case, when the step ends, one
plain line ``LABEL: 12.3 s`` through ``log``, so a log that is not a terminal reads phase by phase."""

from __future__ import annotations

import threading
import time

from tqdm import tqdm


class Phase:
    """``with Phase("compile train_step", progress, log): ...``; ``total`` counts items, each
    reported with ``advance()``."""

    def __init__(self, label: str, progress: bool, log, total: int | None = None):
        self.label, self.log, self.started = label, log, time.perf_counter()
        self.bar = None
        if progress:
            count = "{n_fmt}/{total_fmt} " if total else ""
            self.bar = tqdm(total=total, desc=label, leave=False, dynamic_ncols=True,
                            bar_format="{desc}: " + count + "{elapsed}")
            self.stop = threading.Event()
            # the elapsed time moves while nothing counts
            threading.Thread(target=self._tick, args=(self.bar, self.stop), daemon=True).start()

    @staticmethod
    def _tick(bar, stop) -> None:
        while not stop.wait(0.5):
            bar.refresh()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self, done: bool = True) -> None:
        """Ends the live line; ``done``: the step finished (else it failed: no time line)."""
        if self.bar is not None:
            self.stop.set()
            self.bar.close()
            self.bar = None
        if self.log is not None and done:
            self.log(f"{self.label}: {time.perf_counter() - self.started:.1f} s")
        self.log = None

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind, *_exc) -> None:
        self.close(done=kind is None)
