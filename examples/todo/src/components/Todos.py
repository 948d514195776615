from asok import Component, exposed, on


class Todos(Component):
    """The list: which items there are, in order, and whether each is done. Items are found
    by id, never by position, so a click in a stale tab cannot hit the wrong item."""
    items = []  # [{"id": 1, "text": "buy milk", "done": False}, ...]
    next_id = 1
    draft = ""

    @exposed
    def add(self):
        text = self.draft.strip()
        if text:
            self.items.append({"id": self.next_id, "text": text, "done": False})
            self.next_id += 1
        self.draft = ""

    @exposed
    def toggle(self, item_id: int, done: bool):
        for item in self.items:
            if item["id"] == item_id:
                item["done"] = done

    @exposed
    def remove(self, item_id: int):
        self.items = [item for item in self.items if item["id"] != item_id]

    @on("renamed")
    def renamed(self, payload):
        """An item's text changed (TodoItem emits it): a re-created item starts from it."""
        for item in self.items:
            if item["id"] == payload["id"]:
                item["text"] = payload["text"]

    @exposed
    def clear_done(self):
        self.items = [item for item in self.items if not item["done"]]
