from asok import Component, exposed


class TodoItem(Component):
    """One item's editable text. Rendered with key=item id, so its state follows the item."""
    item_id = 0
    text = ""
    done = False

    def update(self, done, **props):
        self.done = done  # the list owns `done`; the text typed here is this component's own

    @exposed
    def rename(self, text: str):
        self.text = text
        self.emit("renamed", {"id": self.item_id, "text": text})  # the list keeps its copy
