import re

from asok import Component, exposed


class Signup(Component):
    name = ""
    email = ""
    errors = {}
    done = False

    @exposed
    def save(self, fields: dict):
        self.name = fields.get("name", "").strip()
        self.email = fields.get("email", "").strip()
        self.errors = {}
        if len(self.name) < 2:
            self.errors["name"] = "Please give a name of at least 2 characters."
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", self.email):
            self.errors["email"] = "That does not look like an email address."
        self.done = not self.errors

    @exposed
    def reset(self):
        self.name, self.email, self.errors, self.done = "", "", {}, False
