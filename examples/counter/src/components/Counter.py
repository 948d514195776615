# src/components/Counter.py
from asok import Component, exposed


class Counter(Component):
    count = 0
    on_loop = True  # its methods and template never block: events run on the event loop, not in a thread

    @exposed
    def increment(self):
        self.count += 1
        self.session["pcount"] = self.session.get("pcount", 0) + 1
        # Required to persist changes back to the store
        self.session.modified = True

    @exposed
    def decrement(self):
        self.count -= 1

    # This method is NOT exposed and cannot be called from the frontend
    def _internal_calculation(self):
        return self.count * 2

    def render(self):
        return self.html("counter.html")
