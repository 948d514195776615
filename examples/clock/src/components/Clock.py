import os
import time

from asok import Component, every


class Clock(Component):
    on_loop = True  # tick() only reads the clock: it runs on the event loop, no thread hand-off
    now = ""
    load = ""
    ticks = 0

    def mount(self):
        self.tick()
        self.ticks = 0

    @every(1)
    def tick(self):
        """Runs once a second while this page is open somewhere, and not at all when it is not."""
        self.now = time.strftime("%H:%M:%S")
        self.load = " ".join(f"{n:.2f}" for n in os.getloadavg())
        self.ticks += 1
