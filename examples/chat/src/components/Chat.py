import json
import time
from pathlib import Path

from asok import Component, exposed, on

HISTORY = Path(__file__).resolve().parents[2] / ".asok" / "chat.jsonl"  # shared by every process
KEEP = 50


class Chat(Component):
    room = "lobby"
    name = ""
    draft = ""
    error = ""
    messages = []

    def mount(self):
        lines = HISTORY.read_text().splitlines() if HISTORY.exists() else []
        said = [json.loads(line) for line in lines[-500:]]
        self.messages = [m for m in said if m["room"] == self.room][-KEEP:]

    @exposed
    def send(self):
        text, self.error = self.draft.strip(), ""
        if not self.name.strip():
            self.error = "Pick a name first."
        elif text:
            message = {"room": self.room, "who": self.name.strip()[:40], "text": text[:500],
                       "at": time.strftime("%H:%M")}
            HISTORY.parent.mkdir(exist_ok=True)
            with HISTORY.open("a") as f:
                f.write(json.dumps(message) + "\n")
            self.publish(f"chat:{self.room}", message)  # every view in the room, this one too
            self.draft = ""

    @on("chat:{room}")
    def said(self, message):
        self.messages = (self.messages + [message])[-KEEP:]
