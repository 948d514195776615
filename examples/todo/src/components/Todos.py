from asok import Component, exposed


class Todos(Component):
    items = []
    draft = ""

    @exposed
    def add(self):
        text = self.draft.strip()
        if text:
            self.items.append({"text": text, "done": False})
        self.draft = ""

    @exposed
    def toggle(self, index: int):
        if 0 <= index < len(self.items):
            self.items[index]["done"] = not self.items[index]["done"]

    @exposed
    def remove(self, index: int):
        if 0 <= index < len(self.items):
            del self.items[index]

    @exposed
    def clear_done(self):
        self.items = [item for item in self.items if not item["done"]]
