"""Notes kept in the signed-in user's session; every call is refused once the user signed out."""
from asok import Component, LiveError, exposed

from app import current_user  # a helper from app.py


class Notepad(Component):
    notes = []
    draft = ""

    def authorize(self, method, args):
        if current_user(self.session) is None:
            raise LiveError("signed_out", "You are signed out: sign in again to change your notes.")

    @exposed
    def add(self):
        if self.draft.strip():
            self.notes.append(self.draft.strip())
        self.draft = ""

    @exposed
    def remove(self, index: int):
        if 0 <= index < len(self.notes):
            del self.notes[index]
