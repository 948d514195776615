"""An avatar: a picture uploaded over the live component, checked, saved under static/avatars."""
from pathlib import Path
import secrets

from asok import Component, exposed

AVATAR_MAX = 1 << 20  # an avatar may be 1 MiB
FOLDER = Path(__file__).resolve().parents[2] / "static" / "avatars"
# what each accepted type starts with, so a renamed file is caught, and the extension it is saved with
KINDS = {"image/png": (b"\x89PNG\r\n\x1a\n", ".png"), "image/jpeg": (b"\xff\xd8\xff", ".jpg"),
         "image/gif": (b"GIF8", ".gif")}


class Avatar(Component):
    max_upload = 10 << 20  # what one submit may upload; save() holds the avatar to AVATAR_MAX
    name = ""
    picture = ""  # the saved avatar's URL
    locked = ("picture",)  # only save() sets it: a page cannot point it at someone else's file
    error = ""

    @exposed
    def save(self, fields: dict):
        photo = fields.get("photo")  # an UploadedFile, or None when no file was chosen
        self.error = ""
        if photo is None:
            self.error = "Choose a picture first."
            return
        kind = KINDS.get(photo.content_type)
        if kind is None or photo.read(len(kind[0])) != kind[0]:
            self.error = f"{photo.filename or 'That file'} is not a PNG, JPEG or GIF picture."
            return
        if photo.size > AVATAR_MAX:
            self.error = f"{photo.filename} is {photo.size / (1 << 20):.1f} MiB; an avatar may be 1 MiB at most."
            return
        FOLDER.mkdir(parents=True, exist_ok=True)
        name = secrets.token_hex(8) + kind[1]  # never a name the browser chose
        photo.save(FOLDER / name)
        if self.picture:
            (FOLDER / Path(self.picture).name).unlink(missing_ok=True)
        self.picture = f"/static/avatars/{name}"
