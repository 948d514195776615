"""Sign-in and sign-out around a guarded live component.

The demo accounts are ann / ann-secret and bob / bob-secret. A real app keeps password hashes
(hashlib.scrypt or a library made for it), not passwords."""
import hmac
import urllib.parse

from asok import Asok, redirect

app = Asok(__file__)

USERS = {"ann": "ann-secret", "bob": "bob-secret"}


def current_user(session):
    """The signed-in user's name, or None. Components import it: `from app import current_user`."""
    return session.get("user")


@app.before_request
def require_sign_in(request):
    """Every page under /account needs a signed-in user; the others are open."""
    if request.path.startswith("/account") and current_user(request.session) is None:
        return redirect("/signin?next=" + urllib.parse.quote(request.path))


@app.route("/")
def home():
    return redirect("/account")


@app.route("/signin", methods=["GET", "POST"])
def signin(request):
    error = ""
    if request.method == "POST":
        name = request.form.get("name", "").strip().lower()
        password = request.form.get("password", "")
        if hmac.compare_digest(USERS.get(name, "\0"), password):
            request.session.regenerate()  # a new id at sign-in: an id planted before is worth nothing
            request.session["user"] = name
            target = request.query.get("next", "/account")
            # only a path on this site: "//evil.example" and "/\\evil.example" are other sites to a browser
            path = target.replace("\\", "/")
            return redirect(target if path.startswith("/") and not path.startswith("//") else "/account")
        error = "That name and password do not match."
    return app.render_template(request, "signin.html", error=error, next=request.query.get("next", ""))


@app.route("/signout", methods=["POST"])
def signout(request):
    request.session.clear()  # the data and every component's state: the next user starts empty
    return redirect("/signin")
